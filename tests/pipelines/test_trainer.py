"""The MFT trainer on a tiny BERT and the synthetic corpus: every method end to end, the MFT heads,
typicality weights in the loss, corrupted domain labels, resume, DDP on 2 gloo processes, data
errors, pairs and few-shot."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from fastmft.cli import main as cli_main
from fastmft.data import Columns
from fastmft.data.synthetic import synthetic_corpus
from fastmft.ops.nn import skip_layers
from fastmft.pipelines import trainer
from fastmft.pipelines.trainer import checkpoint, inputs, loop, metrics, models
from fastmft.runtime.backbone import load_backbone
from tests.helpers import current_checkpoint, flip_tensor_bit, tiny_bert, two_process_command

PER_DOMAIN, DOMAINS = 16, 2
REPO = Path(__file__).resolve().parents[2]


def _words(rows):
    return re.findall(r"[A-Za-z']+", " ".join(r["text"] for r in rows)) + ["premise", "hypothesis", "yes", "no"]


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus(PER_DOMAIN, domains=DOMAINS)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory, corpus):
    folder = tiny_bert(tmp_path_factory.mktemp("bert"), _words(corpus), layers=3)
    return folder, load_backbone(str(folder))


@pytest.fixture(scope="module")
def data(backbone, corpus):
    return trainer.load_data(datasets.Dataset.from_list(corpus), backbone[1][1])


def _run(data, backbone, out=None, **kw):
    kw.setdefault("batch_size", 8)
    return trainer.train(data=data, backbone=backbone[1], output_dir=out, progress=False, **kw)


def _steps(folder):
    return [json.loads(l) for l in (Path(folder) / "metrics.jsonl").read_text().splitlines() if '"step"' in l]


@pytest.mark.parametrize("method", trainer.METHODS)
def test_each_method_runs_end_to_end(method, data, backbone, tmp_path):
    result = _run(data, backbone, tmp_path, method=method, log_every=1)
    assert result.complete and result.method == method
    assert set(result.per_domain) == {"books", "electronics"}
    for r in result.per_domain.values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1 and r["n"] == 2
    steps = _steps(tmp_path)
    assert steps and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    phases = {s["phase"] for s in steps}
    expected = {"s": {"domain:0", "domain:1"}, "mix": {"joint"}, "mtl": {"joint"}, "adv": {"joint"}}
    assert phases == expected.get(method, {"mft", "domain:0", "domain:1"})
    mft = [s for s in steps if s["phase"] == "mft"]
    if method == "tw":  # lambda = 0: the SDC term does not reach the loss
        assert all(s["loss"] == pytest.approx(s["label_loss"]) for s in mft)
    if method in ("dc", "full"):
        assert all(s["loss"] == pytest.approx(s["label_loss"] + 0.1 * s["domain_loss"], rel=1e-5) for s in mft)
    if method == "adv":
        assert all("domain_loss" in s for s in steps)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["per_domain"] == result.per_domain
    assert (tmp_path / "typicality.safetensors").is_file() == (method in ("tw", "full"))


def test_mft_heads_add_only_expected_parameters_and_are_dropped(data, backbone):
    encoder = backbone[1][0]
    base = models.prepare_encoder(encoder, None)
    H, M, K = base.config.hidden_size, len(data.label_vocab), len(data.domain_vocab)
    layers = skip_layers(base.config.num_hidden_layers)
    model = models.MFTModel(base, M, K, layers, 0.1)
    count = lambda m: sum(p.numel() for p in m.parameters())
    added = {n: p.shape for n, p in model.named_parameters() if not n.startswith("encoder.")}
    expected = {"mft.label_head.weight": (M, H), "mft.label_head.bias": (M,), "mft.domain_embedding.weight": (K, H)}
    for i in range(len(layers)):
        expected.update({f"mft.domain_heads.{i}.weight": (K, H), f"mft.domain_heads.{i}.bias": (K,)})
    assert {n: tuple(s) for n, s in added.items()} == expected
    assert count(model) - count(base) == (H * M + M) + len(layers) * (H * K + K) + K * H
    meta = trainer.meta_train(data=data, backbone=backbone[1], method="full", batch_size=8, progress=False)
    assert type(meta) is type(encoder)
    assert {n for n, _ in meta.named_parameters()} == {n for n, _ in base.named_parameters()}
    assert not any("mft" in n or "head" in n for n, _ in meta.named_parameters())
    changed = [n for (n, a), b in zip(base.named_parameters(), meta.parameters()) if not torch.equal(a, b)]
    assert changed, "MFT epochs left the encoder untouched"


def _batch(data, n=6):
    from fastmft.data import Collator

    rows = inputs.model_rows(data.train)[:: max(1, len(data.train) // n)][:n]
    return Collator()(rows)


def test_typicality_weights_reach_the_loss(data, backbone):
    torch.manual_seed(0)
    model = models.MFTModel(models.prepare_encoder(backbone[1][0], 0.0), 2, 2, (1, 2, 3), 0.1)
    batch = _batch(data)
    n = batch["input_ids"].shape[0]
    batch["corrupted"] = batch["domains"].flip(0)
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["emb"] = output

    handle = model.encoder.embeddings.register_forward_hook(keep)
    batch["typicality"] = torch.ones(n)
    batch["typicality"][0] = 0.0
    model(batch)["loss"].backward()
    handle.remove()
    grad = captured["emb"].grad
    assert torch.count_nonzero(grad[0]) == 0  # a zero-weight instance contributes no gradient
    assert all(torch.count_nonzero(grad[i]) > 0 for i in range(1, n))
    with torch.no_grad():
        half = model({**batch, "typicality": torch.full((n,), 0.5)})
        full = model({**batch, "typicality": torch.ones(n)})
    assert half["loss"] == pytest.approx(0.5 * full["loss"].item(), rel=1e-5)


def test_stored_typicality_is_what_training_uses(data, backbone, tmp_path):
    from safetensors.torch import save_file

    from fastmft.runtime.files import RUN_MARKER

    (tmp_path / RUN_MARKER).touch()  # the run folder of an earlier run, which stored its typicality
    save_file({"typicality": torch.zeros(len(data.train))}, str(tmp_path / "typicality.safetensors"))
    _run(data, backbone, tmp_path, method="full", log_every=1, epochs=1)
    mft = [s for s in _steps(tmp_path) if s["phase"] == "mft"]
    assert mft and all(s["loss"] == 0.0 for s in mft)


def test_corrupted_domain_labels_are_a_permutation_of_the_batch(data, backbone, monkeypatch):
    seen = []
    forward = models.MFTModel.forward

    def spy(self, batch):
        seen.append((batch["domains"].clone(), batch["corrupted"].clone()))
        return forward(self, batch)

    monkeypatch.setattr(models.MFTModel, "forward", spy)
    _run(data, backbone, method="full", mft_epochs=2, epochs=0, batch_size=12)
    assert len(seen) == 4
    for domains, corrupted in seen:
        assert torch.equal(domains.sort().values, corrupted.sort().values)
    assert any(not torch.equal(d, c) for d, c in seen)


def test_resume_equals_uninterrupted(data, backbone, tmp_path):
    kw = dict(method="full", mft_epochs=2, epochs=2, log_every=1, save_models=True)
    _run(data, backbone, tmp_path / "a", **kw)
    # Interrupted mid-epoch in MFT, then mid-epoch in the first domain's fine-tuning.
    first = _run(data, backbone, tmp_path / "b", stop_after_steps=2, **kw)
    assert not first.complete
    assert not _run(data, backbone, tmp_path / "b", stop_after_steps=8, **kw).complete
    resumed = _run(data, backbone, tmp_path / "b", **kw)
    assert resumed.complete
    a, b = _steps(tmp_path / "a"), _steps(tmp_path / "b")
    assert [s["loss"] for s in a] == [s["loss"] for s in b] and len(a) == 6 + 2 * 4
    assert json.loads((tmp_path / "a" / "result.json").read_text())["per_domain"] == resumed.per_domain
    from safetensors.torch import load_file

    for f in sorted((tmp_path / "a" / "models").iterdir()):
        x, y = load_file(str(f)), load_file(str(tmp_path / "b" / "models" / f.name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match="other settings.*lr"):
        _run(data, backbone, tmp_path / "b", **{**kw, "lr": 1e-3})


def test_ddp_two_gloo_processes_match_single_process(corpus, backbone, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in corpus))
    args = [
        "--data",
        str(path),
        "--backbone",
        str(backbone[0]),
        "--method",
        "full",
        "--mft-epochs",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--dropout",
        "0",
        "--log-every",
        "1",
        "--no-progress",
        "--threads",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    ddp = subprocess.run(
        [sys.executable, *two_process_command("train"), *args, "--output-dir", str(tmp_path / "ddp")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    threads = torch.get_num_threads()
    try:  # the single-process run in this process (saves an interpreter start)
        assert cli_main(["train", *args, "--output-dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = _steps(tmp_path / "one"), _steps(tmp_path / "ddp")
    assert len(a) == len(b) == 3 + 2 * 2
    torch.testing.assert_close(
        torch.tensor([s["loss"] for s in b]), torch.tensor([s["loss"] for s in a]), rtol=1e-4, atol=1e-5
    )
    assert "MFT(Full)" in ddp.stdout and "Average" in ddp.stdout


def _bad(rows, backbone, **kw):
    return trainer.load_data(datasets.Dataset.from_list(rows), backbone[1][1], **kw)


def test_bad_datasets_give_clear_errors(corpus, backbone):
    rows = [dict(r) for r in corpus]
    with pytest.raises(ValueError, match="no column 'label'"):
        _bad([{k: v for k, v in r.items() if k != "label"} for r in rows], backbone)
    unknown = [dict(r) for r in rows]
    row = next(i for i, r in enumerate(unknown) if r["split"] == "test")
    unknown[row]["label"] = "neutral"
    with pytest.raises(ValueError, match=r"evaluation data: row 0: unknown label 'neutral'"):
        _bad(unknown, backbone)
    empty_text = [dict(r) for r in rows]
    empty_text[3]["text"] = "  "
    with pytest.raises(ValueError, match=r"training data: row 3: missing text \('text'\)"):
        _bad(empty_text, backbone)
    empty_domain = [dict(r) for r in rows]
    empty_domain[5]["domain"] = ""
    with pytest.raises(ValueError, match=r"training data, row 5: column 'domain' is empty"):
        _bad(empty_domain, backbone)
    no_eval = [r for r in rows if not (r["domain"] == "books" and r["split"] == "test")]
    with pytest.raises(ValueError, match=r"\['books'\] have training rows but no evaluation rows"):
        _bad(no_eval, backbone)
    with pytest.raises(ValueError, match="no column 'split'"):
        _bad([{k: v for k, v in r.items() if k != "split"} for r in rows], backbone)
    with pytest.raises(ValueError, match="unknown method 'bert'"):
        trainer.TrainConfig(method="bert")


def test_cli_prints_the_comparison_table(corpus, backbone, tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in corpus))
    code = cli_main(
        [
            "train",
            "--data",
            str(path),
            "--backbone",
            str(backbone[0]),
            "--method",
            "full,s",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--no-progress",
            "--output-dir",
            str(tmp_path / "o"),
            "--json",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"\| domain\s+\| MFT\(Full\) \| BERT\(S\) \|", out) and "| Average" in out and "| books" in out
    assert (tmp_path / "o" / "full" / "result.json").is_file() and (tmp_path / "o" / "s" / "metrics.jsonl").is_file()
    assert cli_main(["train", "--data", str(path), "--backbone", str(backbone[0]), "--label-column", "stars"]) == 2
    assert "no column 'stars'" in capsys.readouterr().err


def test_pairs_word_pairs_and_few_shot(backbone, tmp_path):
    tok = backbone[1][1]
    rows = []
    for i in range(24):
        d, y = ("books", "electronics")[i % 2], ("yes", "no")[(i // 2) % 2]
        rows.append(
            {
                "premise": f"novel story {i % 3}",
                "hypothesis": "great plot" if y == "yes" else "boring plot",
                "label": y,
                "domain": d,
                "split": "test" if i >= 16 else "train",
            }
        )
    columns = Columns(text="premise", text_pair="hypothesis")
    pairs = trainer.load_data(datasets.Dataset.from_list(rows), tok, columns)
    assert 1 in pairs.train[0]["token_type_ids"]  # the tokenizer's pair encoding
    joined = trainer.load_data(datasets.Dataset.from_list(rows), tok, columns, pair_join=True)
    assert tok.sep_token in joined.train[0]["premise"] and set(joined.train[0]["token_type_ids"]) == {0}
    assert joined.train[0]["input_ids"] == pairs.train[0]["input_ids"]
    result = trainer.train(data=joined, backbone=backbone[1], method="full", batch_size=4, epochs=1, progress=False)
    assert result.complete and set(result.per_domain) == {"books", "electronics"}
    few = trainer.load_data(datasets.Dataset.from_list(rows), tok, columns, few_shot=0.5, seed=1)
    assert len(few.train) == 8  # 2 rows of each of the 4 (domain, label) cells of 4
    from collections import Counter

    assert Counter(zip(few.train["domains"], few.train["labels"])) == {(k, y): 2 for k in (0, 1) for y in (0, 1)}
    again = trainer.load_data(datasets.Dataset.from_list(rows), tok, columns, few_shot=0.5, seed=1)
    assert few.train["premise"] == again.train["premise"]
    assert (
        inputs.few_shot_rows([0] * 10, [0] * 10, 0.05, 0)
        and len(inputs.few_shot_rows([0] * 10, [0] * 10, 0.05, 0)) == 1
    )


def test_schedule_warms_up_then_decays_linearly():
    f = loop.warmup_linear(100, 0.1)
    assert f(0) < f(5) < f(9) <= 1.0 and f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == 0.0


def test_metrics():
    assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    # classes 0: tp 2 fp 1 fn 0 -> 0.8; class 1: tp 1 fp 0 fn 1 -> 2/3
    assert metrics.macro_f1([0, 1, 1, 0], [0, 1, 0, 0]) == pytest.approx((0.8 + 2 / 3) / 2)


# ----------------------------------------------------------------------------------------------
# issue 13: atomic checkpoints, exact resume, no success after NaN, one-line option errors

RESUME_KW = dict(method="full", mft_epochs=1, epochs=1, log_every=1, save_models=True, checkpoint_every=2)


@pytest.fixture(scope="module")
def straight(data, backbone, tmp_path_factory):
    """An uninterrupted run: its step losses and final models."""
    out = tmp_path_factory.mktemp("straight")
    _run(data, backbone, out, **RESUME_KW)
    return _steps(out), _models(out)


def _models(folder):
    from safetensors.torch import load_file

    return {f.name: load_file(str(f)) for f in sorted((Path(folder) / "models").iterdir())}


def _same_as_straight(folder, straight):
    steps, models = straight
    got = _steps(folder)
    assert [(s["global_step"], s["loss"]) for s in got] == [(s["global_step"], s["loss"]) for s in steps]
    assert models.keys() == _models(folder).keys()
    for name, tensors in _models(folder).items():
        assert all(torch.equal(tensors[k], models[name][k]) for k in tensors), name


def test_a_failed_checkpoint_write_resumes_from_the_previous_one(data, backbone, tmp_path, straight, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **kw):  # the 2nd checkpoint dies after its model file is written
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-checkpoint")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):  # checkpoints after steps 1 and 2 of the MFT phase
        _run(data, backbone, out, **{**RESUME_KW, "checkpoint_every": 1})
    monkeypatch.setattr(torch, "save", real_save)
    assert _run(data, backbone, out, **RESUME_KW).complete
    _same_as_straight(out, straight)


def test_an_unreadable_checkpoint_falls_back_with_a_warning(data, backbone, tmp_path, straight):
    out = tmp_path / "run"
    assert not _run(data, backbone, out, stop_after_steps=2, **RESUME_KW).complete
    model = current_checkpoint(out) / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])  # a damaged disk
    with pytest.warns(RuntimeWarning, match="is unreadable"):
        assert _run(data, backbone, out, **RESUME_KW).complete
    _same_as_straight(out, straight)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
def test_a_changed_value_in_a_checkpoint_falls_back_to_the_previous_one(data, backbone, tmp_path, straight, name):
    """One bit flipped inside tensor data: the file still parses, so only its checksum tells."""
    import warnings

    out = tmp_path / "run"
    kw = {**RESUME_KW, "checkpoint_every": 1}
    assert not _run(data, backbone, out, stop_after_steps=1, **kw).complete
    assert not _run(data, backbone, out, stop_after_steps=2, **kw).complete
    second = current_checkpoint(out)
    [first] = [p for p in out.glob("checkpoint-*") if p != second]  # the previous one is kept beside it
    # a checkpoint of progress only hard-links the files of the one before: then both are damaged
    shared = (first / name).stat().st_ino == (second / name).stat().st_ino
    flip_tensor_bit(second / name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _run(data, backbone, out, **RESUME_KW).complete
    warning, *more = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(more) == (1 if shared else 0)
    assert warning == (
        f"checkpoint {second} is unreadable (ValueError: {name} does not match the size and sha256 recorded "
        f"in checksums.json); falling back to the previous complete checkpoint {first.name}"
    )
    _same_as_straight(out, straight)


def test_a_kill_before_the_first_checkpoint_logs_no_step_twice(data, backbone, tmp_path, straight, monkeypatch):
    out = tmp_path / "run"
    real_log = checkpoint.RunStore.log

    def log_then_die(self, record):
        real_log(self, record)
        if record.get("global_step") == 1:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint.RunStore, "log", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(data, backbone, out, **RESUME_KW)
    monkeypatch.setattr(checkpoint.RunStore, "log", real_log)
    assert _run(data, backbone, out, **RESUME_KW).complete
    _same_as_straight(out, straight)


def test_a_non_finite_loss_stops_training_naming_the_step(data, backbone, monkeypatch):
    real = models.Classifier.forward
    monkeypatch.setattr(
        models.Classifier,
        "forward",
        lambda self, batch: {k: v * float("nan") if k == "loss" else v for k, v in real(self, batch).items()},
    )
    with pytest.raises(FloatingPointError, match="loss is not finite at step 1 of this phase"):
        _run(data, backbone, method="s")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lam", "nan"], "argument --lam: must be a finite number >= 0"),
        (["--alpha", "1.5"], "argument --alpha: must be a finite number in [0, 1]"),
        (["--lr", "-1"], "argument --lr: must be a finite number > 0"),
        (["--prototypes", "0"], "argument --prototypes: must be an integer >= 1"),
        (["--layers", "1.5"], "argument --layers: must be comma-separated int values, got '1.5'"),
        (["--layers", "9"], "--layers 9: the encoder has 3 layers"),
        (["--method", ","], "--method ',' names no method"),
        (["--output-dir", "{file}"], "is a file, not a folder"),
        (["--device", "tpu9"], "--device 'tpu9' is not a device torch knows"),
        (["--threads", "-1"], "argument --threads: must be an integer >= 1"),
        (["--max-length", "129"], "--max-length 129 is more than the model's 128 positions"),
        (["--precision", "int8"], "int8 is a scoring mode"),
    ],
)
def test_bad_options_are_one_line_errors(corpus, backbone, tmp_path, capsys, args, message):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (tmp_path / "file").write_text("")
    args = [a.format(file=tmp_path / "file") for a in args]
    with pytest.raises(SystemExit) if "argument" in message else _nothing():
        assert cli_main(["train", "--data", str(path), "--backbone", str(backbone[0]), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert (tmp_path / "file").read_text() == ""


def test_cli_options_are_made_from_the_config_fields(capsys):
    """Every TrainConfig field but method is a ``fastmft train`` option with its help text and
    default; no option gives the default config, and each option reaches its field."""
    import dataclasses

    from fastmft.cli import build_parser
    from fastmft.cli.train import config_from_args
    from fastmft.runtime.settings import option_name

    parser = build_parser("train")
    assert config_from_args(parser.parse_args(["train"]), "full") == trainer.TrainConfig()
    given = ["--prototypes", "3", "--layers", "1,2", "--no-bf16", "--placebo", "--mft-lr", "1e-4"]
    cfg = config_from_args(parser.parse_args(["train", *given, "--stop-after-steps", "5", "--seed", "7"]), "s")
    assert (cfg.num_prototypes, cfg.layers, cfg.bf16, cfg.placebo, cfg.mft_lr) == (3, (1, 2), False, True, 1e-4)
    assert (cfg.stop_after_steps, cfg.seed, cfg.method) == (5, 7, "s")
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(trainer.TrainConfig):
        if f.name == "method":
            continue
        name = option_name(trainer.TrainConfig, f.name)
        flag = f"--no-{name}" if f.default is True else f"--{name}"
        help = " ".join(re.sub("`([a-z_]+)`", lambda m: f"--{m[1].replace('_', '-')}", f.metadata["help"]).split())
        assert f"{flag} " in shown and help in shown, f.name
        if f.default is not None and not isinstance(f.default, bool):  # 0 included
            assert f"{help} (default: {f.default})" in shown, f.name


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_predictions_per_row_and_dev_set(data, backbone, corpus):
    """Each domain's result carries its per-row predictions (paired statistics need them), and a
    dev set given in TrainData is scored beside eval with the same model."""
    import dataclasses

    with_dev = dataclasses.replace(data, dev=data.eval)
    result = _run(with_dev, backbone, method="s", epochs=1)
    gold = data.eval["labels"]
    for k, name in enumerate(data.domain_vocab.values):
        r, d = result.per_domain[str(name)], result.dev_per_domain[str(name)]
        rows = [i for i, x in enumerate(data.eval["domains"]) if x == k]
        assert len(r["predictions"]) == r["n"] == len(rows)
        assert r["accuracy"] == pytest.approx(sum(p == gold[i] for p, i in zip(r["predictions"], rows)) / len(rows))
        assert d["predictions"] == r["predictions"]  # the same rows, the same model


def test_placebo_permutes_typicality_within_each_domain():
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    t = torch.rand(40, generator=g)
    domains = torch.randint(0, 3, (40,), generator=g).tolist()
    out = loop.shuffle_within(t, domains, seed=5)
    assert not torch.equal(out, t)
    for k in set(domains):
        idx = [i for i, d in enumerate(domains) if d == k]
        assert sorted(out[idx].tolist()) == sorted(t[idx].tolist())
    assert torch.equal(out, loop.shuffle_within(t, domains, seed=5))


def test_bf16_training_on_cpu_runs_in_bf16_and_stays_close_to_fp32(data, backbone, tmp_path):
    kw = dict(method="full", mft_epochs=1, epochs=1, log_every=1, device="cpu")
    fp32 = _run(data, backbone, tmp_path / "fp32", precision="fp32", **kw)
    bf16 = _run(data, backbone, tmp_path / "bf16", precision="bf16", **kw)
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert _run(data, backbone, None, **kw).precision == "fp32"  # the CPU default: the experiments' fp32
    from safetensors.torch import load_file

    t32, t16 = (load_file(str(tmp_path / p / "typicality.safetensors"))["typicality"] for p in ("fp32", "bf16"))
    # the typicality pass ran under bf16 autocast (pooling and scores in fp32): close, not equal
    assert 0 < float((t32 - t16).abs().max()) <= 2e-2
    first32, first16 = _steps(tmp_path / "fp32")[0]["loss"], _steps(tmp_path / "bf16")[0]["loss"]
    assert first32 != first16 and first16 == pytest.approx(first32, rel=2e-2)


def test_a_checkpoint_from_before_the_precision_setting_resumes(data, backbone, tmp_path):
    kw = dict(method="s", epochs=1, log_every=1)
    assert not _run(data, backbone, tmp_path, stop_after_steps=1, **kw).complete
    state_path = current_checkpoint(tmp_path) / "state.json"
    (state_path.parent / "checksums.json").unlink()  # as written by a fastmft without checksums
    state = json.loads(state_path.read_text())
    del state["config"]["precision"]  # as written by a fastmft without the setting
    state_path.write_text(json.dumps(state))
    assert _run(data, backbone, tmp_path, **kw).complete
    with pytest.raises(ValueError, match="other settings.*precision"):
        _run(data, backbone, tmp_path, precision="bf16", **kw)
