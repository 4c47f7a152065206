"""The pipeline in memory: a tokenised ``datasets.Dataset`` (what the trainer's typicality pass and
``fastmft typicality`` have) is embedded at once, then the shared prototypes and typicality run on
the embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch

from fastmft.ops.prototypes import MultiPrototypes, Prototypes
from fastmft.runtime.precision import prepare_encoder, resolve_precision

from .core import ScoreError, accumulate, cell_prototypes, check_finite, score_rows
from .embed import embed


@dataclass
class TypicalityScores:
    scores: torch.Tensor  # [N] float32, in dataset order
    embeddings: torch.Tensor  # [N, D] float32
    prototypes: Prototypes | MultiPrototypes


def score_dataset(
    model,
    dataset: datasets.Dataset,
    num_labels: int,
    num_domains: int,
    *,
    alpha: float = 0.5,
    num_prototypes: int = 1,
    temperature: float = 0.1,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    pad_token_id: int = 0,
    seed: int = 0,
    progress: bool = True,
    precision: str | None = "fp32",
) -> TypicalityScores:
    """Typicality of every row of a tokenised dataset with integer ``labels`` and ``domains``.
    ``precision`` is the encoder's (fp32, bf16: autocast, int8: a quantised copy on the CPU;
    :mod:`fastmft.runtime.precision`; None: the device's default); embeddings, prototypes and
    scores are float32 whatever it is.
    A non-finite embedding or score is a ScoreError naming the rows (by index)."""
    if precision != "fp32":
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        try:
            precision = resolve_precision(precision, dev)
        except ValueError as err:
            raise ScoreError(str(err)) from None
        model = prepare_encoder(model, precision, dev, cast_weights=False)
    emb = embed(
        model,
        dataset,
        batch_size=batch_size,
        device=device,
        pad_token_id=pad_token_id,
        progress=progress,
        precision=precision,
    )
    rows = range(len(dataset))
    check_finite(emb.numpy(), rows, "the encoder's embedding")
    labels = torch.tensor(dataset["labels"], dtype=torch.long)
    domains = torch.tensor(dataset["domains"], dtype=torch.long)
    dim = emb.shape[1]
    if num_prototypes == 1:
        protos = accumulate([(emb, labels, domains)], num_labels, num_domains, dim, emb.device).result()
    else:
        cells = domains * num_labels + labels

        def cell_rows(cell: int) -> torch.Tensor:
            return emb[cells == cell]

        protos = cell_prototypes(
            cell_rows, num_labels, num_domains, num_prototypes, dim, temperature=temperature, seed=seed
        )
    return TypicalityScores(score_rows(emb, labels, domains, protos, alpha=alpha, ids=rows), emb, protos)
