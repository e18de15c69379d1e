"""The generic path: any dataset through torch's own machinery, with gpuloader's additions.

torch's samplers, worker processes and collate functions produce the batches; this module adds
a batch sampler that follows the live batch size, device transfer, telemetry, and rollback.

NOTE(replay): the generic path cannot re-read arbitrary samples cheaply (an IterableDataset has
no indices at all), so it keeps the CPU batches that a rollback may need — the last batch, or
every batch of the current ``accumulate`` step — and on rollback re-delivers them split into
pieces of the new, smaller size.  Nothing is lost or repeated, and memory stays bounded by one
step.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Deque, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.utils.data as tud
from torch.utils.data import Sampler

from gpuloader.adaptive import AdaptiveBatch
from gpuloader.epoch import EpochCursor, OrderSpec
from gpuloader.errors import ArgumentError
from gpuloader.planning import SizerConfig, SizingOptions
from gpuloader.probes import HostProbe
from gpuloader.stats import LoaderStats
from gpuloader.streams import LEAF_TYPES as _LEAF



class OrderSampler(Sampler):
    """gpuloader's order (seeded, per epoch, sharded by rank) as a torch sampler, for datasets
    on the generic path; ``epoch`` is set by the loader before each iteration."""

    def __init__(self, order: OrderSpec) -> None:
        self.order = order
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        positions, _ = self.order.positions(self.epoch)
        if isinstance(positions, np.ndarray):  # a user sampler's order
            return iter(positions.tolist())
        return (int(i) for chunk in positions.chunks() for i in chunk.tolist())

    def __len__(self) -> int:
        return self.order.shard_len()


class SizedBatchSampler(Sampler):
    """Groups ``sampler``'s indices into batches of ``sizing.current`` samples, read at the
    moment each batch is formed; the same batches as torch's BatchSampler while the size holds.

    ``skip`` (samples) is consumed by the next iteration only: resume skips what was consumed.
    """

    def __init__(self, sampler: Any, sizing: AdaptiveBatch, drop_last: bool) -> None:
        self.sampler = sampler
        self.sizing = sizing
        self.drop_last = drop_last
        self.skip = 0
        self.step: Optional[int] = None  # batches end at multiples of step (accumulate)

    def __iter__(self) -> Iterator[List[int]]:
        skip, self.skip = self.skip, 0
        batch: List[int] = []
        for i, index in enumerate(self.sampler):
            if i < skip:
                continue
            batch.append(index)
            at_step_end = self.step is not None and (i + 1) % self.step == 0
            if len(batch) >= self.sizing.current or at_step_end:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        n, size = len(self.sampler), self.sizing.current
        return n // size if self.drop_last else -(-n // size)


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor) and obj.is_nested:
        return sum(_nbytes(t) for t in obj.unbind())
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if isinstance(obj, (str, bytes)):
        return len(obj)
    return 8  # a number or an unknown object: count one word


def sample_nbytes_of(dataset: Any) -> int:
    """Bytes of the first sample of a map-style ``dataset`` (1 for an empty one)."""
    try:
        return max(1, _nbytes(dataset[0]))
    except (IndexError, KeyError, TypeError, NotImplementedError):
        return 1


def batch_length(batch: Any) -> int:
    """Samples in a collated ``batch``: the first tensor's dim 0, or a leaf list's length."""
    if isinstance(batch, torch.Tensor) and batch.is_nested:  # no .shape: its sizes vary
        return int(batch.size(0))
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        for value in batch.values():
            return batch_length(value)
    if isinstance(batch, (list, tuple)) and batch:
        if all(isinstance(x, _LEAF) for x in batch):
            return len(batch)
        return batch_length(batch[0])
    return 1


def _slice(batch: Any, n: int, lo: int, hi: int) -> Any:
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return batch[lo:hi] if batch.ndim and batch.shape[0] == n else batch
    if isinstance(batch, dict):
        return type(batch)((k, _slice(v, n, lo, hi)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        if len(batch) == n and all(isinstance(x, _LEAF) for x in batch):
            return batch[lo:hi]
        parts = [_slice(x, n, lo, hi) for x in batch]
        if hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*parts)
        return type(batch)(parts)
    return batch


def split_batch(batch: Any, size: int) -> List[Any]:
    """``batch`` cut along the sample axis into consecutive pieces of at most ``size``."""
    n = batch_length(batch)
    if n <= size:
        return [batch]
    return [_slice(batch, n, lo, min(n, lo + size)) for lo in range(0, n, size)]


class GenericEpochIterator(EpochCursor):
    """One epoch of torch's iterator, with positions, telemetry and replay (see NOTE(replay)).

    ``sizing`` is None when torch's sampler or the dataset sets the sizes; ``copy`` moves a CPU
    batch to the device (a StreamCopier; None keeps it on the CPU); ``keep_workers`` leaves torch's
    worker processes running at the end (``persistent_workers``).
    """

    def __init__(self, torch_iter: Iterator[Any], epoch: int, start: int, *,
                 sizing: Optional[AdaptiveBatch], copy: Optional[Callable[[Any], Any]],
                 stats: LoaderStats, keep_workers: bool) -> None:
        super().__init__(epoch, start)
        self.sizing = sizing
        self._copy = copy
        self.stats = stats
        self.keep_workers = keep_workers
        self.total = 0  # samples in the epoch when known (accumulate needs it)
        self._it: Optional[Iterator[Any]] = torch_iter
        self._replay: Deque[Any] = deque()
        self._kept: Deque[Tuple[int, Any]] = deque()
        self._rolled_back = False  # an out-of-memory rollback happened in this epoch
        # Dropping this iterator drops torch's, whose own __del__ stops its workers (as after a
        # break with torch's DataLoader); EpochCursor.__del__ tells the tracker where it stopped.

    @property
    def _workers(self) -> list:  # type: ignore[override]  # NOTE(one-consumer) in epoch.py
        return list(getattr(self._it, "_workers", []) or [])

    @property
    def _pin_memory_thread(self) -> Any:  # type: ignore[override]
        return getattr(self._it, "_pin_memory_thread", None)

    def _next(self) -> Any:
        if self.finished:
            raise StopIteration
        started = time.perf_counter()
        if self._replay:
            batch = self._replay.popleft()
        else:
            try:
                batch = next(self._it)  # type: ignore[arg-type]
            except StopIteration:
                self.finished = True
                self._kept.clear()
                raise
            sizing = self.sizing
            if self._rolled_back and sizing is not None and \
                    batch_length(batch) > sizing.current:
                # Formed before a rollback shrank the size (torch's workers read ahead):
                # deliver it in pieces of the current size rather than fail on it again.
                # (Only after a rollback: a collate whose dim 0 is not the sample axis is
                # never cut otherwise.)
                batch, *rest = split_batch(batch, sizing.current)
                self._replay.extendleft(reversed(rest))
        waited = time.perf_counter() - started
        n = batch_length(batch)
        step_start = self.sizing.step_start if self.sizing is not None else None
        keep_from = step_start if step_start is not None else self.position
        while self._kept and self._kept[0][0] < keep_from:
            self._kept.popleft()
        self._kept.append((self.position, batch))
        self.last_start, self.last_length = self.position, n
        self.position += n
        out = self._copy(batch) if self._copy is not None else batch
        self.stats.add_delivery(n, _nbytes(batch), waited)
        return out

    def rewind(self, position: int) -> None:
        """Re-deliver the kept batches from ``position`` on, split to the current size."""
        size = self.sizing.current if self.sizing is not None else 1
        pieces: List[Any] = []
        kept = [b for s, b in self._kept if s >= position]
        # Pieces still queued from an earlier rollback were cut at the older, larger size:
        # cut them again, or each would fail once more.
        for batch in kept + list(self._replay):
            pieces.extend(split_batch(batch, size))
        self._kept = deque((s, b) for s, b in self._kept if s < position)
        self._replay = deque(pieces)
        self._rolled_back = True
        self.position = position
        self.finished = False

    def close(self) -> None:
        """Drop this epoch's torch iterator (workers of non-persistent loaders exit)."""
        self.finished = True
        self._replay.clear()
        self._kept.clear()
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers") and not self.keep_workers:
            it._shutdown_workers()


