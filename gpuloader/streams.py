"""The CUDA calls the loader makes, behind one small object, and side-stream copies.

Every stream, event and allocator call of the device path goes through a :class:`CudaApi`
(default :data:`CUDA`, which is ``torch.cuda`` plus ``record_stream``), so tests can hand the
ring, the generic path's copier and the guard a recording stand-in and check the ordering
logic without a GPU.

NOTE(stream-rule): a device batch is ready on the stream that was current when it was drawn
(that stream waited for its copy), and its memory is protected for the work queued on that
stream: a staging slot is rewritten once the work that stream had queued before a later draw
has finished, and a fresh tensor's memory is recycled once that stream's work has.  Use device
batches on the stream current when you drew them, or first call :func:`use_on_stream`
(``DataLoader.record_stream(batch, stream)``) for each other stream that reads them.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional

import torch

#: Values a collated batch keeps as they are (a list of them is one field, not a structure).
LEAF_TYPES = (str, bytes, int, float, complex, bool, type(None))



class CudaApi:
    """``torch.cuda`` for the names the loader uses, plus :meth:`record_stream`.

    Lifetime: stateless; one module-level instance (:data:`CUDA`) serves every loader.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def record_stream(tensor: torch.Tensor, stream: Any) -> None:
        """Tell the caching allocator that ``stream`` uses ``tensor`` (its memory is not
        reused until the work queued on ``stream`` so far has finished)."""
        tensor.record_stream(stream)


#: The real CUDA calls; tests pass a stand-in with the same names instead.
CUDA = CudaApi()


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor, keeping dicts, lists, (named) tuples."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return type(batch)((k, map_tensors(v, fn)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)) and not all(isinstance(x, LEAF_TYPES) for x in batch):
        parts = [map_tensors(x, fn) for x in batch]
        return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)
    return batch


def tensors_of(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``batch`` (same traversal as :func:`map_tensors`)."""
    found: List[torch.Tensor] = []
    map_tensors(batch, lambda t: found.append(t) or t)
    return iter(found)


def use_on_stream(batch: Any, stream: Any, *, device: torch.device, ring: Any = None,
                  cuda: Any = None) -> None:
    """Let ``stream`` use the device ``batch`` just drawn (NOTE(stream-rule)).  Call it on the
    stream current at the draw: ``stream`` then waits for the work queued there so far (which
    includes waiting for the batch's copy), and the batch's memory stays protected until the
    work queued on ``stream`` has finished too — a staging slot (``ring.add_user``) or a fresh
    tensor (the caching allocator's ``record_stream``)."""
    cuda = CUDA if cuda is None else cuda
    drawn_on = cuda.current_stream(device)
    if stream == drawn_on:
        return
    arrived = cuda.Event()
    arrived.record(drawn_on)
    stream.wait_event(arrived)
    for t in tensors_of(batch):
        if ring is None or not ring.add_user(t, stream):
            cuda.record_stream(t, stream)


class StreamCopier:
    """Copies CPU batches to a CUDA ``device`` on a side stream (the generic path's transfer).

    Each tensor is pinned first (page-locked memory makes ``non_blocking`` copies truly
    asynchronous; torch's pinned-memory cache reuses the blocks), copied on the copy stream,
    and the consumer's current stream waits for an event recorded after the copy, so the copy
    overlaps GPU work still queued from earlier steps.  The outputs are recorded on the
    consumer stream for the caching allocator (NOTE(stream-rule)).  ``pin=False`` skips
    pinning (already pinned batches, or a stand-in device in tests).

    Lifetime: one per loader; the stream is created at the first copy, so building a loader
    creates no CUDA context.
    """

    def __init__(self, device: torch.device, *, cuda: Optional[Any] = None,
                 pin: bool = True) -> None:
        self.device = device
        self.pin = pin
        self._cuda = CUDA if cuda is None else cuda
        self._stream: Any = None

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cpu":
            return t.to(self.device, non_blocking=True)
        if self.pin and not t.is_pinned():
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def __call__(self, batch: Any) -> Any:
        """``batch`` on the device; ready for work queued on the current stream from now on."""
        cuda = self._cuda
        if self._stream is None:
            self._stream = cuda.Stream(device=self.device)
        consumer = cuda.current_stream(self.device)
        with cuda.stream(self._stream):
            # The outputs come from the copy stream's pool: nothing queued on the consumer
            # stream can still be using their memory (the copy would not wait for it).
            out = map_tensors(batch, self._copy)
            copied = cuda.Event()
            copied.record(self._stream)
        consumer.wait_event(copied)
        for t in tensors_of(out):
            cuda.record_stream(t, consumer)
        return out
