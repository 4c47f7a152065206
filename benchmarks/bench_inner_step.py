"""The functional inner step theta' = theta - lr * grad over a whole encoder's parameters.

Parameter sets: the parameter shapes of a Hugging Face BertModel built from a BertConfig (no
weights, no download): BERT-base (199 tensors, 109.5M values), all-MiniLM-L6 (101 tensors,
22.7M) and, at quick scale, a 2-layer BERT (bert-tiny, 4.4M). Theta and grad are separate
tensors, one allocation each (scattered, as a module's parameters and autograd's grads are).

Providers (same tensors, timed interleaved):
- ``fastmft-C``: ``fastmft.inner_step(params, grads, lr, out=FlatParams)`` through dispatch, i.e.
  the compiled extension fastmft._C (one OpenMP pass on CPU, a multi-tensor CUDA kernel on GPU),
  writing theta' into one persistent flat buffer. Only yielded where the extension is available.
- ``torch-foreach``: ``torch._foreach_add(params, grads, alpha=-lr)`` (out of place, new tensors).
- ``torch-foreach-inplace``: ``torch._foreach_add_(params, grads, alpha=-lr)``: the in-place update an
  optimizer does, the least traffic torch's multi-tensor path has (theta drifts by lr x grad per
  call; the timing does not depend on the values).
- ``torch-loop``: a per-tensor Python loop of ``torch.add(p, g, alpha=-lr)``.
- ``clone-update``: learn2learn-style: ``copy.deepcopy(module)`` then ``p.add_(g, alpha=-lr)`` per
  parameter of the clone.
- ``torch-add-flat``: the ceiling: one ``torch.add`` over pre-flattened theta and grad buffers
  into a preallocated flat output (a layout the other providers do not get for free).

``bytes`` = read theta + read grad + write theta' = 3 x element size x values (12 B per fp32
value), the minimum any provider moves. Goal (issue 4, CPU): fastmft-C >= 90 % of the
torch-add-flat bandwidth in the same run (about 1.4x torch-foreach); on a GPU >= 85 % of the copy
ceiling.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch

from benchmarks.harness import Case, copies_needed, rotating

LR = 1e-3

MODELS = {
    "bert-tiny": dict(
        vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512
    ),
    "minilm": dict(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    ),
    "bert-base": dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def bert_module(model: str, device: torch.device | str = "meta"):
    """A BertModel with ``model``'s shapes; on "meta" nothing is allocated."""
    from transformers import BertConfig, BertModel

    config = BertConfig(**MODELS[model], max_position_embeddings=512)
    with torch.device("meta"):
        module = BertModel(config, add_pooling_layer=True)
    if torch.device(device).type != "meta":
        module = module.to_empty(device=device)
    return module


def parameter_shapes(model: str) -> list[torch.Size]:
    return [p.shape for p in bert_module(model).parameters()]


def sizes(scale: str, device: torch.device) -> list[tuple[str, torch.dtype]]:
    if scale == "quick":
        return [("bert-tiny", torch.float32)]
    return [(model, dtype) for model in ("minilm", "bert-base") for dtype in (torch.float32, torch.bfloat16)]


class _Set:
    """One input set: a module whose parameters are theta, grads, a FlatParams, flat copies."""

    def __init__(self, model: str, dtype: torch.dtype, device: torch.device, seed: int):
        import fastmft

        gen = torch.Generator(device=device).manual_seed(seed)
        self.module = bert_module(model, device).to(dtype).requires_grad_(False)
        self.params = list(self.module.parameters())
        for p in self.params:
            p.normal_(0, 0.02, generator=gen)
        self.grads = [torch.empty_like(p).normal_(0, 1e-3, generator=gen) for p in self.params]
        self.flat = fastmft.FlatParams(self.params, copy=False)
        self.flat_p = torch.cat([p.reshape(-1) for p in self.params])
        self.flat_g = torch.cat([g.reshape(-1) for g in self.grads])
        self.flat_o = torch.empty_like(self.flat_p)


def _clone_update(module: torch.nn.Module, grads: list[torch.Tensor]) -> torch.nn.Module:
    clone = copy.deepcopy(module)
    with torch.no_grad():
        for p, g in zip(clone.parameters(), grads):
            p.add_(g, alpha=-LR)
    return clone


def cases(scale: str, device: torch.device) -> Iterable[Case]:
    import fastmft
    from fastmft import _C

    fused = _C.is_available(device)
    for model, dtype in sizes(scale, device):
        shapes = parameter_shapes(model)
        n = sum(s.numel() for s in shapes)
        esize = torch.empty((), dtype=dtype).element_size()
        nbytes = 3 * n * esize
        sets = [_Set(model, dtype, device, seed) for seed in range(copies_needed(2 * n * esize, device, max_copies=4))]
        size = dict(model=model, tensors=len(shapes), N=n, dtype=DTYPE_NAMES[dtype])
        providers = []
        if fused:
            providers.append(("fastmft-C", lambda s: fastmft.inner_step(s.params, s.grads, LR, out=s.flat)))
        providers += [
            ("torch-foreach", lambda s: torch._foreach_add(s.params, s.grads, alpha=-LR)),
            ("torch-foreach-inplace", lambda s: torch._foreach_add_(s.params, s.grads, alpha=-LR)),
            ("torch-loop", lambda s: [torch.add(p, g, alpha=-LR) for p, g in zip(s.params, s.grads)]),
            ("clone-update", lambda s: _clone_update(s.module, s.grads)),
            ("torch-add-flat", lambda s: torch.add(s.flat_p, s.flat_g, alpha=-LR, out=s.flat_o)),
        ]
        yield [
            Case(op="inner_step", provider=provider, mode="step", size=size, fn=rotating(sets, fn), bytes=nbytes)
            for provider, fn in providers
        ]
