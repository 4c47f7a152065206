"""Typicality scoring of a dataset with an encoder (the paper's first step): embed every row once
(masked mean pooling of the last layer), build the prototypes, then score each row."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch
from tqdm.auto import tqdm

from fastmft.data import MODEL_INPUTS, Collator, LengthBucketSampler
from fastmft.ops.functional import masked_mean_pool, typicality
from fastmft.ops.prototypes import (
    MultiPrototypes,
    Prototypes,
    class_prototypes,
    multi_prototypes,
)


@dataclass
class TypicalityScores:
    scores: torch.Tensor  # [N] float32, in dataset order
    embeddings: torch.Tensor  # [N, D] float32
    prototypes: Prototypes | MultiPrototypes


@torch.inference_mode()
def embed(
    model,
    dataset: datasets.Dataset,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    pad_token_id: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Embeddings E(x) [N, D] float32 in dataset order: masked mean of the last layer's token
    states. Batches are length-bucketed (padding is what costs time on long-tailed text)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    sampler = LengthBucketSampler(dataset["length"], batch_size, shuffle=False)
    collate = Collator(pad_token_id)
    wanted = [c for c in MODEL_INPUTS if c in dataset.column_names]
    out = torch.empty(len(dataset), model.config.hidden_size, dtype=torch.float32)
    with tqdm(total=len(dataset), desc="embedding", unit="row", disable=not progress) as bar:
        for indices in sampler:
            rows = dataset.select(indices).select_columns(wanted)
            batch = {k: v.to(device) for k, v in collate(list(rows)).items()}
            hidden = model(**batch).last_hidden_state
            out[indices] = masked_mean_pool(hidden, batch["attention_mask"]).float().cpu()
            bar.update(len(indices))
    return out


def score_dataset(
    model,
    dataset: datasets.Dataset,
    num_labels: int,
    num_domains: int,
    *,
    alpha: float = 0.5,
    num_prototypes: int = 1,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    pad_token_id: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> TypicalityScores:
    """Typicality of every row of a tokenised dataset with integer ``labels`` and ``domains``."""
    emb = embed(model, dataset, batch_size=batch_size, device=device, pad_token_id=pad_token_id, progress=progress)
    labels = torch.tensor(dataset["labels"], dtype=torch.long)
    domains = torch.tensor(dataset["domains"], dtype=torch.long)
    if num_prototypes == 1:
        protos = class_prototypes(emb, labels, domains, num_labels, num_domains)
    else:
        g = torch.Generator().manual_seed(seed)
        protos = multi_prototypes(emb, labels, domains, num_labels, num_domains, num_prototypes, generator=g)
    return TypicalityScores(typicality(emb, labels, domains, protos, alpha=alpha), emb, protos)
