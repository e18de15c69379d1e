"""Readahead hints: tell the kernel which rows the next windows of an epoch read.

The "block" and "sequential" orders read storage a window at a time (NOTE(epoch-order) in
order.py), so the rows of the next windows are known in advance.  Before each batch is read,
:class:`Readahead` passes the row ranges of the window holding it and of the :data:`AHEAD`
windows after it to the source's ``will_need(first_row, rows)`` (``POSIX_FADV_WILLNEED`` on
their bytes), so storage reads them while the current window is consumed.  Each window is
hinted once per epoch.  "shuffle" has no windows (its rows are spread over the whole file):
its cold reads keep many requests in flight instead (NOTE(cold-probe) in sources/pread.py).
"""
from __future__ import annotations

from typing import Any, Optional

from gpuloader.order import EpochOrder

#: Windows hinted beyond the one being read (a window is a few blocks of ~4 MB).
AHEAD = 2


class Readahead:
    """Hints ``source.will_need`` ahead of reads in window order (lifetime: the loader's)."""

    def __init__(self, source: Any) -> None:
        self._will_need = source.will_need
        self._order: Optional[EpochOrder] = None
        self._upto = -1  # highest window hinted for self._order

    @staticmethod
    def fits(view: Any, pool: Any) -> bool:
        """True when hints apply: the source takes them (flat files, HDF5), dataset positions
        are its rows (no Subset), and this process reads it (reader processes open their own
        handles; hinting from here would open handles that outlive the loader)."""
        from gpuloader.processes import ProcessReaderPool
        return (callable(getattr(view.source, "will_need", None)) and view.index_map is None
                and not isinstance(pool, ProcessReaderPool))

    def before(self, order: Any, start: int, stop: int) -> None:
        """Hint the windows of positions ``start .. stop - 1`` of ``order`` and AHEAD more."""
        if not isinstance(order, EpochOrder) or stop <= start:
            return
        first, last = order.window_of(start), order.window_of(stop - 1)
        if first is None or last is None:
            return
        if order is not self._order or first < self._upto - AHEAD - 1:
            self._order, self._upto = order, first - 1  # a new epoch, or a rewind
        for window in range(max(first, self._upto + 1), last + AHEAD + 1):
            for row, rows in order.window_rows(window):
                self._will_need(row, rows)
        self._upto = max(self._upto, last + AHEAD)
