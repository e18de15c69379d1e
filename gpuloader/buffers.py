"""Preallocated batch buffers: the host ring that readers fill and the device staging ring.

NOTE(slot-lifetime): a device batch is a set of views of the first ``b`` rows of one staging
slot.  With ``R = prefetch_depth + 2`` slots and the copy of batch ``k + 1`` issued when batch
``k`` is drawn, slot ``k % R`` is rewritten by batch ``k + R``, whose copy is issued when batch
``k + prefetch_depth + 1`` is drawn.  So a device batch stays valid until ``prefetch_depth + 1``
more batches have been drawn.  Each rewrite first waits (on the copy stream) for an event the
consumer's stream recorded when the slot was released, so GPU work queued on the old batch
finishes before its bytes change.  Two things keep that true beyond one uninterrupted epoch:
the ring, not the epoch iterator, keeps the handed-out slots and releases each when it is due
(``DeviceRing.hand_out``), so draws count across epochs, breaks and resumes (the last ``prefetch_depth + 1`` batches of an epoch
are released by the next epoch's draws, never skipped); and a slot copied into but never
handed out (its batch was dropped by a rollback or a break) is the next one copied into, so
the slots in use stay the ``prefetch_depth + 1`` just before the ring's cursor.

Set ``GPULOADER_POISON=1`` (or :data:`POISON` = True) to fill every recycled slot with a poison
value (NaN for floats, the dtype's max for integers, True for bools) before it is reused, so a
use-after-recycle shows up as garbage instead of silently stale data.
"""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from gpuloader.checks import torch_dtype
from gpuloader.sources.base import FieldSpec
from gpuloader.streams import CUDA

#: Debug switch: poison recycled slots (see module docstring).
POISON: bool = os.environ.get("GPULOADER_POISON", "") not in ("", "0")


def ring_slots(prefetch_depth: int) -> int:
    """Batch-sized slots of every ring (host, device, reader processes) for ``prefetch_depth``
    batches read ahead: those, the batch being delivered, and the one the consumer still uses
    (NOTE(slot-lifetime)).  The one place this count is made."""
    return prefetch_depth + 2


#: Rows per buffer: one count for every field, or a count per field (ragged batches, whose
#: flat token buffers and per-sample fields differ: NOTE(ragged-batch) in padding.py).
Rows = Union[int, Mapping[str, int]]


def rows_of(rows: Rows, name: str) -> int:
    """The row count ``rows`` gives field ``name``."""
    return rows if isinstance(rows, int) else int(rows[name])


def allocate(fields: Mapping[str, FieldSpec], rows: Rows, *, device: torch.device,
             pin: bool = False) -> Dict[str, torch.Tensor]:
    """One uninitialised tensor per field with room for ``rows`` samples (per field if a
    mapping).

    ``pin`` page-locks host memory so device copies can run asynchronously.  Lifetime: as long
    as the caller keeps the dict.
    """
    if device.type == "cpu" and not pin:
        # numpy's allocations come from malloc's heap, which reuses freed batches; torch's CPU
        # allocator returns large blocks to the OS on free, so every new batch page-faults
        # (measured: 3.4x slower for 1 MB batches).  The tensor keeps the array alive.
        return {name: torch.from_numpy(np.empty((rows_of(rows, name), *spec.shape),
                                                dtype=spec.dtype))
                for name, spec in fields.items()}
    return {
        name: torch.empty((rows_of(rows, name), *spec.shape), dtype=torch_dtype(spec.dtype),
                          device=device,
                          pin_memory=pin and device.type == "cpu")
        for name, spec in fields.items()
    }


#: Field offsets inside a host slot's one block are multiples of this (cache-line) alignment.
_ALIGN = 64


def pinned_footprint(nbytes: int) -> int:
    """Bytes torch's pinned-memory cache takes for an allocation of ``nbytes``: it rounds every
    block up to a power of two (NOTE(pinned-rounding))."""
    return 1 << max(0, nbytes - 1).bit_length() if nbytes > 0 else 0


