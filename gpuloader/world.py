"""Who this process is in a torch.distributed job, and the few collectives the loader needs.

``World.detect(distributed)`` reads the initialised default process group; tests build
``World(rank, world_size)`` directly (a single-process world needs no process group).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gpuloader.errors import ArgumentError


@dataclass(frozen=True)
class World:
    """Rank and size of the data-parallel group; ``use_collectives`` is False for one process."""

    rank: int = 0
    world_size: int = 1
    use_collectives: bool = False

    @classmethod
    def detect(cls, distributed: bool) -> "World":
        """The default process group's rank/size when ``distributed``; else a world of one."""
        if not distributed:
            return cls()
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ArgumentError(
                "distributed=True needs an initialised torch.distributed process group; call "
                "torch.distributed.init_process_group(...) first (e.g. under torchrun), or pass "
                "distributed=False")
        return cls(dist.get_rank(), dist.get_world_size(), dist.get_world_size() > 1)

    def _reduce(self, value: int, op: str) -> int:
        if not self.use_collectives:
            return value
        import torch.distributed as dist

        backend = dist.get_backend()
        device = (torch.device("cuda", torch.cuda.current_device())
                  if backend == "nccl" else torch.device("cpu"))
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return int(t.item())

    def min(self, value: int) -> int:
        """The smallest ``value`` over all ranks (a collective: every rank must call it)."""
        return self._reduce(value, "MIN")

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (a collective)."""
        return bool(self._reduce(int(flag), "MAX"))
