"""The process group the trainer and ``fastmft score`` run in: torchrun's environment
(WORLD_SIZE, RANK, LOCAL_RANK) or a single process. One place for device choice and collectives."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor

# Ranks wait at barriers while another rank encodes or evaluates a long shard: the default
# collective timeout (10-30 min) would kill healthy long runs.
TIMEOUT = datetime.timedelta(hours=12)


def is_main_process() -> bool:
    """Whether this process is rank 0 of torchrun's group (or the only process), before or
    without joining the group: the one that prints."""
    return int(os.environ.get("RANK", "0")) == 0


def pick_device(name: str | None) -> torch.device:
    """``name`` as given; ``"cuda"`` without an index (or None with CUDA present) is cuda:LOCAL_RANK.
    A name torch does not know, or a CUDA device this machine lacks, is a ValueError naming `device`."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"`device` {name!r} is not a device torch knows (cpu, cuda, cuda:1, mps, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"`device` {name!r}: this torch build or machine has no CUDA device")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"`device` {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if name and name != "cuda":
        return device
    if name == "cuda" or torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


class Dist:
    """Rank, world size and device of this process; joins torchrun's group when WORLD_SIZE > 1
    (NCCL on CUDA, gloo otherwise) unless the caller already initialised one."""

    def __init__(self, device: str | None = None):
        self.device = pick_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL collectives use the current device
        self.owned = False
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=TIMEOUT)
            self.owned = True
        joined = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if joined else (0, 1)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, x: Tensor) -> Tensor:
        """The sum of ``x`` over ranks (a copy; ``x`` itself is left alone)."""
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
        return x

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast_obj(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Leave the group if this object created it."""
        if self.owned:
            dist.destroy_process_group()
            self.owned = False
