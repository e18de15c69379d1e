"""How ``gpuloader.DataLoader`` meets training frameworks that take over data loaders.

NOTE(accelerate): ``accelerator.prepare(model, optimizer, loader)`` rebuilds every DataLoader it
is given as accelerate's own DataLoader around plain torch parts -- gpuloader's reads, device
ring and ``oom_guard`` would be bypassed without a word.  accelerate skips objects whose
``_is_accelerate_prepared`` is true, so the loader answers true when it can run as it is: a
single-process job, or ``distributed=True`` (it shards itself), with ``device=`` given or no
CUDA present.  Otherwise it warns once, with the supported pattern, and lets accelerate rebuild
it (correct, but without gpuloader).  ``use_stateful_dataloader`` makes
``accelerator.save_state`` / ``load_state`` keep the loader's ``state_dict``.  The supported
pattern (README, "Hugging Face accelerate")::

    loader = gl.DataLoader(ds, batch_size=..., device=accelerator.device, distributed=True)
    model, optimizer = accelerator.prepare(model, optimizer)     # not the loader

NOTE(lightning): PyTorch Lightning re-creates a DataLoader with a DistributedSampler in
distributed runs unless ``Trainer(use_distributed_sampler=False)``; a gpuloader built with
``distributed=True`` shards itself, so the error raised for that combination says to pass it.
"""
from __future__ import annotations

import warnings
from typing import Any

__all__ = ["FrameworkHooks", "ACCELERATE_PATTERN", "LIGHTNING_HINT"]

ACCELERATE_PATTERN = (
    "build the loader with device=accelerator.device and distributed=True, and prepare only "
    "the model and optimizer: model, optimizer = accelerator.prepare(model, optimizer)")

LIGHTNING_HINT = (
    "under PyTorch Lightning pass Trainer(use_distributed_sampler=False) so that it keeps "
    "this loader instead of re-creating it with a DistributedSampler")


def _job_world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


class FrameworkHooks:
    """Attributes frameworks read from a DataLoader (NOTE(accelerate)); mixed into
    ``gpuloader.DataLoader``, which provides ``world``, ``device`` and ``state_dict``."""

    #: accelerate's save_state/load_state store ``state_dict()`` of loaders that say so.
    use_stateful_dataloader = True

    @property
    def _is_accelerate_prepared(self) -> bool:
        if self.__dict__.get("_accelerate_prepared", False):
            return True
        problem = self._accelerate_problem()
        if problem is None:
            return True
        if not self.__dict__.get("_accelerate_warned", False):
            object.__setattr__(self, "_accelerate_warned", True)
            warnings.warn(f"gpuloader: accelerator.prepare() received a gpuloader.DataLoader "
                          f"that {problem}, so accelerate replaces it with its own DataLoader "
                          f"and gpuloader's reads, device ring and oom_guard are bypassed; "
                          f"{ACCELERATE_PATTERN}", UserWarning, stacklevel=3)
        return False

    @_is_accelerate_prepared.setter
    def _is_accelerate_prepared(self, value: bool) -> None:  # accelerate marks what it kept
        object.__setattr__(self, "_accelerate_prepared", bool(value))

    def _accelerate_problem(self) -> Any:
        """Why this loader cannot run as it is under accelerate, or None."""
        import torch

        world = getattr(self, "world", None)
        if _job_world_size() > 1 and (world is None or world.world_size == 1):
            return (f"does not shard itself in a job of {_job_world_size()} processes "
                    "(distributed=False)")
        if getattr(self, "device", None) is None and torch.cuda.is_available():
            return "delivers CPU batches (device=None) while CUDA is present"
        return None
