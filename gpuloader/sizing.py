"""The live batch size: shrink on out-of-memory, grow back after a cooldown, without thrashing.

NOTE(grow-back): after an out-of-memory error at size ``f`` the size drops to at most ``f // 2``
(or lower if the learned cost model says so) and ``f`` is remembered as a known-bad size.  After
``cooldown`` successful steps (16 at first) the size tries to grow, doubling towards the target but
staying below the known-bad size (bisecting towards it, then retrying it); each failed growth
attempt doubles the cooldown, so attempts get rarer and cannot thrash.  The known-bad size is forgotten when the memory probe reports more free memory than at
the failure, so the size can return to the target once memory frees.  A failed growth attempt
returns to the last size that worked rather than halving.  Sizes >= 8 stay multiples
of 8.

NOTE(agreed-growth): in a distributed job every rank must use the same size, or ranks deliver
different numbers of batches and their collectives stop matching.  Shrinking is agreed by the
AdaptiveBatch in adaptive.py (the OOM flag is all-reduced, then the new size is the minimum over
ranks).  Growth is agreed here: ``agree`` (AdaptiveBatch passes ``World.min``) is applied to the growth candidate at
the decision point.  That point is reached on the same step on every rank, because it depends
only on values that are identical on all ranks — ``current``, ``target``, ``cooldown`` and the
success count, which change only at agreed events — never on the per-rank free-memory probe.
The probe (and the known-bad size it may clear) only shapes each rank's *candidate*; the
minimum candidate wins, so the rank with the least room decides.
"""
from __future__ import annotations

from typing import Callable, Optional

INITIAL_COOLDOWN = 16


def round_size(size: int, floor: int) -> int:
    """``size`` rounded down to a multiple of 8 when >= 8, and at least ``floor``."""
    if size >= 8:
        size -= size % 8
    return max(floor, size)


class SizeController:
    """Holds the current batch size between ``floor`` and ``target`` (both in samples).

    ``free_bytes`` is called (rarely: only around out-of-memory events) to tell whether memory
    has been freed since the last failure.  ``agree`` maps this rank's growth candidate to the
    size all ranks use (a collective, called once per growth decision on every rank; see
    NOTE(agreed-growth)); None for a single process.  Lifetime: one per loader, across epochs.
    Out-of-memory events are counted once, by the loader's stats (``oom_count``).
    """

    def __init__(self, target: int, *, floor: int = 1,
                 free_bytes: Optional[Callable[[], int]] = None,
                 agree: Optional[Callable[[int], int]] = None) -> None:
        self.target = target
        self.floor = min(floor, target)
        self.current = target
        self.cooldown = INITIAL_COOLDOWN
        self._successes = 0
        self._bad: Optional[int] = None
        self._free_at_failure = 0
        self._growing_from: Optional[int] = None
        self._free_bytes = free_bytes
        self.agree = agree

    def set_target(self, target: int) -> None:
        """Change the size the controller grows towards (e.g. a new plan from free memory)."""
        self.target = max(self.floor, target)
        self.current = min(self.current, self.target)

    def on_oom(self, failed: int, predicted: Optional[int] = None) -> int:
        """Record an out-of-memory error at batch size ``failed``; return the new, smaller size.

        Raises ``ValueError`` when ``failed`` is already the floor: nothing smaller can be tried.
        """
        if failed <= self.floor:
            raise ValueError(f"a batch of {failed} sample(s) (min_batch_size={self.floor}) "
                             "does not fit in memory")
        new = failed // 2
        if self._growing_from is not None and failed > self._growing_from:
            # A growth attempt failed: go back to the size that worked and wait longer.
            self.cooldown *= 2
            new = self._growing_from
        self._growing_from = None
        if predicted is not None and predicted >= self.floor:
            new = min(new, predicted)
        # Never larger than now: a batch formed before an earlier shrink (torch's workers read
        # ahead on the generic path) can fail at a size far above the current one.
        new = min(new, self.current)
        self.current = round_size(max(self.floor, new), self.floor)
        self._bad = failed if self._bad is None else min(self._bad, failed)
        self._free_at_failure = self._free_bytes() if self._free_bytes else 0
        self._successes = 0
        return self.current

    def on_success(self, size: int) -> int:
        """Record a successful step of ``size`` samples; maybe grow.  Returns the size for the
        next batches."""
        self._successes += 1
        if self._growing_from is not None and size > self._growing_from:
            self._growing_from = None  # the grown size has worked once: the attempt succeeded
        if self.current >= self.target or self._successes < self.cooldown:
            return self.current
        if self._bad is not None and self._free_bytes is not None:
            if self._free_bytes() > self._free_at_failure * 1.25:
                self._bad = None  # memory was freed: the old failure no longer predicts
        candidate = min(self.target, self.current * 2)
        retrying: Optional[int] = None
        if self._bad is not None and candidate >= self._bad:
            candidate = round_size((self.current + self._bad) // 2, self.floor)
            if candidate <= self.current:  # bisection is exhausted: retry the failed size
                retrying, self._bad = self._bad, None
                candidate = min(self.target, retrying)
        candidate = round_size(candidate, self.floor)
        if self.agree is not None:  # NOTE(agreed-growth): every rank calls this here
            candidate = self.agree(candidate)
            if retrying is not None and candidate < retrying:
                self._bad = retrying  # another rank held the size lower: not retried yet
        if candidate > self.current:
            self._growing_from = self.current
            self.current = candidate
        self._successes = 0
        return self.current

    def state_dict(self) -> dict:
        """Plain-data state (the current size and cooldown) for checkpoints."""
        return {"current": self.current, "cooldown": self.cooldown}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output, clamped to this controller's bounds."""
        self.current = max(self.floor, min(self.target, int(state["current"])))
        self.cooldown = int(state["cooldown"])
