"""The trainer's Python API: :func:`train` (one method), :func:`compare` (several methods on the
same data) and :func:`meta_train` (the typicality pass and the MFT epochs alone)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from fastmft.data import Columns
from fastmft.runtime.dist import Dist
from fastmft.runtime.files import atomic_write

from .checkpoint import RunStore
from .config import MFT_METHODS, TrainConfig, TrainResult, method_key
from .inputs import TrainData, load_data
from .loop import MethodRun
from .models import check_encoder


def _load_encoder(backbone):
    """(encoder, tokenizer): a (model, tokenizer) pair passes through; else load_backbone."""
    if isinstance(backbone, tuple):
        return backbone
    from fastmft.runtime.backbone import load_backbone

    return load_backbone(backbone)


def _config(config: TrainConfig | None, overrides: dict) -> TrainConfig:
    return dataclasses.replace(config, **overrides) if config is not None else TrainConfig(**overrides)


def train(
    config: TrainConfig | None = None,
    *,
    data: TrainData | None = None,
    source=None,
    eval_source=None,
    columns: Columns = Columns(),
    backbone=None,
    output_dir: str | os.PathLike | None = None,
    **overrides,
) -> TrainResult:
    """Run one method end to end and return its per-domain results.

    ``backbone``: a local folder, a cached Hugging Face name, a ``(model, tokenizer)`` pair, or
    None for the default MiniLM. ``data``: a :class:`TrainData` (e.g. from :func:`load_data`);
    otherwise ``source`` (and ``eval_source``) are loaded with ``columns``; neither: the embedded
    synthetic corpus. ``output_dir``: metrics.jsonl, checkpoints and results; an existing run there
    is resumed. ``overrides``: TrainConfig fields (e.g. ``method="s", epochs=3``)."""
    cfg = _config(config, overrides)
    dist = Dist(cfg.device)
    torch.manual_seed(cfg.seed)
    encoder, tokenizer = _load_encoder(backbone)
    check_encoder(encoder, cfg, tokenising=data is None)
    store = RunStore(output_dir, dist)
    try:
        if data is None:
            data = _default_data(source, eval_source, columns, tokenizer, cfg)
        result = MethodRun(cfg, encoder, tokenizer, data, store, dist).run()
        if store.folder is not None and dist.main and result.complete:
            atomic_write(
                store.folder / "result.json", lambda f: f.write(json.dumps(result.to_dict(), indent=1)), mode="w"
            )
    finally:
        store.close()
    return result


def _default_data(source, eval_source, columns, tokenizer, cfg: TrainConfig) -> TrainData:
    if source is None:
        from fastmft.data.synthetic import synthetic_dataset

        source, columns = synthetic_dataset(), Columns()
    return load_data(
        source,
        tokenizer,
        columns,
        eval_source=eval_source,
        max_length=cfg.max_length,
        pair_join=cfg.pair_join,
        few_shot=cfg.few_shot,
        seed=cfg.seed,
    )


def compare(
    methods: Sequence[str],
    config: TrainConfig | None = None,
    *,
    data: TrainData | None = None,
    source=None,
    eval_source=None,
    columns: Columns = Columns(),
    backbone=None,
    output_dir=None,
    **overrides,
) -> dict[str, TrainResult]:
    """:func:`train` for each method on the same data (tokenised once); output_dir/<method> each."""
    cfg = _config(config, overrides)
    encoder, tokenizer = _load_encoder(backbone)
    if data is None:
        data = _default_data(source, eval_source, columns, tokenizer, cfg)
    results = {}
    for m in methods:
        key = method_key(m)
        out = None if output_dir is None else Path(output_dir) / key
        results[key] = train(cfg, data=data, backbone=(encoder, tokenizer), output_dir=out, method=key)
    return results


def meta_train(config: TrainConfig | None = None, *, data: TrainData, backbone=None, output_dir=None, **overrides):
    """Steps 1-3 alone (typicality, MFT epochs, heads dropped): returns the meta-learned encoder
    (the backbone's class, without its pooler), e.g. to fine-tune it with your own trainer."""
    cfg = _config(config, overrides)
    if cfg.method not in MFT_METHODS:
        raise ValueError(f"meta_train runs an MFT method (dc, tw, full), not {cfg.method!r}")
    dist = Dist(cfg.device)
    torch.manual_seed(cfg.seed)
    encoder, tokenizer = _load_encoder(backbone)
    return MethodRun(cfg, encoder, tokenizer, data, RunStore(output_dir, dist), dist).meta_learn()
