"""End to end: one MFT training step (encoder forward with all hidden states, MFT loss, backward,
AdamW step) on a Hugging Face BertModel built from a BertConfig (random weights, no download).

Providers, all on the same model shape, the same batches and the same optimizer:
- ``fastmft``: :class:`fastmft.MFTLoss` (fused ops on CUDA through dispatch), each batch padded
  to its own longest sequence (the length-aware collate of fastmft's data layer);
- ``fastmft-maxpad``: the same loss on batches padded to the max length (isolates the loss from
  the padding policy);
- ``hf-eager``: the plain Hugging Face baseline of benchmarks/baselines/hf_mft.py, eager PyTorch
  ops, batches padded to the max length.

One timed call is a slice of an epoch: W consecutive training steps (W = 4 on quick and on CPU,
8 on full scale on CUDA) over W x B examples whose lengths follow a skewed distribution like real review text
(log-normal, median about a third of the max length, clipped to [8, max_len]). The fastmft
provider sees them as fastmft's length-bucketed sampler makes them (the window of W x B examples
sorted by length, then cut into W batches); the max-padded providers get the same batches
(their cost does not depend on the grouping). A window of W batches is a small window, so the
bucketing gain shown here is conservative. ``flops`` counts the matmul work on the *valid* tokens
only (3 x forward for a training step), so % of the matmul ceiling shows what padding wastes.
``items`` = W x B, so rows carry examples/s.
Mode ``train-fp32`` on CPU, ``train-bf16`` (autocast) on CUDA.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from benchmarks.baselines.hf_mft import HFMFTLoss, pad_batch
from benchmarks.harness import Case

NUM_LABELS, NUM_DOMAINS = 3, 4
WINDOW = {"quick": 4, "full": 8}  # training steps per timed call (4 on CPU at full scale)

MODELS = {
    "tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256),
    "minilm": dict(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    ),
    "bert-base": dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
}

PROVIDERS = ("fastmft", "fastmft-maxpad", "hf-eager")


def sizes(scale: str, device: torch.device) -> list[dict]:
    if scale == "quick":
        return [dict(model="tiny", batch=16, max_len=64), dict(model="tiny", batch=32, max_len=128)]
    if device.type == "cuda":
        return [
            dict(model="minilm", batch=32, max_len=128),
            dict(model="minilm", batch=64, max_len=256),
            dict(model="bert-base", batch=32, max_len=128),
            dict(model="bert-base", batch=32, max_len=512),
        ]
    return [dict(model="minilm", batch=8, max_len=128)]  # full scale on CPU: one MiniLM-shaped size


def sample_lengths(batch: int, max_len: int, generator: torch.Generator) -> torch.Tensor:
    """Skewed (log-normal) lengths, median about max_len / 3, clipped to [8, max_len]."""
    z = torch.randn(batch, generator=generator)
    lengths = torch.exp(math.log(max_len / 3) + 0.6 * z).round().long()
    return lengths.clamp(min=min(8, max_len), max=max_len)


def train_flops(cfg: dict, lengths: torch.Tensor) -> int:
    """Matmul FLOPs of a training step over the valid tokens: 3 x (2 x weights x tokens + attention)."""
    d, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    tokens = int(lengths.sum())
    per_token = layers * 2 * (4 * d * d + 2 * d * inter)
    attention = layers * 2 * 2 * d * int((lengths.double() ** 2).sum())
    return int(3 * (per_token * tokens + attention))


def _build(provider: str, cfg: dict, layers: tuple[int, ...], device: torch.device):
    from transformers import BertConfig, BertModel

    import fastmft

    torch.manual_seed(0)
    config = BertConfig(**cfg, max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    encoder = BertModel(config, add_pooling_layer=False).to(device).train()
    hidden = cfg["hidden_size"]
    if provider.startswith("fastmft"):
        loss_mod = fastmft.MFTLoss(hidden, NUM_LABELS, NUM_DOMAINS, layers=layers)
    else:
        loss_mod = HFMFTLoss(hidden, NUM_LABELS, NUM_DOMAINS, layers=layers)
    loss_mod = loss_mod.to(device).train()
    params = list(encoder.parameters()) + list(loss_mod.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=device.type == "cuda" or None)
    return encoder, loss_mod, optimizer


def make_batches(size: dict, cfg: dict, window: int, seed: int = 0) -> list[dict]:
    """``window`` batches of ``size["batch"]`` examples: lengths drawn for the whole window,
    sorted, then cut into batches (fastmft's length-bucketed sampler within one window)."""
    g = torch.Generator().manual_seed(seed)
    b, t = size["batch"], size["max_len"]
    lengths_all = sample_lengths(window * b, t, g)
    lengths_all = lengths_all[torch.argsort(lengths_all, stable=True)]
    out = []
    for w in range(window):
        lengths = lengths_all[w * b : (w + 1) * b]
        low = 1000 if cfg["vocab_size"] > 1000 else 1
        ids = torch.randint(low, cfg["vocab_size"], (b, t), generator=g)
        ids[:, 0] = 101 if cfg["vocab_size"] > 101 else 1  # [CLS]
        out.append(
            dict(
                ids=ids,
                lengths=lengths,
                labels=torch.randint(0, NUM_LABELS, (b,), generator=g),
                domains=torch.randint(0, NUM_DOMAINS, (b,), generator=g),
                typicality=torch.rand(b, generator=g),
                corrupted=torch.randint(0, NUM_DOMAINS, (b,), generator=g),
            )
        )
    return out


def provider_inputs(provider: str, batches: list[dict], max_len: int, device: torch.device) -> list[dict]:
    out = []
    for bt in batches:
        pad_to = int(bt["lengths"].max()) if provider == "fastmft" else max_len
        ids, mask = pad_batch(bt["ids"], bt["lengths"], pad_to)
        out.append(
            {
                **{k: v.to(device) for k, v in bt.items() if k not in ("ids", "lengths")},
                "input_ids": ids.to(device),
                "attention_mask": mask.to(device),
            }
        )
    return out


def make_step(provider: str, encoder, loss_mod, optimizer, device: torch.device):
    amp = device.type == "cuda"

    def step(batch: dict):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = encoder(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
            )
            args = (out.hidden_states, batch["attention_mask"], batch["labels"], batch["domains"])
            if provider.startswith("fastmft"):
                loss = loss_mod(*args, typicality=batch["typicality"], corrupted=batch["corrupted"]).loss
            else:
                loss = loss_mod(*args, typicality=batch["typicality"], corrupted=batch["corrupted"])[0]
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def cases(scale: str, device: torch.device) -> Iterable[Case]:
    import fastmft

    mode = "train-bf16" if device.type == "cuda" else "train-fp32"
    window = WINDOW[scale] if device.type == "cuda" else min(WINDOW[scale], 4)
    for size in sizes(scale, device):
        cfg = MODELS[size["model"]]
        layers = fastmft.skip_layers(cfg["num_hidden_layers"])
        batches = make_batches(size, cfg, window)
        flops = sum(train_flops(cfg, bt["lengths"]) for bt in batches)
        group: list[Case] = []  # the providers of one size, timed interleaved
        for provider in PROVIDERS:
            encoder, loss_mod, optimizer = _build(provider, cfg, layers, device)
            inputs = provider_inputs(provider, batches, size["max_len"], device)
            step = make_step(provider, encoder, loss_mod, optimizer, device)

            def fn(step=step, inputs=inputs):
                for batch in inputs:
                    loss = step(batch)
                return loss

            group.append(
                Case(
                    op="mft_step",
                    provider=provider,
                    mode=mode,
                    size=dict(size, steps=window),
                    fn=fn,
                    flops=flops,
                    items=window * size["batch"],
                )
            )
            del encoder, loss_mod, optimizer, inputs, step, fn
        yield group
        del group
