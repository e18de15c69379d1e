"""Surviving out-of-memory errors: ``oom_guard`` and ``accumulate``.

NOTE(exactly-once): a batch counts as consumed once delivered.  When ``oom_guard`` rolls a step
back, the loader rewinds its cursor to the start of the failed batch (or, inside ``accumulate``
with an optimizer, of the whole step), so those samples come again — split into smaller
batches — and nothing read ahead at the old size is delivered.  ``state_dict`` therefore counts
every delivered batch that was not rolled back.
"""
from __future__ import annotations

import gc
import traceback
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from gpuloader.errors import ArgumentError, ArgumentTypeError, describe

if TYPE_CHECKING:
    from gpuloader.loader import DataLoader

_CPU_OOM_MARKERS = ("can't allocate memory", "not enough memory", "out of memory")


def is_oom_error(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and the CPU allocator's out-of-memory RuntimeError."""
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(exc, (oom_type, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _CPU_OOM_MARKERS)


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class OomGuard:
    """Context manager around one training step (see ``DataLoader.oom_guard``).

    ``failed`` is True after a step that was rolled back.  In a distributed job the out-of-memory
    flag is all-reduced at exit, so every rank rolls back and shrinks together.
    """

    def __init__(self, loader: "DataLoader", optimizer: Optional[torch.optim.Optimizer]) -> None:
        if optimizer is not None and not hasattr(optimizer, "zero_grad"):
            raise ArgumentTypeError(f"optimizer must be a torch.optim.Optimizer or None; got "
                                    f"{describe(optimizer)}")
        self.loader = loader
        self.optimizer = optimizer
        self.failed = False
        self._batch_start = 0
        self._batch_length = 0
        self._allocated_before = 0

    def __enter__(self) -> "OomGuard":
        active = self.loader._active
        if active is None:
            raise RuntimeError("oom_guard() must be used inside a loop over the loader, "
                               "after a batch was delivered")
        self._batch_start, self._batch_length = active.last_start, active.last_length
        device = self.loader.device
        if device is not None and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self._allocated_before = torch.cuda.memory_allocated(device)
        return self

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        oom = exc is not None and is_oom_error(exc)
        if exc is not None and not oom:
            return False  # any other exception passes through untouched
        if not self.loader.world.any(oom):
            self._learn_cost()
            self.loader._step_succeeded(self._batch_length)
            return False
        if exc is not None:
            # A live traceback pins the failed step's tensors: clear its finished frames before
            # collecting, or the memory we are about to ask for stays in use.
            traceback.clear_frames(tb)
        del tb
        _free_device_memory()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        try:
            self.loader._roll_back(self._batch_start, self._batch_length,
                                   whole_step=self.optimizer is not None)
        except ValueError as too_small:
            if exc is None:
                raise torch.cuda.OutOfMemoryError(
                    f"gpuloader: another rank ran out of memory at the smallest batch size "
                    f"({too_small})") from None
            exc.add_note(f"gpuloader: cannot retry with a smaller batch: {too_small}. Lower "
                         "the model's memory use, or set PYTORCH_CUDA_ALLOC_CONF="
                         "expandable_segments:True to reduce fragmentation.")
            return False
        self.failed = True
        return True

    def _learn_cost(self) -> None:
        device = self.loader.device
        if device is None or device.type != "cuda" or self._batch_length == 0:
            return
        # Memory the step left allocated (optimizer state made by the first step, gradients kept
        # until the next zero_grad, ...) is not a per-step cost: every later plan's free-memory
        # probe already sees it as used.  Counting it would inflate the fit — on the slope when
        # the two batch sizes seen are close (say 256 and an epoch's tail of 250, the first
        # step's Adam state / 6 per sample) — and collapse the re-planned "auto" size.
        after = torch.cuda.memory_allocated(device)
        peak = torch.cuda.max_memory_allocated(device) - max(self._allocated_before, after)
        self.loader.cost_model.observe(self._batch_length, max(0, peak))


class Step:
    """One optimizer step of ``accumulate``: yields ``(batch, weight)`` micro-batches.

    ``size`` is the step's sample count; weights are ``len(batch) / size`` and sum to 1 over the
    micro-batches that were not rolled back.
    """

    def __init__(self, loader: "DataLoader", iterator: Any, start: int, size: int) -> None:
        self.loader = loader
        self.start = start
        self.size = size
        self._it = iterator

    def __iter__(self) -> Iterator[Any]:
        end = self.start + self.size
        self.loader._step_start = self.start
        try:
            while self._it.position < end:
                batch = next(self._it)
                yield batch, self._it.last_length / self.size
        finally:
            self.loader._step_start = None


def accumulate(loader: "DataLoader", global_batch_size: int) -> Iterator[Step]:
    """Steps of exactly ``global_batch_size`` samples (the last may be smaller unless
    ``drop_last``); micro-batches are sized from memory (NOTE(exactly-once))."""
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int):
        raise ArgumentTypeError(f"global_batch_size must be a positive int; got "
                                f"{describe(global_batch_size)}")
    if global_batch_size <= 0:
        raise ArgumentError(f"global_batch_size must be a positive int; got {global_batch_size}")
    if loader._controller is None:
        raise ArgumentError("accumulate() needs batches gpuloader sizes; this loader was built "
                            "with batch_size=None, a batch_sampler, or an IterableDataset")
    iterator = loader._iter_steps(global_batch_size)
    total = iterator.total
    if loader.drop_last:
        total -= total % global_batch_size
    start = iterator.position - iterator.position % global_batch_size
    while start < total:
        size = min(global_batch_size, total - start)
        yield Step(loader, iterator, start, size)
        if iterator.position < start + size:  # the caller left the step early
            return
        start += size
    # Every step was taken: the epoch is over, as after a plain loop's StopIteration, so
    # state_dict() points at the next epoch (not at the end of this one, which a resume would
    # replay as an empty epoch).  Also ends the read-ahead past a drop_last tail.
    iterator.close()
