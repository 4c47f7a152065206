"""`fastmft score`'s options map onto ScoreConfig by name: no option is dropped on the way."""

import dataclasses

from fastmft.cli import build_parser
from fastmft.cli.score import config_from_args
from fastmft.pipelines.typicality import ScoreConfig

COMMAND_ONLY = {"help", "command", "func", "plot", "config"}  # what the command itself uses


def test_every_score_option_sets_the_config_field_of_its_name():
    parser = build_parser("score")
    sub = next(a for a in parser._actions if a.dest == "command").choices["score"]
    fields = {f.name for f in dataclasses.fields(ScoreConfig)}
    dests = {a.dest for a in sub._actions} - COMMAND_ONLY
    assert dests <= fields, f"options without a ScoreConfig field: {sorted(dests - fields)}"

    argv = ["score", "a.jsonl", "b.parquet", "-o", "out.parquet", "--alpha", "0.3", "--prototypes", "2"]
    argv += ["--label-values", "neg,pos", "--top-k", "3", "--strict", "--no-progress", "--max-length", "64"]
    cfg = config_from_args(parser.parse_args(argv))
    assert (cfg.inputs, cfg.output, cfg.alpha, cfg.prototypes) == (["a.jsonl", "b.parquet"], "out.parquet", 0.3, 2)
    assert (cfg.label_values, cfg.top_k, cfg.strict, cfg.progress, cfg.max_length) == (
        ["neg", "pos"],
        3,
        True,
        False,
        64,
    )
