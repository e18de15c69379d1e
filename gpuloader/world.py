"""Who this process is in a torch.distributed job, and the few collectives the loader needs.

``World.detect(distributed, device=...)`` reads the initialised default process group; tests
build ``World(rank, world_size, ...)`` directly (a single-process world needs no process group)
and may pass a stand-in for ``torch.distributed`` as ``dist``.

NOTE(control-collectives): the loader agrees on a few control integers (the seed, the batch
size, "did any rank run out of memory") in every guarded step.  Under NCCL such a collective
needs a CUDA tensor: a pageable host-to-device copy and an ``.item()`` that waits for the GPU —
two host syncs per step, so the CPU can no longer run ahead of the GPU.  So the integers go
over a gloo group on the CPU instead (one per process, made once, shared by every loader).
Only where gloo is missing do they use NCCL, on the *loader's* device — never
``torch.cuda.current_device()``, which is GPU 0 for every rank that did not call
``torch.cuda.set_device`` (a hang, or NCCL's duplicate-GPU error).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from gpuloader.errors import ArgumentError

_CPU = torch.device("cpu")
#: The gloo group made for the default process group it was made under (NOTE(control-
#: collectives)); the group object is kept so a re-initialised default group gets a new one.
_CONTROL_GROUP: Dict[str, Any] = {"for": None, "group": None}


def _distributed() -> Any:
    import torch.distributed as dist

    return dist


def control_group(dist: Any) -> Any:
    """The gloo group the control integers are agreed over, or None to use the default group
    (it is gloo already, or gloo is not available).  Every rank must call this at the same
    point (it may create a group: a collective); the loader calls it at construction."""
    if dist.get_backend() == "gloo" or not dist.is_gloo_available():
        return None
    default = dist.group.WORLD
    if _CONTROL_GROUP["for"] is not default:
        _CONTROL_GROUP.update({"for": default, "group": dist.new_group(backend="gloo")})
    return _CONTROL_GROUP["group"]


@dataclass(frozen=True)
class World:
    """Rank and size of the data-parallel group; ``use_collectives`` is False for one process.

    ``device``: the loader's device, where an NCCL collective puts its tensor; ``group``: the
    process group of the control collectives (None: the default group); ``dist``: the
    ``torch.distributed`` module (a stand-in in tests).
    """

    rank: int = 0
    world_size: int = 1
    use_collectives: bool = False
    device: Optional[torch.device] = None
    group: Any = field(default=None, compare=False, repr=False)
    dist: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def detect(cls, distributed: bool, *, device: Optional[torch.device] = None,
               dist: Any = None) -> "World":
        """The default process group's rank/size when ``distributed``; else a world of one."""
        if not distributed:
            return cls(device=device)
        dist = _distributed() if dist is None else dist
        if not (dist.is_available() and dist.is_initialized()):
            raise ArgumentError(
                "distributed=True needs an initialised torch.distributed process group; call "
                "torch.distributed.init_process_group(...) first (e.g. under torchrun), or pass "
                "distributed=False")
        size = dist.get_world_size()
        group = control_group(dist) if size > 1 else None
        return cls(dist.get_rank(), size, size > 1, device, group, dist)

    @property
    def collective_device(self) -> torch.device:
        """Where a control collective's tensor lives: the CPU over gloo, else (NCCL) the
        loader's CUDA device (NOTE(control-collectives))."""
        dist = _distributed() if self.dist is None else self.dist
        if dist.get_backend(self.group) != "nccl":
            return _CPU
        if self.device is None or self.device.type != "cuda":
            # CPU batches under NCCL without gloo: NCCL still needs some CUDA tensor; the
            # current device is all there is to go on (set it per rank with set_device).
            return torch.device("cuda", torch.cuda.current_device())
        return self.device

    def _reduce(self, value: int, op: str) -> int:
        if not self.use_collectives:
            return value
        dist = _distributed() if self.dist is None else self.dist
        t = torch.tensor([value], dtype=torch.int64, device=self.collective_device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op), group=self.group)
        return int(t.item())

    def min(self, value: int) -> int:
        """The smallest ``value`` over all ranks (a collective: every rank must call it)."""
        return self._reduce(value, "MIN")

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (a collective)."""
        return bool(self._reduce(int(flag), "MAX"))
