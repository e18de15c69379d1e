"""What every epoch iterator shares: its cursor and what happens when it is dropped early."""
from __future__ import annotations

from typing import Callable, Optional


class EpochCursor:
    """Position of one epoch: ``position`` samples delivered and not rolled back, the span of
    the last delivered batch, and ``finished`` once the epoch ran out.

    ``on_abandon(epoch, position, last_start, last_length)`` is called if the iterator is
    dropped before the epoch ends (the loader keeps those numbers: NOTE(no-cycles) in
    loader.py).  Subclasses implement ``__next__``, ``rewind`` and ``close``.
    """

    def __init__(self, epoch: int, start: int) -> None:
        self.epoch = epoch
        self.position = start
        self.finished = False
        self.last_start = start
        self.last_length = 0
        self.on_abandon: Optional[Callable[[int, int, int, int], None]] = None

    def __iter__(self) -> "EpochCursor":
        return self

    def __del__(self) -> None:
        if not self.finished and self.on_abandon is not None:
            try:
                self.on_abandon(self.epoch, self.position, self.last_start, self.last_length)
            except Exception:  # interpreter shutdown: the loader may be half torn down
                pass
