"""The batched-read path for array datasets: one sorted gather per batch, read ahead by threads.

An epoch is an order and a cursor (NOTE(cursor) in epoch.py); batches are consecutive spans of
the order, as long as the live size (adaptive.py) says when each is planned.

Within a batch, samples of gpuloader's own orders come sorted by storage index (one coalesced
read); a user's sampler or batch sampler keeps its exact order.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from gpuloader.adaptive import AdaptiveBatch
from gpuloader.buffers import (DeviceRing, DeviceSlot, HostRing, HostSlot, Rows, allocate,
                               ring_slots, row_views)
from gpuloader.checks import index_array
from gpuloader.epoch import EpochCursor
from gpuloader.errors import ArgumentError, add_note
from gpuloader.padding import LayoutSource, RaggedLayout
from gpuloader.planning import FreeMemory
from gpuloader.processes import ProcessReaderPool, needs_processes
from gpuloader.readers import Pool, ReaderPool, ReadJob, describe_indices
from gpuloader.readahead import Readahead
from gpuloader.sources.base import FieldSpec, Source
from gpuloader.stats import LoaderStats
from gpuloader.tokens import RaggedWiring, TokenEpochs
from gpuloader.views import ArrayView

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
    pool: Optional[Pool]       # reader threads or processes; None when reads are inline
    stats: LoaderStats
    sizing: Optional[AdaptiveBatch]           # None when a user batch_sampler sets the sizes
    prefetch_depth: int
    device: Optional[torch.device] = None     # None or cpu: batches stay on the host
    pin: bool = False
    host_ring: Optional[HostRing] = None
    device_ring: Optional[DeviceRing] = None
    sample_nbytes: int = 0
    inline: bool = False  # NOTE(inline-reads): read in the consumer, no reader threads
    readahead: Optional[Readahead] = None  # hints for window orders (readahead.py)
    layout: Optional[RaggedLayout] = None    # ragged batches (NOTE(ragged-batch))
    tokens: Optional[TokenEpochs] = None     # token-budget spans (NOTE(token-plan))

    def buffers(self, indices: np.ndarray, length: int,
                flat: Optional[Dict[str, torch.Tensor]]) -> tuple:
        """``(tensors, rows, shapes)`` of the batch of ``indices``: views of ``flat`` (a host
        slot) or fresh CPU tensors.  ``rows`` is what a device copy moves; ``shapes`` is None
        for fixed-size batches."""
        if self.layout is None:
            tensors = row_views(flat, length) if flat is not None else \
                allocate(self.fields, length, device=_CPU, pin=self.pin)
            return tensors, length, None
        shapes = self.layout.shapes(indices)
        rows = self.layout.rows(shapes, self.fields)
        if flat is None:
            flat = allocate(self.fields, rows, device=_CPU, pin=self.pin)
        return self.layout.views(flat, shapes, rows), rows, shapes


@dataclass
class _Pending:
    seq: int
    start: int
    length: int
    tensors: Dict[str, torch.Tensor]
    host: Optional[HostSlot] = None
    dslot: Optional[DeviceSlot] = None
    rows: Rows = 0                             # buffer rows used, per field for ragged batches
    shapes: Optional[Dict[str, tuple]] = None  # ragged batches: each key's shape
    read: bool = False                         # the pool's result was collected (only once)


class FastEpochIterator(EpochCursor):
    """Iterates one epoch of ``order`` from ``start`` (see NOTE(cursor) in epoch.py)."""

    def __init__(self, res: FastResources, epoch: int, order: np.ndarray, start: int, *,
                 sort: bool, drop_last: bool, boundaries: Optional[np.ndarray] = None,
                 order_lengths: Optional[np.ndarray] = None) -> None:
        super().__init__(epoch, start)
        #: With a token budget: planning lengths in the order; spans are cut at the live
        #: budget within the planned batches ``boundaries`` (NOTE(token-plan) in tokens.py).
        self._order_lengths = order_lengths
        self._parts: tuple = ((), [], [])  # ((stop, live), part starts, part ends)
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
        if self._order_lengths is not None:
            return pos, self._token_end(pos) - pos
        # Without a live size a user batch_sampler sets the sizes: spans end at its boundaries.
        size = self.res.sizing.current if self.res.sizing is not None else n - pos
        end = min(pos + size, n)
        if self._boundaries is not None and len(self._boundaries):
            k = int(np.searchsorted(self._boundaries, pos, side="right"))
            if k < len(self._boundaries):
                end = min(end, int(self._boundaries[k]))
        elif self._drop_last and end - pos < size:
            return None
        return pos, end - pos

    def _token_end(self, pos: int) -> int:
        """End of the batch from ``pos``: the parts of its planned batch at the live budget,
        kept while the budget holds (NOTE(agreed-split) in tokens.py)."""
        stop = int(self._boundaries[np.searchsorted(self._boundaries, pos, side="right")])
        live = self.res.sizing.current  # the live max_tokens
        planner = self.res.tokens.planner
        key, starts, parts = self._parts
        if key != (stop, live, planner.revision if planner else 0) or pos not in starts:
            parts = self.res.tokens.parts(self._order_lengths, pos, stop, live,
                                          getattr(self.res.sizing, "world", None))
            starts = [pos] + parts[:-1]
            self._parts = ((stop, live, planner.revision if planner else 0), starts, parts)
        return parts[starts.index(pos)]

    def token_plan(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(planning lengths in order, planned batch ends)`` of a token-budget epoch."""
        assert self._order_lengths is not None and self._boundaries is not None
        return self._order_lengths, self._boundaries

    def span_shape(self, start: int, length: int) -> Optional[Tuple[int, int]]:
        """``(samples, padded length)`` of the token-budget batch ``[start, start + length)``
        of this epoch's order; None for fixed-size batches (``oom_guard`` reads it)."""
        if self._order_lengths is None or self.res.tokens is None:
            return None
        return self.res.tokens.span_shape(self._order_lengths, start, length)

    def _indices(self, start: int, length: int) -> np.ndarray:
        if self.res.readahead is not None:
            self.res.readahead.before(self.order, start, start + length)
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
            before, ready = host.prepare_for_write, host.writable
        tensors, rows, shapes = res.buffers(indices, length,
                                            host.tensors if host is not None else None)
        self._seq += 1
        entry = _Pending(self._seq, start, length, tensors, host, rows=rows, shapes=shapes)
        res.pool.submit(ReadJob(self._seq, indices, {k: t.numpy() for k, t in tensors.items()},
                                before=before, ready=ready))
        self._pending.append(entry)

    def _fill(self, extra: int = 0) -> None:
        while len(self._pending) < self.res.prefetch_depth + 1 + extra:
            span = self._next_span(self._planned)
            if span is None:
                return
            self._submit(*span)
            self._planned = span[0] + span[1]

    def _next(self) -> Any:
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
        if not entry.read:  # a call interrupted after this point collected it already
            try:
                self.res.pool.result(entry.seq)
            except Exception:
                self._pending.popleft()  # a failed read is consumed, as in torch
                raise
            entry.read = True
        waited = time.perf_counter() - started
        tensors = self._to_device(entry) if self.res.device_ring is not None else entry.tensors
        batch = self.res.pack(tensors)
        self._fill(extra=1)  # the next read starts before this batch's step
        # NOTE(atomic-delivery): everything that may take time or run user code (the device
        # copy, collate, submitting read-ahead) happened above; a KeyboardInterrupt there leaves
        # the batch pending, so the next call (or a resume from state_dict) delivers it.  Only
        # the commit below, a few bytecodes, decides that the batch was delivered.
        self._pending.popleft()
        self.position, self.last_start, self.last_length = \
            entry.start + entry.length, entry.start, entry.length
        self.res.stats.add_delivery(entry.length, _nbytes(tensors, entry, self.res), waited)
        return batch

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
        indices = self._indices(start, length)
        tensors, _, shapes = res.buffers(indices, length, None)
        try:
            res.source.read_into(indices, {k: t.numpy() for k, t in tensors.items()})
        except Exception as exc:
            add_note(exc, f"gpuloader: raised while reading sample indices "
                          f"{describe_indices(indices)}")
            raise
        res.stats.add_read(time.perf_counter() - started)
        batch = res.pack(tensors)  # NOTE(atomic-delivery): before the commit
        self.position, self.last_start, self.last_length = start + length, start, length
        res.stats.add_delivery(length, length * res.sample_nbytes if shapes is None else
                               sum(t.nbytes for t in tensors.values()), 0.0)
        return batch

    def _to_device(self, entry: _Pending) -> Dict[str, torch.Tensor]:
        ring = self.res.device_ring
        if entry.dslot is None:
            entry.dslot = ring.copy_in(entry.host, entry.rows)
        tensors = ring.hand_out(entry.dslot)  # releases the slot due (NOTE(slot-lifetime))
        if entry.shapes is not None:
            tensors = {k: tensors[k].view(shape) for k, shape in entry.shapes.items()}
        # Start the next copy now, so it overlaps the step.
        if self._pending and self.res.pool.done(self._pending[0].seq):
            nxt = self._pending[0]
            nxt.dslot = ring.copy_in(nxt.host, nxt.rows)
        self.res.stats.add_copy(*ring.finished_timings())
        return tensors

    def rewind(self, position: int) -> None:
        """Drop read-ahead batches and continue from ``position`` (<= the cursor)."""
        if self.res.pool is not None:
            self.res.pool.drain()
        self._pending.clear()
        self._planned = position
        self.position = position
        self.finished = False
        self._parts = ((), [], [])

    def close(self) -> None:
        """Forget read-ahead batches (their reads are waited for, so buffers are quiet)."""
        if self.res.pool is not None:
            self.res.pool.drain()
        self._pending.clear()
        self.finished = True