def allocate_block(fields: Mapping[str, FieldSpec], rows: Rows, *,
                   pin: bool) -> Tuple[Dict[str, torch.Tensor], int]:
    """Host tensors for ``rows`` samples of every field (per field if a mapping), carved out
    of one (pinned when ``pin``) block; returns them and the block's size in bytes.

    NOTE(pinned-rounding): torch's pinned-memory cache rounds each allocation up to a power of
    two, so a tensor per field could waste up to half of each; one block per slot rounds once.
    The sizer counts the rounded footprint of every slot against host memory
    (``SizerConfig.pinned_host_bytes`` in planning.py).
    """
    offsets, size = {}, 0
    for name, spec in fields.items():
        offsets[name] = size
        size += -(-rows_of(rows, name) * spec.sample_nbytes // _ALIGN) * _ALIGN
    block = torch.empty(max(1, size), dtype=torch.uint8, pin_memory=pin)
    out = {}
    for name, spec in fields.items():
        start, count = offsets[name], rows_of(rows, name)
        raw = block[start:start + count * spec.sample_nbytes]
        out[name] = raw.view(torch_dtype(spec.dtype)).view(count, *spec.shape)
    return out, size


def poison_(tensors: Mapping[str, torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with a value no real batch is likely to hold."""
    for t in tensors.values():
        if t.dtype.is_floating_point or t.dtype.is_complex:
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(torch.iinfo(t.dtype).max)


def numpy_views(tensors: Mapping[str, torch.Tensor], rows: Rows) -> Dict[str, np.ndarray]:
    """numpy views of the first ``rows`` rows of host ``tensors`` (no copy)."""
    return {name: t[:rows_of(rows, name)].numpy() for name, t in tensors.items()}


def row_views(tensors: Mapping[str, torch.Tensor], rows: Rows) -> Dict[str, torch.Tensor]:
    """Tensor views of the first ``rows`` rows of ``tensors`` (no copy)."""
    return {name: t[:rows_of(rows, name)] for name, t in tensors.items()}


@dataclass
class HostSlot:
    """One pinned (or pageable) host buffer holding up to ``capacity`` samples.

    ``copied`` is the CUDA event recorded after the last device copy out of this slot; a reader
    must wait for it before writing the slot again.
    """

    tensors: Dict[str, torch.Tensor]
    capacity: Rows
    copied: Optional["torch.cuda.Event"] = None
    used: bool = False

    def writable(self) -> bool:
        """True when writing now would not wait: no device copy out of this slot is pending."""
        return self.copied is None or self.copied.query()

    def prepare_for_write(self) -> None:
        """Block until the previous device copy out of this slot finished; poison if enabled."""
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None
        if self.used and POISON:
            poison_(self.tensors)
        self.used = True


class HostRing:
    """``slots`` preallocated host buffers, pinned when ``pin``; handed out round robin."""

    def __init__(self, fields: Mapping[str, FieldSpec], capacity: Rows, slots: int, *,
                 pin: bool) -> None:
        self.slots: List[HostSlot] = []
        self.nbytes = 0  # host bytes the slots hold, as the pinned cache rounds them
        for _ in range(slots):
            tensors, size = allocate_block(fields, capacity, pin=pin)
            self.slots.append(HostSlot(tensors, capacity))
            self.nbytes += pinned_footprint(size) if pin else size
        self._next = 0

    def take(self) -> HostSlot:
        """The next slot in ring order (its previous user is done with it by construction)."""
        slot = self.slots[self._next]
        self._next = (self._next + 1) % len(self.slots)
        return slot


@dataclass
class DeviceSlot:
    """One device staging buffer plus the events that guard it (see NOTE(slot-lifetime))."""

    tensors: Dict[str, torch.Tensor]
    ready: Optional["torch.cuda.Event"] = None      # copy into this slot finished
    #: One event per stream that used the old batch, recorded at its release: the next copy
    #: into the slot waits for all of them.
    released: List["torch.cuda.Event"] = field(default_factory=list)
    #: Streams that use the batch handed out: the drawing stream, plus any given to
    #: :meth:`DeviceRing.add_user` (NOTE(stream-rule) in streams.py).
    users: List[Any] = field(default_factory=list)
    used: bool = False
    rows: Rows = 0
    started: Optional["torch.cuda.Event"] = None    # the copy into this slot began (timing)


class DeviceRing:
    """Staging slots on a CUDA device fed from host slots on a dedicated copy stream.

    ``reuse=False`` allocates fresh device tensors per batch instead (caller-owned batches).
    A handed-out slot stays valid for ``slots - 1`` draws (NOTE(slot-lifetime)).
    """

    def __init__(self, fields: Mapping[str, FieldSpec], capacity: Rows, slots: int,
                 device: torch.device, *, reuse: bool = True, cuda: Any = None) -> None:
        # ``cuda``: the CUDA calls (streams.CudaApi); tests pass a recording stand-in to check
        # the event logic without a GPU.
        self._cuda = CUDA if cuda is None else cuda
        self.device = device
        self.fields = dict(fields)
        self.reuse = reuse
        self.stream = self._cuda.Stream(device=device)
        self.slots: List[DeviceSlot] = (
            [DeviceSlot(allocate(fields, capacity, device=device)) for _ in range(slots)]
            if reuse else []
        )
        self._next = 0
        #: Slots handed out and not yet released, oldest first (NOTE(slot-lifetime)).
        self._handed: Deque[DeviceSlot] = deque()
        self._keep = max(1, slots - 1)
        self._unhanded: Optional[DeviceSlot] = None  # copied into, not handed out yet
        #: (copy began, copy ended, consumer reached the batch) per handed-out batch whose
        #: timing is not read yet (NOTE(copy-timing)).
        self._timings: Deque[tuple] = deque()

    def copy_in(self, host: HostSlot, rows: Rows) -> DeviceSlot:
        """Issue an asynchronous copy of ``rows`` rows of ``host`` into the next slot.

        Returns the slot; its ``ready`` event fires when the bytes have landed.  The host slot's
        ``copied`` event is set so readers do not overwrite it too early.
        """
        if self.reuse:
            if self._unhanded is not None:
                slot = self._unhanded  # its batch was dropped (rollback, break): reuse it
            else:
                slot = self.slots[self._next]
                self._next = (self._next + 1) % len(self.slots)
            self._unhanded = slot
        else:
            # Allocated on the copy stream, which writes it: a block from the consumer stream's
            # pool may still be in use by that stream's queued kernels, which the copy would
            # not wait for.  hand_out's record_stream then covers the consumer's use.
            with self._cuda.stream(self.stream):
                slot = DeviceSlot(allocate(self.fields, rows, device=self.device))
        with self._cuda.stream(self.stream):
            for released in slot.released:
                self.stream.wait_event(released)
            slot.released = []
            if slot.used and POISON:
                poison_(slot.tensors)
            started = self._cuda.Event(enable_timing=True)
            started.record(self.stream)
            for name, src in host.tensors.items():
                count = rows_of(rows, name)
                slot.tensors[name][:count].copy_(src[:count], non_blocking=True)
            event = self._cuda.Event(enable_timing=True)
            event.record(self.stream)
        slot.started = started
        slot.used = True
        slot.rows = rows
        slot.ready = event
        host.copied = event
        return slot

    def hand_out(self, slot: DeviceSlot) -> Dict[str, torch.Tensor]:
        """Make the consumer's current stream wait for ``slot``'s copy; return row views.

        The batch is the current stream's (NOTE(stream-rule) in streams.py): its slot is
        released on that stream, whichever is current at later draws.  Also releases the slot handed out ``slots - 1`` draws ago (NOTE(slot-lifetime)), so the
        caller may start the next copy right after.  Fresh tensors (``reuse=False``) are the
        caller's: nothing is released, and holding them would keep freed batches alive.
        """
        current = self._cuda.current_stream(self.device)
        if slot is self._unhanded:
            self._unhanded = None
        if slot.ready is not None:
            reached = self._cuda.Event(enable_timing=True)
            reached.record(current)
            current.wait_event(slot.ready)
            self._timings.append((slot.started, slot.ready, reached))
        views = row_views(slot.tensors, slot.rows)
        if not self.reuse:
            # Fresh tensors were written on the copy stream; tell the caching allocator that the
            # consumer's stream uses them so their memory is not recycled under it.
            for t in views.values():
                self._cuda.record_stream(t, current)
        else:
            slot.users = [current]
            self._handed.append(slot)
            if len(self._handed) > self._keep:
                self._release(self._handed.popleft())
        return views

    def _release(self, slot: DeviceSlot) -> None:
        """Record that work queued so far on the batch's streams is all that uses ``slot``."""
        for stream in slot.users:
            event = self._cuda.Event()
            event.record(stream)
            slot.released.append(event)
        slot.users = []

    def finished_timings(self) -> Tuple[float, float]:
        """NOTE(copy-timing): ``(copy_s, stall_s)`` of the handed-out batches whose copy has
        finished since the last call — seconds the copy engine spent on them, and seconds the
        consumer's stream sat waiting for them — from CUDA events, without waiting for any.
        (Timing on the host would only see a copy being issued, so an H2D-bound loader would
        look stall-free.)"""
        copy_s = stall_s = 0.0
        while self._timings and all(e.query() for e in self._timings[0][1:]):
            started, ended, reached = self._timings.popleft()
            copy_s += started.elapsed_time(ended) / 1e3
            stall_s += max(0.0, reached.elapsed_time(ended) / 1e3)
        return copy_s, stall_s

    def add_user(self, tensor: torch.Tensor, stream: Any) -> bool:
        """Count ``stream`` among the users of the handed-out batch ``tensor`` belongs to, so
        its slot is rewritten only after the work queued on ``stream`` too.  False when no
        handed-out slot holds ``tensor`` (fresh tensors, ``reuse=False``)."""
        ptr = tensor.untyped_storage().data_ptr()
        for slot in self._handed:
            if any(t.untyped_storage().data_ptr() == ptr for t in slot.tensors.values()):
                if stream not in slot.users:
                    slot.users.append(stream)
                return True
        return False

    def close(self) -> None:
        """Wait for copies still queued on the copy stream (a read-ahead batch nobody drew):
        once the slots are freed, the consumer stream's allocator may hand their memory out
        again, and nothing would order the pending copy before the new owner's kernels."""
        self.stream.synchronize()

    @property
    def nbytes(self) -> int:
        """Device bytes held by the staging slots."""
        return sum(t.numel() * t.element_size() for s in self.slots for t in s.tensors.values())
