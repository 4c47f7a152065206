"""fastmft.pipelines.selection.utility.TaskUtilityScorer against the slow deepcopy-based computation
(benchmarks/baselines/clone_utility.py), on a tiny BERT."""

import gc
import math
import os
import weakref

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import fastmft
from benchmarks.baselines.clone_utility import clone_task_utility
from fastmft.ops.inner_step import NonFiniteError
from fastmft.pipelines.selection import TaskUtilityScorer, hf_loss
from tests.oracles import inner_step64

VOCAB, LABELS = 100, 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=LABELS,
    )
    return BertForSequenceClassification(cfg).eval()  # eval: no dropout, deterministic


def batch(gen, n=4, t=12):
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, t // 2 :] = 0
    return dict(
        input_ids=torch.randint(0, VOCAB, (n, t), generator=gen),
        attention_mask=mask,
        labels=torch.randint(0, LABELS, (n,), generator=gen),
    )


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_equals_clone_based_utility(model):
    gen = torch.Generator().manual_seed(1)
    sources = [[batch(gen) for _ in range(2)] for _ in range(2)]
    targets = [batch(gen) for _ in range(2)]
    before = snapshot(model)
    scorer = TaskUtilityScorer(model, hf_loss, lr=0.05)
    got = scorer.utilities(sources, targets)
    want = [clone_task_utility(model, hf_loss, s, targets, 0.05) for s in sources]
    for a, b in zip(got, want):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7), (got, want)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "the scorer wrote the model"
    assert all(p.grad is None for p in model.parameters()), "the scorer left .grad behind"
    assert scorer.utilities({"a": sources[0]}, targets) == {"a": got[0]}
    # u(s) is the sum of per-batch scores, each -(sum of target losses at theta')
    assert math.isclose(scorer(sources[1], targets), sum(scorer.score(b, targets) for b in sources[1]), rel_tol=1e-12)


def dense_theta_prime(model, src, lr):
    """theta - lr * grad in float64 (the oracle) from the dense autograd gradient."""
    params = list(model.parameters())
    grads = torch.autograd.grad(hf_loss(model, src), params, allow_unused=True)
    return inner_step64(params, grads, lr), grads


TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def test_theta_prime_is_the_inner_step(model):
    gen = torch.Generator().manual_seed(2)
    src = batch(gen)
    scorer = TaskUtilityScorer(model, None, lr=0.1)
    adapted = scorer.step(src)
    want64, grads = dense_theta_prime(model, src, 0.1)
    want = fastmft.ops.reference.inner_step(list(model.parameters()), grads, 0.1, None)
    for (name, got), w, w64 in zip(adapted.items(), want, want64):
        if any(t in name for t in TABLES):
            # row-sparse step: the rows' gradient sums may add in another order than the dense one
            torch.testing.assert_close(got.double(), w64, rtol=1e-6, atol=1e-8, msg=name)
        else:
            assert torch.equal(got, w), name  # the dense step is the reference's arithmetic, bit for bit


def test_row_sparse_tables_across_steps_and_updates(model):
    """theta' of an embedding table after a sequence of steps on other rows, and after the model's
    parameters changed in place in between (the selector trains between episodes)."""
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=64,
        num_labels=LABELS,
    )
    model = BertForSequenceClassification(cfg).eval()
    gen = torch.Generator().manual_seed(9)
    scorer = TaskUtilityScorer(model, None, lr=0.5)
    dense = TaskUtilityScorer(model, None, lr=0.5, sparse_embeddings=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    word = model.bert.embeddings.word_embeddings
    for step in range(5):
        src = batch(gen, n=2, t=5)  # 10 tokens of 100 rows: each step touches other rows
        adapted = dict(scorer.step(src))
        assert not word.sparse, "the module's sparse flag was not restored"
        want64, _ = dense_theta_prime(model, src, 0.5)
        for (name, got), w64 in zip(adapted.items(), want64):
            torch.testing.assert_close(got.double(), w64, rtol=1e-6, atol=1e-8, msg=f"step {step} {name}")
        targets = [batch(gen, n=2, t=5)]
        assert math.isclose(scorer.score(src, targets), dense.score(src, targets), rel_tol=1e-6)
        if step % 2:  # an in-place update of every parameter: theta' must follow the new theta
            opt.zero_grad()
            hf_loss(model, batch(gen)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def test_tied_embedding_takes_the_dense_step():
    """BertForMaskedLM ties its decoder to the word embeddings: their gradient comes back dense."""
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=64,
    )
    model = BertForMaskedLM(cfg).eval()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    gen = torch.Generator().manual_seed(10)

    def mlm_batch():
        ids = torch.randint(0, VOCAB, (3, 6), generator=gen)
        labels = torch.where(torch.rand(3, 6, generator=gen) < 0.5, ids, torch.full_like(ids, -100))
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)

    sources, targets = [mlm_batch(), mlm_batch()], [mlm_batch()]
    got = TaskUtilityScorer(model, None, lr=0.3).utility(sources, targets)
    want = clone_task_utility(model, None, sources, targets, 0.3)
    assert math.isclose(got, want, rel_tol=1e-6), (got, want)


