"""fastmft.integrations.transformers: MFTTrainer trains MFTModel (a tiny BERT) through the fused ops,
and W processes under torchrun give the one-process result."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastmft
from fastmft.ops import triton as triton_ops
from tests.helpers import DEVICE, assert_close
from tests.oracles import mft_loss64

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it

from fastmft.integrations.transformers import MFTTrainer, global_corrupted_domains  # noqa: E402
from tests.integrations.trainer_worker import ToyRows, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.gpu
def test_trainer_trains_tiny_bert_with_mft_loss_through_triton(tmp_path, monkeypatch):
    calls = {"masked_mean_pool": 0, "multi_head_cross_entropy": 0}
    registry = fastmft.ops.dispatch._registry
    for name in calls:
        original = getattr(triton_ops, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setitem(registry, (name, "triton"), dataclasses.replace(registry[(name, "triton")], fn=spy))

    torch.manual_seed(0)
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=DEVICE.type == "cpu",
        report_to=[],
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = MFTTrainer(model=model, args=args, train_dataset=ToyRows(16))
    with fastmft.use_backend("triton"):
        result = trainer.train()
    assert result.global_step == 3
    assert torch.isfinite(torch.tensor(result.training_loss))
    # 3 steps: one pooling launch and two cross-entropy calls (label + domain loss) per step.
    assert calls == {"masked_mean_pool": 3, "multi_head_cross_entropy": 6}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n].to(p.device))}
    for head in (
        "mft.label_head.weight",
        "mft.domain_heads.0.weight",
        "mft.domain_embedding.weight",
        "encoder.encoder.layer.0.attention.self.query.weight",
    ):
        assert head in changed, f"{head} did not train"


def _train(tmp_path: Path, name: str, processes: int, rows: int, *extra: str) -> dict:
    out = tmp_path / name / "params.safetensors"
    out.parent.mkdir()
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [sys.executable, *(launcher if processes > 1 else []), "-m", "tests.integrations.trainer_worker"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, str(out), str(rows), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    from safetensors.torch import load_file

    return load_file(out)


@pytest.mark.slow
def test_two_processes_over_gloo_give_the_one_process_result(tmp_path):
    one = _train(tmp_path, "one", 1, 8)
    two = _train(tmp_path, "two", 2, 4)
    start = tiny_model().state_dict()  # the same seed: what training started from
    assert one.keys() == two.keys() == start.keys()
    for name in one:
        # fp32, 4 SGD steps; only the order of float sums differs (one batch mean against DDP's
        # average of two half-batch means)
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(one["mft.domain_heads.0.weight"], start["mft.domain_heads.0.weight"])
    # The control: each process corrupting only its own rows trains something else, so the
    # comparison above can fail.
    local = _train(tmp_path, "local", 2, 4, "--local-corruption")
    assert (local["mft.domain_heads.0.weight"] - one["mft.domain_heads.0.weight"]).abs().max() > 1e-3


def _gather_worker(rank, init_file, domains, sizes, seed, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        start = sum(sizes[:rank])
        got = global_corrupted_domains(domains[start : start + sizes[rank]], torch.Generator().manual_seed(seed))
        out[start : start + sizes[rank]].copy_(got)
    finally:
        dist.destroy_process_group()


def test_global_corruption_is_one_permutation_of_every_process_rows(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    domains = torch.randint(0, 5, (13,), generator=torch.Generator().manual_seed(seed))
    sizes = [8, 5]  # unequal: the last batch of an epoch
    out = torch.full((13,), -1, dtype=torch.int64).share_memory_()
    mp.spawn(_gather_worker, args=(str(tmp_path / "init"), domains, sizes, seed, out), nprocs=2, join=True)
    expected = fastmft.shuffle_domains(domains, torch.Generator().manual_seed(seed))
    assert torch.equal(out, expected)
    assert torch.equal(global_corrupted_domains(domains, torch.Generator().manual_seed(seed)), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mft_loss_triton_matches_torch(dtype):
    """MFTLoss through the Triton kernels gives the oracle's loss, and the reference's loss and gradients."""

    g = torch.Generator().manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    B, T, D = 5, 11, 24
    hidden = [torch.randn(B, T, D, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(4)]
    mask = (torch.arange(T)[None] < torch.randint(2, T + 1, (B,), generator=g)[:, None]).long().to(DEVICE)
    labels = torch.randint(0, 3, (B,), generator=g)
    domains = torch.randint(0, 2, (B,), generator=g)
    corrupted = fastmft.shuffle_domains(domains, g).to(DEVICE)
    labels, domains = labels.to(DEVICE), domains.to(DEVICE)
    typ = torch.rand(B, generator=g).to(DEVICE)
    loss_fn = fastmft.MFTLoss(D, 3, 2, layers=(1, 2, 3)).to(DEVICE, dtype)
    results = {}
    for name in ("torch", "triton"):
        for h in hidden:
            h.grad = None
        loss_fn.zero_grad()
        with fastmft.use_backend(name):
            out = loss_fn(tuple(hidden), mask, labels, domains, typicality=typ, corrupted=corrupted)
        out.loss.backward()
        results[name] = (
            out.loss.detach(),
            [h.grad.clone() for h in hidden[1:]],
            loss_fn.label_head.weight.grad.clone(),
        )
    (l0, g0, w0), (l1, g1, w1) = results["torch"], results["triton"]
    assert_close(l1, mft_loss64(loss_fn, hidden, mask, labels, domains, typ, corrupted)[0], dtype)
    assert_close(l1, l0, dtype)
    assert_close(w1, w0, dtype)
    for a, b in zip(g1, g0):
        assert_close(a, b, dtype)


def test_typicality_and_domains_come_from_dataset_columns(tmp_path):
    # A datasets.Dataset with a text column the model does not take: the Trainer drops it and keeps
    # domains and typicality (forward arguments). With every t = 0 both losses weigh nothing, so a
    # loss of exactly 0 shows the column reached the loss; t = 1 trains.
    datasets = pytest.importorskip("datasets")
    rows = ToyRows(16)
    columns = {k: [rows[i][k].tolist() for i in range(len(rows))] for k in rows[0]}
    columns["text"] = [f"row {i}" for i in range(len(rows))]
    losses = {}
    for t in (0.0, 1.0):
        data = datasets.Dataset.from_dict({**columns, "typicality": [t] * len(rows)})
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(t)), use_cpu=True, report_to=[], max_steps=2, per_device_train_batch_size=8,
            save_strategy="no", disable_tqdm=True,
        )  # fmt: skip
        losses[t] = MFTTrainer(model=tiny_model(), args=args, train_dataset=data).train().training_loss
    assert losses[0.0] == 0.0 and losses[1.0] > 0.1
