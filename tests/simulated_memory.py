"""A simulated device allocator for CPU tests of shape-aware batch planning and ``oom_guard``.

``SimulatedMemory`` stands in for a GPU running a sequence model: a training step on a batch of
``B`` samples padded to length ``L`` peaks at ``fixed + per_token*B*L + per_token_length*B*L**2``
bytes (the last term: attention scores), plus ``first_shape_extra`` bytes the first time a shape
runs (cudnn autotuning a new shape) and any ``jitter`` the test draws.  A step whose peak exceeds
``limit`` raises ``torch.cuda.OutOfMemoryError`` -- the error ``oom_guard`` recognises -- before
anything is recorded as run.  ``max_batch(L)`` is the ground truth (a bisection over ``B``) that
plans are compared against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Set, Tuple

import torch

Shape = Tuple[int, int]


@dataclass
class SimulatedMemory:
    """A device with ``limit`` bytes for the step and the cost model above (bytes throughout).

    ``history`` lists ``(batch, length, peak, ran)`` for every step tried, OOMs included
    (``ran`` False).  Lifetime: one test.
    """

    limit: int
    fixed: int = 0
    per_token: int = 0
    per_token_length: int = 0
    first_shape_extra: int = 0
    history: List[Tuple[int, int, int, bool]] = field(default_factory=list)
    _seen: Set[Shape] = field(default_factory=set)

    def base_peak(self, batch: int, length: int = 1) -> int:
        """The step's peak without the first-run extra (what a repeated shape costs)."""
        return self.fixed + batch * length * (self.per_token + self.per_token_length * length)

    def step(self, batch: int, length: int = 1, *, jitter: int = 0) -> int:
        """Run one step of shape ``(batch, length)``: its peak in bytes, or OutOfMemoryError."""
        if batch < 1 or length < 1:
            raise ValueError(f"a step needs batch >= 1 and length >= 1, got ({batch}, {length})")
        peak = self.base_peak(batch, length) + jitter
        if (batch, length) not in self._seen:
            peak += self.first_shape_extra
        if peak > self.limit:
            self.history.append((batch, length, peak, False))
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory (simulated). Tried a step of shape ({batch}, {length}) "
                f"peaking at {peak} bytes with {self.limit} bytes available")
        self._seen.add((batch, length))
        self.history.append((batch, length, peak, True))
        return peak

    def run(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> int:
        """``step`` for a padded ``(B, L)`` batch (``lengths`` only checked against ``L``), or a
        fixed-row batch ``(B, ...)`` as length 1."""
        batch = int(tokens.shape[0])
        length = int(tokens.shape[1]) if lengths is not None else 1
        if lengths is not None and len(lengths) and int(lengths.max()) > length:
            raise ValueError(f"lengths up to {int(lengths.max())} in a batch padded to {length}")
        return self.step(batch, length)

    @property
    def ooms(self) -> int:
        """Steps that ran out of memory so far."""
        return sum(1 for *_, ran in self.history if not ran)

    def max_batch(self, length: int = 1, *, budget: Optional[int] = None) -> int:
        """Largest batch of ``length``-long samples whose repeated-shape peak fits ``budget``
        (default: ``limit``), found by bisection; 0 when not even one sample fits."""
        cap = self.limit if budget is None else budget
        if self.per_token == 0 and self.per_token_length == 0:
            raise ValueError("max_batch: the batch is unbounded when no cost grows with it")
        low, high = 0, 1
        while self.base_peak(high, length) <= cap:
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            if self.base_peak(middle, length) <= cap:
                low = middle
            else:
                high = middle
        return low
