"""PrototypeAccumulator.all_reduce across 2 gloo processes equals one process over all rows."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastmft
from tests.helpers import assert_close


def _worker(rank, init_file, e, y, d, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        acc = fastmft.PrototypeAccumulator(3, 2, e.shape[1])
        acc.update(e[rank::2], y[rank::2], d[rank::2]).all_reduce()
        result = acc.result()
        out[rank].copy_(result.centers)
        if rank == 0:
            out[2].view(-1)[: result.counts.numel()].copy_(result.counts.view(-1).float())
    finally:
        dist.destroy_process_group()


def test_all_reduce_equals_single_process(tmp_path, rng):
    e = torch.randn(41, 5, generator=rng)
    y = torch.randint(0, 3, (41,), generator=rng)
    d = torch.randint(0, 2, (41,), generator=rng)
    out = torch.zeros(3, 2, 3, 5).share_memory_()
    mp.spawn(_worker, args=(str(tmp_path / "init"), e, y, d, out), nprocs=2, join=True)
    single = fastmft.class_prototypes(e, y, d, 3, 2)
    assert_close(out[0], single.centers.double(), torch.float32)
    assert torch.equal(out[0], out[1])
    assert torch.equal(out[2].view(-1)[:6].long().view(2, 3), single.counts)
