"""Per-stage timings of a loader: cheap counters that stay on.

All times are seconds of wall clock measured with ``time.perf_counter``, except the device
copies' ``copy_s`` / ``copy_stall_s``, measured on the GPU with CUDA events; byte counts are the
bytes of the delivered batches (all fields).  Reader time is summed over reader threads, so it
can exceed the elapsed time when several threads read at once.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Deque, Dict, NamedTuple

_MIN_ELAPSED_S = 1e-9  # keeps rates finite for windows too short to time
#: Batch-size changes stats()["batch_sizes"] keeps (the most recent ones).
SIZE_HISTORY = 32


class Rates(NamedTuple):
    """Throughput over one window: samples/s, GB/s (1e9 bytes) and the share of the window
    the consumer waited for data (0 to 1)."""

    samples_per_s: float
    gb_per_s: float
    stall_fraction: float


def rates(samples: int, nbytes: int, elapsed_s: float, wait_s: float = 0.0) -> Rates:
    """The one place loader, training, demo and benchmark figures are derived from counts."""
    elapsed = max(elapsed_s, _MIN_ELAPSED_S)
    return Rates(samples / elapsed, nbytes / elapsed / 1e9, min(1.0, wait_s / elapsed))


class LoaderStats:
    """Counters for one loader, shared by the consumer and its reader threads.

    Lifetime: one per loader; :meth:`reset` starts a new measurement window (each epoch's first
    batch does not reset it — call it yourself to time one epoch).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Zero every counter and restart the elapsed clock."""
        with self._lock:
            self.samples = 0
            self.batches = 0
            self.bytes = 0
            self.wait_s = 0.0
            self.read_s = 0.0
            self.copy_s = 0.0
            self.copy_stall_s = 0.0
            self.oom_count = 0
            self.rolled_back_samples = 0
            self.batch_sizes: Deque[int] = deque(maxlen=SIZE_HISTORY)
            self._started = time.perf_counter()

    def add_read(self, seconds: float) -> None:
        """A reader spent ``seconds`` gathering one batch (called from reader threads)."""
        with self._lock:
            self.read_s += seconds

    def add_copy(self, seconds: float, stall_s: float = 0.0) -> None:
        """Device copies took ``seconds`` on the GPU's copy engine, and the consumer's stream
        waited ``stall_s`` of that for them (CUDA events: NOTE(copy-timing) in buffers.py).
        The stall counts in ``stall_fraction`` with the host's waits."""
        self.copy_s += seconds
        self.copy_stall_s += stall_s

    def add_delivery(self, samples: int, nbytes: int, waited_s: float) -> None:
        """A batch of ``samples`` rows (``nbytes`` bytes) was handed out after ``waited_s``."""
        self.samples += samples
        self.batches += 1
        self.bytes += nbytes
        self.wait_s += waited_s
        # History of distinct sizes in the order they were used: a run of equal batches adds one
        # entry, and only the last SIZE_HISTORY changes are kept (an epoch's short last batch
        # adds two per epoch), so it stays bounded however long the run.
        if not self.batch_sizes or self.batch_sizes[-1] != samples:
            self.batch_sizes.append(samples)

    def add_rollback(self, samples: int) -> None:
        """``samples`` delivered rows were rolled back by an out-of-memory retry."""
        self.oom_count += 1
        self.rolled_back_samples += samples

    def snapshot(self) -> Dict[str, object]:
        """A plain dict of every counter plus derived rates (safe to JSON-encode)."""
        elapsed = max(time.perf_counter() - self._started, _MIN_ELAPSED_S)
        rate = rates(self.samples, self.bytes, elapsed, self.wait_s + self.copy_stall_s)
        return {
            "samples": self.samples,
            "batches": self.batches,
            "bytes": self.bytes,
            "elapsed_s": elapsed,
            "wait_s": self.wait_s,
            "read_s": self.read_s,
            "copy_s": self.copy_s,
            "copy_stall_s": self.copy_stall_s,
            "stall_fraction": rate.stall_fraction,
            "samples_per_s": rate.samples_per_s,
            "gb_per_s": rate.gb_per_s,
            "batch_sizes": list(self.batch_sizes),
            "oom_count": self.oom_count,
            "rolled_back_samples": self.rolled_back_samples,
        }
