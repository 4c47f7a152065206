"""The encoder's precision (issue 32): native-bf16 detection, the default, the int8 linear layer
against a float64 product, and bf16/int8 typicality of a tiny BERT against the float64 oracle.

Tolerances (absolute, on typicality in [-1, 1]): fp32 1e-5; bf16 2e-2 (the dtype table's bf16
atol of 1e-2, doubled: two bf16-rounded encoder layers before the cosine); int8 5e-2 (8-bit
weights and activations: about 1/127 relative per product, over two layers)."""

import numpy as np
import pytest
import torch

from fastmft.runtime import precision as P
from tests.oracles import pool64, prototypes64, typicality64

TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "int8": 5e-2}


def cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n")
    return path


@pytest.mark.parametrize(
    "flags, native",
    [("avx512f avx512_vnni", False), ("avx512f avx512_bf16", True), ("amx_tile amx_bf16", True), ("avx2", False)],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    assert P.cpu_has_native_bf16(cpuinfo(tmp_path, flags)) is native


def test_no_cpuinfo_means_no_native_bf16(tmp_path):
    assert P.cpu_has_native_bf16(tmp_path / "missing") is False


def test_default_precision_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: True)
    assert P.default_precision(cpu) == "bf16" and P.resolve_precision(None, cpu) == "bf16"
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: False)
    assert P.default_precision(cpu) == "fp32" and P.resolve_precision(None, cpu) == "fp32"
    assert P.default_precision(torch.device("cuda")) == "bf16"
    assert P.resolve_precision("int8", cpu) == "int8"


def test_bad_precisions_are_refused():
    with pytest.raises(ValueError, match="`precision` must be one of fp32, bf16, int8"):
        P.resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="int8 is a CPU mode"):
        P.resolve_precision("int8", torch.device("cuda"))


def test_quantize_is_an_alias_of_precision_int8():
    assert P.merge_quantize_alias(None, "int8") == "int8"
    assert P.merge_quantize_alias("int8", "int8") == "int8"
    assert P.merge_quantize_alias("bf16", None) == "bf16"
    with pytest.raises(ValueError, match="contradicts `precision` bf16"):
        P.merge_quantize_alias("bf16", "int8")


@pytest.mark.parametrize("rows", [3, 17, 200])
def test_int8_linear_against_float64_product(rows):
    g = torch.Generator().manual_seed(rows)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g))
        linear.bias.copy_(torch.randn(48, generator=g))
    x = torch.randn(2, rows, 64, generator=g)
    x[0, 0] *= 50  # an outlier token: per-token scales keep it from flattening the other rows
    q = P.quantize_int8(torch.nn.Sequential(linear))
    assert type(q[0]) is P.Int8Linear and q[0].weight_int8.dtype == torch.int8
    assert type(linear) is torch.nn.Linear  # the caller's model is left alone
    with torch.no_grad():
        got = q(x).double()
        w, b = linear.weight.double(), linear.bias.double()
    want = x.double() @ w.T + b
    # per output: |error| <= (|x| . |w|) * (1/127 + 1/127) / 2 for round-to-nearest on both sides
    bound = (x.double().abs() @ w.abs().T) / 127
    assert bool(((got - want).abs() <= bound + 1e-5).all())
    # and well inside it on average: a wrong scale (e.g. per tensor) fails this on the outlier-free rows
    rel = (got - want)[1].abs().mean() / want[1].abs().mean()
    assert float(rel) < 0.01


@pytest.fixture(scope="module")
def tiny_data():
    """A tiny random BERT, a tokenised dataset of 3 domains x 2 labels, and the float64 oracle's
    typicality (float64 encoder, pool64, prototypes64, typicality64)."""
    import datasets
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        add_pooling_layer=False,
    ).eval()
    g = torch.Generator().manual_seed(1)
    n = 60
    lengths = torch.randint(4, 20, (n,), generator=g)
    ids = [torch.randint(5, 50, (int(t),), generator=g).tolist() for t in lengths]
    labels, domains = torch.arange(n) % 2, (torch.arange(n) // 2) % 3
    ds = datasets.Dataset.from_dict(
        {
            "input_ids": ids,
            "attention_mask": [[1] * len(r) for r in ids],
            "length": [len(r) for r in ids],
            "labels": labels.tolist(),
            "domains": domains.tolist(),
        }
    )
    ref = model.double()
    width = int(lengths.max())
    batch = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, r in enumerate(ids):
        batch[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        emb = pool64([ref(input_ids=batch, attention_mask=mask).last_hidden_state], mask, False)[0]
    centers, counts = prototypes64(emb, labels, domains, 2, 3)
    want = typicality64(emb, labels, domains, centers, counts, alpha=0.5)
    return model.float(), ds, np.asarray(want)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_typicality_per_precision_against_float64(tiny_data, precision):
    from fastmft.pipelines.typicality import score_dataset

    model, ds, want = tiny_data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = score_dataset(model, ds, 2, 3, batch_size=16, device="cpu", progress=False, precision=precision)
    assert got.scores.dtype == torch.float32 and got.embeddings.dtype == torch.float32
    err = np.abs(got.scores.numpy() - want).max()
    assert err <= TOLERANCE[precision], f"{precision}: max |error| {err:.2e}"
    if precision != "fp32":  # not trivially equal: the mode really ran in lower precision
        assert err > 1e-6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left alone
