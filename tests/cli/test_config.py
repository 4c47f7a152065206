"""One config mechanism for every command: each option's default is its dataclass field's,
--config FILE (JSON or YAML) sets the defaults and the command line overrides them, and the
library names a field (`batch_size`) where the command line names its flag (--batch-size)."""

import dataclasses
import json

import pytest

from fastmft.cli import _subparser, build_parser, main
from fastmft.cli.options import apply_config_file
from fastmft.pipelines.selection.config import SelectConfig
from fastmft.pipelines.trainer.config import TrainConfig
from fastmft.pipelines.typicality.config import ScoreConfig, ScoreError, TypicalityConfig

CONFIGS = {"train": TrainConfig, "score": ScoreConfig, "select": SelectConfig, "typicality": TypicalityConfig}


def _sub(command):
    parser = build_parser(command)
    return parser, _subparser(parser, command)


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_option_default_is_its_field_default(command):
    _, sub = _sub(command)
    actions = {a.dest: a for a in sub._actions}
    fields = [f for f in dataclasses.fields(CONFIGS[command]) if f.name != "method"]
    for f in fields:
        action = actions[f.name]  # every field has its option
        if f.default is dataclasses.MISSING:
            assert action.required or action.nargs == "+", f.name
        else:
            assert action.default == f.default, f.name


def _parse(command, argv):
    parser, sub = _sub(command)
    apply_config_file(sub, argv)
    return parser.parse_args([command, *argv])


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_sets_defaults_and_the_command_line_wins(tmp_path, suffix):
    values = {"batch_size": 8, "max-length": 64, "no-progress": True, "output": "x.parquet", "label_values": ["a", "b"]}
    path = tmp_path / f"settings{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))  # JSON is YAML
    args = _parse("score", ["in.jsonl", "--config", str(path), "--batch-size", "4"])
    assert (args.batch_size, args.max_length, args.progress, args.output) == (4, 64, False, "x.parquet")
    assert args.label_values == ["a", "b"] and args.chunk_rows == ScoreConfig.chunk_rows
    assert _parse("train", []).batch_size == TrainConfig.batch_size
    (tmp_path / "t.json").write_text(json.dumps({"prototypes": 3, "layers": [1, 2], "bf16": False}))
    train = _parse("train", ["--config", str(tmp_path / "t.json"), "--prototypes", "2"])
    assert (train.num_prototypes, train.layers, train.bf16) == (2, (1, 2), False)


@pytest.mark.parametrize(
    "content,message",
    [
        ({"no_such_setting": 1}, "unknown setting 'no_such_setting'"),
        ({"batch_size": 0}, "batch_size: must be an integer >= 1, got '0'"),
        ({"inner": "rmsprop"}, "inner: must be one of sgd, adam, got 'rmsprop'"),
        ({"agnostic": "yes"}, "agnostic: must be true or false"),
        ([1, 2], "must hold a mapping"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    assert main(["select", "--config", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fastmft select: error: --config {path}: ") and message in err
    assert not (tmp_path / "run").exists()


def test_yaml_without_pyyaml_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    (tmp_path / "c.yaml").write_text("epochs: 1\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "reading YAML needs PyYAML" in capsys.readouterr().err


@pytest.mark.parametrize(
    "cls,kw,message",
    [
        (ScoreConfig, dict(inputs=["a"], output="o", batch_size=0), "`batch_size` must be an integer >= 1, got 0"),
        (ScoreConfig, dict(inputs=["a"], output="o", alpha=1.5), "`alpha` must be a finite number in [0, 1]"),
        (ScoreConfig, dict(inputs=["a"], output="o", temperature=0.0), "`temperature` must be a finite number > 0"),
        (ScoreConfig, dict(inputs=["a"], output="o", precision="fp16"), "`precision` must be one of fp32, bf16, int8"),
        (TypicalityConfig, dict(max_length=1), "`max_length` must be an integer >= 2, got 1"),
        (SelectConfig, dict(episodes=-1), "`episodes` must be an integer >= 0, got -1"),
        (SelectConfig, dict(lr=float("nan")), "`lr` must be a finite number > 0"),
        (TrainConfig, dict(num_prototypes=0), "`num_prototypes` must be an integer >= 1, got 0"),
        (TrainConfig, dict(few_shot=0.0), "`few_shot` must be a finite number in (0, 1]"),
    ],
)
def test_the_library_names_the_field(cls, kw, message):
    with pytest.raises(ValueError) as caught:
        cls(**kw)
    assert message in str(caught.value) and "--" not in str(caught.value)
    assert cls is not ScoreConfig or caught.type is ScoreError


def test_the_command_line_names_the_flag(tmp_path, capsys):
    """A bad value from the file names its setting; the config's own message, with the flag."""
    (tmp_path / "c.json").write_text(json.dumps({"top_k": 0}))
    status = main(["score", "in.jsonl", "-o", str(tmp_path / "o.parquet"), "--config", str(tmp_path / "c.json")])
    assert status == 2 and "top_k: must be an integer >= 1" in capsys.readouterr().err
    from fastmft.cli import flag_names

    in_flags = flag_names(build_parser("train"), "train")
    with pytest.raises(ValueError) as caught:
        TrainConfig(num_prototypes=0)
    assert in_flags(str(caught.value)) == "--prototypes must be an integer >= 1, got 0"