class FastPath:
    """The fast path of one loader: its readers and rings, made at the first epoch for batches
    of at most ``sizing.capacity`` samples (or a user batch sampler's largest batch), reused by
    every later epoch, released by :meth:`close` (NOTE(no-leaks) in processes.py).

    Readers are threads, or — with ``num_workers > 0`` and a source whose reads hold h5py's
    lock — ``num_workers`` processes (processes.py).  On a CUDA ``device`` batches go through a
    pinned host ring and a device staging ring; once that ring exists its bytes count as free
    for planning (``free.held``) unless ``budgeted`` (a memory_budget already is what batches may
    use).  ``collate`` is the user's collate_fn, given the batch as a list of samples.
    """

    def __init__(self, view: ArrayView, *, sizing: Optional[AdaptiveBatch], stats: LoaderStats,
                 free: FreeMemory, budgeted: bool, device: Optional[torch.device],
                 prefetch_depth: int, reader_threads: int, num_workers: int, context: Any,
                 pin: bool, reuse_buffers: bool, collate: Optional[Callable[[Any], Any]],
                 ragged: Optional[RaggedWiring] = None) -> None:
        self.view, self.sizing, self.stats, self.free = view, sizing, stats, free
        self.budgeted, self.device, self.prefetch_depth = budgeted, device, prefetch_depth
        self.reader_threads, self.num_workers, self.context = reader_threads, num_workers, context
        self.pin, self.reuse_buffers, self.collate = pin, reuse_buffers, collate
        #: Ragged batches: their layout, token spans, and buffer rows per batch key, sized once
        #: for the token budget (NOTE(ragged-batch) in padding.py).
        self.layout = ragged.layout if ragged is not None else None
        self.tokens = ragged.epochs if ragged is not None else None
        self.ragged_capacity = ragged.capacity if ragged is not None else None
        self.resources: Optional[FastResources] = None

    @property
    def pool(self) -> Optional[Pool]:
        """The readers (None before the first epoch, and while reads are inline)."""
        return self.resources.pool if self.resources is not None else None

    def epoch(self, epoch: int, order: Any, start: int, *, sort: bool, drop_last: bool,
              step: Optional[int], batches: Optional[Iterator[Any]],
              boundaries: Optional[np.ndarray] = None,
              order_lengths: Optional[np.ndarray] = None) -> FastEpochIterator:
        """An iterator over ``epoch``'s ``order`` from ``start`` (see FastEpochIterator).  With
        ``step``, batches never straddle a multiple of it (``accumulate``).  ``batches`` is a
        user batch sampler's iterator: its batches, in its order, replace ``order``.
        ``boundaries`` and ``order_lengths`` are a token plan's spans (NOTE(token-plan))."""
        if step is not None:
            boundaries = np.arange(step, len(order) + step, step, dtype=np.int64)
        capacity = None
        if batches is not None:
            spans = [index_array(b, "batch_sampler") for b in batches]
            empty = next((k for k, b in enumerate(spans) if len(b) == 0), None)
            if empty is not None:
                raise ArgumentError(f"batch_sampler yielded an empty batch (batch {empty} of "
                                    "the epoch); yield at least one index per batch (torch's "
                                    "DataLoader fails on it too)")
            order = np.concatenate(spans) if spans else np.empty(0, dtype=np.int64)
            ends = np.cumsum([len(b) for b in spans])
            boundaries = ends if boundaries is None else np.union1d(ends, boundaries)
            sort = False
            capacity = max((len(b) for b in spans), default=1)
        if start > len(order):
            raise ArgumentError(f"the loaded state's position {start} is beyond this epoch's "
                                f"{len(order)} samples; was it saved with another dataset?")
        return FastEpochIterator(self._resources(capacity), epoch, order, start, sort=sort,
                                 drop_last=drop_last, boundaries=boundaries,
                                 order_lengths=order_lengths)

    def _resources(self, capacity: Optional[int]) -> FastResources:
        res, slots = self.resources, ring_slots(self.prefetch_depth)
        if res is not None and res.host_ring is not None and capacity is not None and \
                capacity > res.host_ring.slots[0].capacity:
            # A batch sampler's batches outgrew the staging rings: replace them (rare).
            if res.device_ring is not None:
                res.device_ring.close()
            with torch.cuda.device(self.device):
                res.host_ring = HostRing(res.fields, capacity, slots, pin=True)
                res.device_ring = DeviceRing(res.fields, capacity, slots, self.device,
                                             reuse=self.reuse_buffers)
        if res is not None and isinstance(res.pool, ProcessReaderPool) and \
                capacity is not None and capacity > res.pool.capacity:
            res.pool.close()  # its shared-memory slots are too small for these batches
            res.pool = self._make_pool(capacity)
        if res is not None:
            return res
        view, device = self.view, self.device
        cuda = device is not None and device.type == "cuda"
        if self.sizing is not None:
            capacity = self.sizing.capacity
        capacity = max(1, capacity or 1)
        fields: Dict[str, FieldSpec] = view.fields
        rows: Rows = capacity
        source: Source = view.source
        if self.layout is not None:
            fields, rows = self.layout.buffer_fields(), dict(self.ragged_capacity or {})
            source = LayoutSource(view.source, self.layout)
        nbytes = sum(s.sample_nbytes * (rows if isinstance(rows, int) else rows[k])
                     for k, s in fields.items())
        inline = not cuda and nbytes <= INLINE_BATCH_BYTES
        host_ring = device_ring = None
        if cuda:
            # Pinning creates a CUDA context on the current device if it has none: make the
            # target device current first, so no context lands on GPU 0 for a "cuda:1" loader.
            with torch.cuda.device(device):
                host_ring = HostRing(fields, rows, slots, pin=True)
                device_ring = DeviceRing(fields, rows, slots, device, reuse=self.reuse_buffers)
            if not self.budgeted:
                self.free.held = device_ring.nbytes
        pool = None if inline else self._make_pool(capacity)
        self.resources = FastResources(
            source=source, fields=fields, index_map=view.index_map,
            pack=_packer(view, self.collate), pool=pool,
            stats=self.stats, sizing=self.sizing, prefetch_depth=self.prefetch_depth,
            device=device, pin=self.pin, host_ring=host_ring, device_ring=device_ring,
            sample_nbytes=view.sample_nbytes, inline=inline, layout=self.layout,
            tokens=self.tokens,
            readahead=Readahead(view.source) if self.layout is None and
            Readahead.fits(view, pool) else None)
        return self.resources

    def _make_pool(self, capacity: int) -> Pool:
        source = self.view.source
        if self.layout is not None:  # ragged batches: reader threads fill the flat buffers
            return ReaderPool(LayoutSource(source, self.layout), self.reader_threads,
                              self.stats)
        if self.num_workers > 0 and needs_processes(source):
            return ProcessReaderPool(source, self.view.fields, capacity,
                                     ring_slots(self.prefetch_depth), self.num_workers,
                                     self.stats, context=self.context)
        return ReaderPool(source, self.reader_threads, self.stats)

    def drain(self) -> None:
        """Wait for reads still in flight (of an epoch dropped mid-way) and forget them."""
        if self.pool is not None:
            self.pool.drain()

    def close(self) -> None:
        """Stop the readers, wait for queued copies, close a dataset the loader made."""
        res, self.resources = self.resources, None
        if res is not None and res.pool is not None:
            res.pool.close()
        if res is not None and res.device_ring is not None:
            res.device_ring.close()  # no copy may still be writing into freed slots
        self.free.held = 0
        self.view.close()


def _nbytes(tensors: Dict[str, torch.Tensor], entry: _Pending, res: FastResources) -> int:
    """Bytes of a delivered batch (ragged batches vary, fixed ones are rows x sample)."""
    if entry.shapes is None:
        return entry.length * res.sample_nbytes
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _packer(view: ArrayView,
            collate: Optional[Callable[[Any], Any]]) -> Callable[[Dict[str, torch.Tensor]], Any]:
    def pack(tensors: Dict[str, torch.Tensor]) -> Any:  # holds no loader: NOTE(no-cycles)
        if collate is None:
            return view.structure(tensors)
        return collate(view.split(tensors))

    return pack
