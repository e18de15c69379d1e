"""A recording stand-in for the CUDA calls gpuloader makes (gpuloader.streams.CudaApi).

Streams, events and the caching allocator's bookkeeping are modelled just enough to check
ordering without a GPU: every call lands in ``FakeCuda.log`` as a tuple, ``with
fake.stream(s)`` switches the current stream, and :class:`CopyLog` adds a ``("copy", stream)``
entry for each tensor copy issued while it is active, naming the stream current at the time.

Events complete at once unless the test holds the GPU back (``fake.gpu_busy = True``): then
``query()`` is False and ``synchronize()`` raises :class:`WaitedForGpu`, so a host wait the
code should not make fails the test instead of blocking it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode


class WaitedForGpu(AssertionError):
    """The host waited for GPU work the test holds back."""


class FakeStream:
    def __init__(self, fake: "FakeCuda", name: str, handle: int = 0) -> None:
        self.fake = fake
        self.name = name
        self.cuda_stream = handle  # the cudaStream_t as an int (0: the default stream)

    def wait_event(self, event: "FakeEvent") -> None:
        self.fake.log.append(("wait", self.name, event.stream_name, event.id))

    def synchronize(self) -> None:
        self.fake.log.append(("stream_sync", self.name))
        if self.fake.gpu_busy:
            raise WaitedForGpu(f"synchronize() on stream {self.name} while the GPU is busy")

    def query(self) -> bool:
        return not self.fake.gpu_busy

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


class FakeEvent:
    def __init__(self, fake: "FakeCuda", enable_timing: bool = False) -> None:
        self.fake = fake
        self.timing = enable_timing
        self.stream_name: Optional[str] = None
        self.id = -1
        self.ms: Optional[float] = None  # GPU time of the event, if a test sets it

    def record(self, stream: Optional[FakeStream] = None) -> None:
        stream = self.fake.current if stream is None else stream
        self.stream_name = stream.name
        self.fake.events += 1
        self.id = self.fake.events
        if self.timing:
            self.fake.timed.add(self.id)
        self.fake.log.append(("record", stream.name, self.id))

    def query(self) -> bool:
        return not self.fake.gpu_busy

    def synchronize(self) -> None:
        self.fake.log.append(("event_sync", self.stream_name, self.id))
        if not self.query():
            raise WaitedForGpu(f"host waited for event {self.id} on {self.stream_name}")

    def elapsed_time(self, end: "FakeEvent") -> float:
        if not (self.timing and end.timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'")
        if self.ms is not None and end.ms is not None:
            return end.ms - self.ms
        return self.fake.event_ms * (end.id - self.id)


class FakeCuda:
    """The torch.cuda names gpuloader uses, recording each call in ``log``."""

    def __init__(self) -> None:
        self.log: List[Tuple[Any, ...]] = []
        self.default = FakeStream(self, "default")
        self.current = self.default
        self.gpu_busy = False
        self.events = 0
        self.timed: set = set()  # ids of events made with enable_timing=True
        self.event_ms = 1.0  # what elapsed_time reports per event recorded in between
        self._streams = 0
        # Caching-allocator state a test may set; read by memory_stats() and friends.
        self.stats: Dict[str, int] = {}
        self.free_total: Tuple[int, int] = (0, 0)
        self.fraction = 1.0
        self.segments: List[Dict[str, Any]] = []

    # streams and events
    def Stream(self, device: Any = None) -> FakeStream:  # noqa: N802 - torch's name
        self._streams += 1
        return FakeStream(self, f"side{self._streams}", handle=1000 + self._streams)

    @contextlib.contextmanager
    def stream(self, stream: FakeStream) -> Iterator[None]:
        previous, self.current = self.current, stream
        self.log.append(("enter", stream.name))
        try:
            yield
        finally:
            self.current = previous
            self.log.append(("exit", stream.name))

    def Event(self, enable_timing: bool = False, **_: Any) -> FakeEvent:  # noqa: N802
        return FakeEvent(self, enable_timing)

    def current_stream(self, device: Any = None) -> FakeStream:
        return self.current

    def record_stream(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        self.log.append(("record_stream", stream.name, tuple(tensor.shape)))

    def synchronize(self, device: Any = None) -> None:
        self.log.append(("device_sync",))
        if self.gpu_busy:
            raise WaitedForGpu("torch.cuda.synchronize() while the GPU is busy")

    # allocator
    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def memory_stats(self, device: Any = None) -> Dict[str, int]:
        return dict(self.stats)

    def memory_allocated(self, device: Any = None) -> int:
        return self.stats.get("allocated_bytes.all.current", 0)

    def memory_reserved(self, device: Any = None) -> int:
        return self.stats.get("reserved_bytes.all.current", 0)

    def max_memory_allocated(self, device: Any = None) -> int:
        return self.stats.get("allocated_bytes.all.peak", 0)

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        self.log.append(("reset_peak",))
        self.stats["allocated_bytes.all.peak"] = self.stats.get("allocated_bytes.all.current", 0)

    def empty_cache(self) -> None:
        self.log.append(("empty_cache",))

    def mem_get_info(self, device: Any = None) -> Tuple[int, int]:
        return self.free_total

    def get_per_process_memory_fraction(self, device: Any = None) -> float:
        return self.fraction

    def memory_snapshot(self) -> List[Dict[str, Any]]:
        self.log.append(("snapshot",))
        return [dict(s) for s in self.segments]

    # test helpers
    def ordering_records(self, since: int = 0, *, but: str = "") -> List[Tuple[str, int]]:
        """(stream, event id) of the non-timing events recorded after log position ``since``
        on streams other than ``but`` (the ones that order work, not the stopwatches)."""
        return [(e[1], e[2]) for e in self.log[since:]
                if e[0] == "record" and e[1] != but and e[2] not in self.timed]

    def entries(self, kind: str) -> List[Tuple[Any, ...]]:
        """The log entries of one kind, in order."""
        return [e for e in self.log if e[0] == kind]

    def index(self, entry: Tuple[Any, ...]) -> int:
        """Position of the first log entry equal to ``entry``."""
        return self.log.index(entry)


class CopyLog(TorchFunctionMode):
    """While active, logs ``("copy", stream)`` in ``fake.log`` for every ``Tensor.to`` /
    ``copy_`` / ``pin_memory``, naming the fake's current stream (``"pin"`` for pinning)."""

    def __init__(self, fake: FakeCuda) -> None:
        super().__init__()
        self.fake = fake

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        if func in (torch.Tensor.to, torch.Tensor.copy_):
            self.fake.log.append(("copy", self.fake.current.name))
        return func(*args, **(kwargs or {}))