def test_frozen_parameters_and_subsets(model):
    gen = torch.Generator().manual_seed(3)
    sources, targets = [batch(gen)], [batch(gen), batch(gen)]
    names = [n for n, _ in model.named_parameters() if "classifier" in n or "layer.1." in n]
    scorer = TaskUtilityScorer(model, None, lr=0.2, params=names)
    assert len(scorer.flat) == len(names)
    got = scorer.utility(sources, targets)
    want = clone_task_utility(model, None, sources, targets, 0.2, params=names)
    assert math.isclose(got, want, rel_tol=1e-6)
    with pytest.raises(ValueError):
        TaskUtilityScorer(model, None, params=["nope"])


def test_no_leaked_graph_and_flat_memory(model):
    gen = torch.Generator().manual_seed(4)
    sources, targets = [batch(gen) for _ in range(2)], [batch(gen) for _ in range(2)]
    losses = []

    def loss_fn(m, b):
        loss = hf_loss(m, b)
        losses.append(weakref.ref(loss))
        return loss

    scorer = TaskUtilityScorer(model, loss_fn, lr=0.05)
    ptrs = [b.data_ptr() for b in scorer.flat.buffers.values()]
    first = scorer.utility(sources, targets)
    for _ in range(3):
        assert scorer.utility(sources, targets) == first  # deterministic, no state carried over
    gc.collect()
    assert len(losses) == 4 * 2 * (1 + 2) and all(r() is None for r in losses), (
        "a loss (and its graph) outlived the call"
    )
    assert [b.data_ptr() for b in scorer.flat.buffers.values()] == ptrs
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    loss = scorer.target_loss(targets)
    assert loss.grad_fn is None and not loss.is_inference()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_rss_flat_across_calls():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=LABELS,
    )
    model = BertForSequenceClassification(cfg).eval()
    gen = torch.Generator().manual_seed(5)
    sources, targets = [batch(gen)], [batch(gen)]
    scorer = TaskUtilityScorer(model, None, lr=0.05)

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    for _ in range(3):
        scorer.utility(sources, targets)
    before = rss()
    for _ in range(12):
        scorer.utility(sources, targets)
    assert rss() - before < 4 * 2**20


def test_nonfinite_policy(model):
    gen = torch.Generator().manual_seed(6)
    src, targets = batch(gen), [batch(gen)]

    # A finite lr (an infinite one is refused) times gradients near 1e29 overflows float32:
    # theta' holds inf (or NaN).
    def loss_fn(mod, b):
        return mod(**b).loss * 1e30

    with pytest.raises(NonFiniteError):
        TaskUtilityScorer(model, loss_fn, lr=1e10).score(src, targets)
    assert TaskUtilityScorer(model, loss_fn, lr=1e10, nonfinite="-inf").score(src, targets) == float("-inf")
    with pytest.raises(ValueError):
        TaskUtilityScorer(model, None, nonfinite="skip")


def test_custom_loss_fn_sees_module_attributes(model):
    gen = torch.Generator().manual_seed(7)
    seen = []

    def loss_fn(m, b):
        seen.append(m.config.num_labels)  # attribute access works at theta and at theta'
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits, b["labels"])

    scorer = TaskUtilityScorer(model, loss_fn, lr=0.05)
    got = scorer.utility([batch(gen)], [batch(gen)])
    assert math.isfinite(got) and seen == [LABELS, LABELS]


def test_backend_torch_gives_the_same_utility(model):
    gen = torch.Generator().manual_seed(8)
    sources, targets = [batch(gen), batch(gen)], [batch(gen)]
    fused = TaskUtilityScorer(model, None, lr=0.05).utility(sources, targets)
    with fastmft.use_backend("torch"):
        ref = TaskUtilityScorer(model, None, lr=0.05).utility(sources, targets)
    assert fused == ref
