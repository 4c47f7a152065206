"""Embeddings E(x): the encoder over length-bucketed, padded batches (:class:`LengthBucketSampler`,
:class:`Collator`), the last layer masked-mean pooled (docs/design.md, section 2), kept in float32
(fp16 would turn pooled values above 65504 into inf)."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import datasets
import torch
from tqdm.auto import tqdm

from fastmft.data import MODEL_INPUTS, Collator, LengthBucketSampler
from fastmft.ops.functional import masked_mean_pool
from fastmft.runtime.precision import encoder_autocast


def length_batches(
    rows: Sequence[dict],
    lengths: Sequence[int],
    batch_size: int,
    collate: Collator,
    *,
    window_batches: int = 50,
    longest_first: bool = False,
) -> Iterable[tuple[list[int], dict[str, torch.Tensor]]]:
    """(row positions, padded batch) per batch of ``rows`` (tokenised rows, ``rows[i]`` a mapping),
    in length-sorted windows of ``window_batches`` batches."""
    sampler = LengthBucketSampler(
        lengths, batch_size, window_batches=window_batches, shuffle=False, longest_first=longest_first
    )
    for positions in sampler:
        yield positions, collate([rows[p] for p in positions])


def embed_batches(
    model,
    batches: Iterable[tuple[Sequence[int], dict[str, torch.Tensor]]],
    out: torch.Tensor,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
    *,
    precision: str = "fp32",
) -> torch.Tensor:
    """Write the pooled float32 embedding of every row of ``batches`` into ``out`` [N, D] (CPU)
    at its position; ``on_batch(rows)`` after each batch. The encoder runs in ``precision``
    (prepared by :func:`fastmft.runtime.precision.prepare_encoder`); its last layer is pooled in
    float32, so a bf16 encoder's states are rounded once, not their mean again."""
    with torch.inference_mode():
        for positions, batch in batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with encoder_autocast(precision, device):
                hidden = model(**batch).last_hidden_state
            out[torch.as_tensor(positions)] = masked_mean_pool(hidden.float(), batch["attention_mask"]).cpu()
            if on_batch is not None:
                on_batch(len(positions))
    return out


def embed(
    model,
    dataset: datasets.Dataset,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    pad_token_id: int = 0,
    progress: bool = True,
    precision: str = "fp32",
) -> torch.Tensor:
    """Embeddings E(x) [N, D] float32 in dataset order of a tokenised dataset (its ``length``
    column sorts the batches); the encoder (prepared for ``precision``) runs in ``precision``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    wanted = [c for c in MODEL_INPUTS if c in dataset.column_names]
    rows = dataset.select_columns(wanted)
    out = torch.empty(len(dataset), model.config.hidden_size, dtype=torch.float32)
    with tqdm(total=len(dataset), desc="embedding", unit="row", disable=not progress) as bar:
        batches = length_batches(rows, dataset["length"], batch_size, Collator(pad_token_id))
        return embed_batches(model, batches, out, device, bar.update, precision=precision)