def start_generic_epoch(torch_iter: Callable[[], Iterator[Any]], sampler: Any,
                        batch_sampler: Any, epoch: int, start: int, step: Optional[int], *,
                        sizing: Optional[AdaptiveBatch], copy: Optional[Callable[[Any], Any]],
                        stats: LoaderStats, keep_workers: bool) -> GenericEpochIterator:
    """Epoch ``epoch`` of torch's machinery from position ``start``: the loader's ``sampler``
    and ``batch_sampler`` are set up first, then ``torch_iter()`` (torch's ``__iter__``) made.
    With ``step`` (``accumulate``) batches never straddle a multiple of it."""
    if isinstance(sampler, OrderSampler):
        sampler.epoch = epoch
    sized = isinstance(batch_sampler, SizedBatchSampler)
    if sized:
        batch_sampler.skip = start
        batch_sampler.step = step
    elif step is not None:
        raise ArgumentError("accumulate() needs gpuloader to form the batches; it cannot "
                            "be combined with a user batch_sampler on this dataset")
    iterator = GenericEpochIterator(torch_iter(), epoch, start if sized else 0, sizing=sizing,
                                    copy=copy, stats=stats, keep_workers=keep_workers)
    if sized and hasattr(sampler, "__len__"):
        iterator.total = len(sampler)
    while iterator.position < start:  # deterministic samplers only: replay up to start
        next(iterator)
    return iterator


def replace_guarded(loader: tud.DataLoader, name: str, value: Any) -> None:
    """Set torch's ``sampler`` / ``batch_sampler`` after ``DataLoader.__init__``.

    Why not a plain assignment: torch's ``__setattr__`` refuses these after construction, and
    its constructor offers no way in — given a ``batch_sampler`` it sets ``batch_size=None`` and
    ``drop_last=False``; given a ``sampler`` it refuses ``shuffle=True``.  The replacements keep
    their meaning (same indices, same drop_last); only the order's seed or the size is live.
    """
    object.__setattr__(loader, name, value)


def sizer_config(dataset: Any, view: Any, order: OrderSpec, slots: int,
                 options: SizingOptions, cuda: bool) -> Callable[[], SizerConfig]:
    """The sizer's inputs for this loader, made when first needed: on the generic path they
    read the dataset's first sample, which an int batch size never needs.  On CUDA the fast
    path's pinned host ring counts against host memory (NOTE(pinned-rounding))."""
    def make() -> SizerConfig:
        staging = view.sample_nbytes if view is not None else sample_nbytes_of(dataset)
        pinned = int(HostProbe().read().free * options.memory_fraction) \
            if cuda and view is not None else None
        return options.config(staging_bytes_per_sample=staging, ring_slots=slots,
                              dataset_len=max(1, order.shard_len()), pinned_host_bytes=pinned)
    return make
