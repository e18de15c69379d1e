"""The CUDA caching allocator as the loader sees it: what it can really hand out, and what a
guarded step cost.

NOTE(allocatable): ``mem_get_info`` free plus the allocator's reserved-but-unallocated bytes
overstates what a training step can get.  Cached bytes in a segment that still holds a live
block are fragments, usable only by allocations that fit them; the small pool serves only
allocations under 1 MB; blocks of a CUDA graph's private pool or cached on another stream
(the copy stream's) are not handed to the step's stream at all; and
``torch.cuda.set_per_process_memory_fraction`` caps the reserve whatever the device has free.
So :func:`allocatable` counts, on the step's stream, wholly free large segments in full and the
largest free block of each partly used one, plus the device's free bytes up to the process cap.

NOTE(user-peak): measuring a guarded step's peak means resetting torch's peak statistics, which
frameworks and users read for their own logging.  :class:`StepMemory` resets them only when it
learns the step cost (``batch_size="auto"``), and keeps the running maximum that
``torch.cuda.max_memory_allocated`` would have reported without those resets
(:meth:`StepMemory.max_memory_allocated`, also ``DataLoader.stats()["max_memory_allocated"]``).
"""
from __future__ import annotations

import gc
import math
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from gpuloader.streams import CUDA

_DEFAULT_POOL = (0, 0)


def _reusable(segment: Dict[str, Any]) -> int:
    """Bytes of one cached segment an allocation of the step could use: all of it when no
    block is live, else its largest free block."""
    if segment.get("allocated_size", 0) == 0 and segment.get("active_size", 0) == 0:
        return int(segment.get("total_size", 0))
    free_blocks = [b.get("size", 0) for b in segment.get("blocks", ())
                   if b.get("state") == "inactive"]
    return int(max(free_blocks, default=0))


def reusable_cached(segments: Iterable[Dict[str, Any]], index: int, stream: int) -> int:
    """Cached bytes the allocator could hand to an allocation on ``stream`` (a
    ``cudaStream_t`` as an int) of device ``index`` (NOTE(allocatable))."""
    total = 0
    for seg in segments:
        if seg.get("device", index) != index or seg.get("segment_type") != "large" \
                or seg.get("stream", 0) != stream \
                or tuple(seg.get("segment_pool_id", _DEFAULT_POOL)) != _DEFAULT_POOL:
            continue
        total += _reusable(seg)
    return total


def allocatable(index: int, *, cuda: Any = None) -> Tuple[int, int]:
    """``(free, total)`` bytes of CUDA device ``index`` that this process can allocate now on
    its current stream (NOTE(allocatable)); ``total`` is the device's memory under the process
    cap.  CUDA must be initialised."""
    cuda = CUDA if cuda is None else cuda
    device_free, total = (int(v) for v in cuda.mem_get_info(index))
    reserved = int(cuda.memory_reserved(index))
    fraction = cuda.get_per_process_memory_fraction(index) \
        if hasattr(cuda, "get_per_process_memory_fraction") else 1.0
    cap = math.floor(total * fraction)
    grow = max(0, min(device_free, cap - reserved))
    stream = int(getattr(cuda.current_stream(index), "cuda_stream", 0))
    cached = reusable_cached(cuda.memory_snapshot(), index, stream)
    return grow + cached, min(total, cap)


class StepMemory:
    """One loader's view of a CUDA ``device`` around guarded steps (NOTE(user-peak)).

    ``learn``: measure each step's peak (the loader sets it under ``batch_size="auto"``).
    Lifetime: one per loader; stateless between steps but for the running peak.
    """

    def __init__(self, device: torch.device, *, learn: bool, cuda: Any = None) -> None:
        self.device = device
        self.learn = learn
        self._cuda = CUDA if cuda is None else cuda
        self._peak_seen = 0
        self._before = 0

    def begin(self) -> None:
        """A guarded step starts: when learning, read the peak so far, then reset it."""
        if not self.learn:
            return
        cuda = self._cuda
        self._peak_seen = max(self._peak_seen, int(cuda.max_memory_allocated(self.device)))
        cuda.reset_peak_memory_stats(self.device)
        self._before = int(cuda.memory_allocated(self.device))

    def step_peak(self) -> Optional[int]:
        """Bytes the finished step needed beyond what was allocated before and after it (memory
        it kept — optimizer state, gradients — is no per-step cost); None when not learning."""
        if not self.learn:
            return None
        cuda = self._cuda
        peak = int(cuda.max_memory_allocated(self.device))
        self._peak_seen = max(self._peak_seen, peak)
        after = int(cuda.memory_allocated(self.device))
        return max(0, peak - max(self._before, after))

    def max_memory_allocated(self) -> int:
        """``torch.cuda.max_memory_allocated(device)`` as it would read had no guarded step
        reset it (the running maximum since the loader was built, at least)."""
        return max(self._peak_seen, int(self._cuda.max_memory_allocated(self.device)))

    def release(self) -> None:
        """After an out-of-memory error: collect garbage and return cached blocks to the
        driver, so the re-plan sees what is free once the failed step's tensors are gone."""
        gc.collect()
        self._cuda.empty_cache()
