"""The batched-read path for array datasets: one sorted gather per batch, read ahead by threads.

NOTE(cursor): an epoch is an order (positions -> sample indices of this rank's shard) and a
cursor.  ``position`` counts the samples delivered and not rolled back; batches are consecutive
spans of the order starting at the cursor.  An out-of-memory rollback rewinds the cursor to the
start of the failed batch (or of the accumulate step) and drops every batch read ahead, so the
next batches re-deliver exactly those samples at the new size.  ``state_dict`` saves the cursor,
which makes resume O(1): the order is recomputed from (seed, epoch, rank, world size).

Within a batch, samples of gpuloader's own orders come sorted by storage index (one coalesced
read); a user's sampler or batch sampler keeps its exact order.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Optional

import numpy as np
import torch

from gpuloader.buffers import (DeviceRing, DeviceSlot, HostRing, HostSlot, allocate,
                               numpy_views, row_views)
from gpuloader.epoch import EpochCursor
from gpuloader.readers import ReadJob, describe_indices
from gpuloader.sizing import SizeController
from gpuloader.sources.base import FieldSpec, Source
from gpuloader.stats import LoaderStats

_CPU = torch.device("cpu")
#: Batches below this many bytes are read inline by the consumer (NOTE(inline-reads)).
INLINE_BATCH_BYTES = 64 << 10


@dataclass
class FastResources:
    """What the fast path reads with, owned by the loader and reused across epochs.

    ``host_ring``/``device_ring`` exist only for CUDA devices; CPU batches get fresh tensors.
    """

    source: Source
    fields: Dict[str, FieldSpec]
    index_map: Optional[np.ndarray]          # positions of a Subset -> base indices
    pack: Callable[[Dict[str, torch.Tensor]], Any]
    pool: Optional[Any]        # ReaderPool or ProcessReaderPool; None when reads are inline
    stats: LoaderStats
    controller: Optional[SizeController]      # None when a user batch_sampler sets the sizes
    prefetch_depth: int
    device: Optional[torch.device] = None     # None or cpu: batches stay on the host
    pin: bool = False
    host_ring: Optional[HostRing] = None
    device_ring: Optional[DeviceRing] = None
    sample_nbytes: int = 0
    inline: bool = False  # NOTE(inline-reads): read in the consumer, no reader threads


@dataclass
class _Pending:
    seq: int
    start: int
    length: int
    tensors: Dict[str, torch.Tensor]
    host: Optional[HostSlot] = None
    dslot: Optional[DeviceSlot] = None


class FastEpochIterator(EpochCursor):
    """Iterates one epoch of ``order`` from ``start`` (see NOTE(cursor))."""

    def __init__(self, res: FastResources, epoch: int, order: np.ndarray, start: int, *,
                 sort: bool, drop_last: bool, boundaries: Optional[np.ndarray] = None) -> None:
        super().__init__(epoch, start)
        self.res = res
        self.order = order
        self._sort = sort
        self._drop_last = drop_last
        self._boundaries = boundaries
        self._planned = start
        self._pending: Deque[_Pending] = deque()
        self._seq = 0

    @property
    def total(self) -> int:
        """Samples in this epoch's order."""
        return len(self.order)

    def _next_span(self, pos: int) -> Optional[tuple]:
        n = len(self.order)
        if pos >= n:
            return None
        # Without a controller a user batch_sampler sets the sizes: spans end at its boundaries.
        size = self.res.controller.current if self.res.controller is not None else n - pos
        end = min(pos + size, n)
        if self._boundaries is not None and len(self._boundaries):
            k = int(np.searchsorted(self._boundaries, pos, side="right"))
            if k < len(self._boundaries):
                end = min(end, int(self._boundaries[k]))
        elif self._drop_last and end - pos < size:
            return None
        return pos, end - pos

    def _indices(self, start: int, length: int) -> np.ndarray:
        idx = self.order[start:start + length]
        if self.res.index_map is not None:
            idx = self.res.index_map[idx]
        if self._sort:
            idx = np.sort(idx)
        return np.ascontiguousarray(idx, dtype=np.int64)

    def _submit(self, start: int, length: int) -> None:
        res = self.res
        indices = self._indices(start, length)
        host: Optional[HostSlot] = None
        before = ready = None
        if res.host_ring is not None:
            host = res.host_ring.take()
            tensors = row_views(host.tensors, length)
            before, ready = host.prepare_for_write, host.writable
        else:
            tensors = allocate(res.fields, length, device=_CPU, pin=res.pin)
        self._seq += 1
        entry = _Pending(self._seq, start, length, tensors, host)
        res.pool.submit(ReadJob(self._seq, indices, numpy_views(tensors, length), before=before,
                                ready=ready))
        self._pending.append(entry)

    def _fill(self) -> None:
        while len(self._pending) < self.res.prefetch_depth + 1:
            span = self._next_span(self._planned)
            if span is None:
                return
            self._submit(*span)
            self._planned = span[0] + span[1]

    def __next__(self) -> Any:
        if self.finished:
            raise StopIteration
        if self.res.inline:
            return self._next_inline()
        self._fill()
        if not self._pending:
            self.finished = True
            raise StopIteration
        entry = self._pending[0]
        started = time.perf_counter()
        try:
            self.res.pool.result(entry.seq)
        except Exception:
            self._pending.popleft()  # a failed read is consumed, as in torch
            raise
        # Popped only now: after an interrupt (KeyboardInterrupt) while waiting, the same
        # iterator's next call still delivers this batch instead of skipping it.
        self._pending.popleft()
        waited = time.perf_counter() - started
        tensors = self._to_device(entry) if self.res.device_ring is not None else entry.tensors
        self.position = entry.start + entry.length
        self.last_start, self.last_length = entry.start, entry.length
        self._fill()
        self.res.stats.add_delivery(entry.length, entry.length * self.res.sample_nbytes, waited)
        return self.res.pack(tensors)

    def _next_inline(self) -> Any:
        """NOTE(inline-reads): batches of a few KB cost less to gather here than to hand to a
        thread and wait for (queue, condition, wake-up); only CPU batches take this path."""
        res = self.res
        span = self._next_span(self.position)
        if span is None:
            self.finished = True
            raise StopIteration
        start, length = span
        started = time.perf_counter()
        tensors = allocate(res.fields, length, device=_CPU, pin=res.pin)
        indices = self._indices(start, length)
        try:
            res.source.read_into(indices, numpy_views(tensors, length))
        except Exception as exc:
            exc.add_note(f"gpuloader: raised while reading sample indices "
                         f"{describe_indices(indices)}")
            raise
        res.stats.add_read(time.perf_counter() - started)
        self.position = start + length
        self.last_start, self.last_length = start, length
        res.stats.add_delivery(length, length * res.sample_nbytes, 0.0)
        return res.pack(tensors)

    def _to_device(self, entry: _Pending) -> Dict[str, torch.Tensor]:
        ring = self.res.device_ring
        started = time.perf_counter()
        if entry.dslot is None:
            entry.dslot = ring.copy_in(entry.host, entry.length)
        tensors = ring.hand_out(entry.dslot)
        # NOTE(slot-lifetime) in buffers.py: release the slot of the batch drawn
        # prefetch_depth + 1 draws ago (counted by the ring, across epochs), then start the
        # next copy so it overlaps the step.  Fresh tensors (reuse_buffers=False) are the
        # caller's: nothing to release, and holding them would keep freed batches alive.
        if ring.reuse:
            ring.handed.append(entry.dslot)
            if len(ring.handed) > self.res.prefetch_depth + 1:
                ring.release(ring.handed.popleft())
        if self._pending and self.res.pool.done(self._pending[0].seq):
            nxt = self._pending[0]
            nxt.dslot = ring.copy_in(nxt.host, nxt.length)
        self.res.stats.add_copy(time.perf_counter() - started)
        return tensors

    def rewind(self, position: int) -> None:
        """Drop read-ahead batches and continue from ``position`` (<= the cursor)."""
        if self.res.pool is not None:
            self.res.pool.drain()
        self._pending.clear()
        self._planned = position
        self.position = position
        self.finished = False

    def close(self) -> None:
        """Forget read-ahead batches (their reads are waited for, so buffers are quiet)."""
        if self.res.pool is not None:
            self.res.pool.drain()
        self._pending.clear()
        self.finished = True
