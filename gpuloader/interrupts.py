"""SIGTERM and Ctrl-C during training: finish the step, checkpoint, then stop.

NOTE(train-signals): cluster schedulers preempt a job with SIGTERM (and a grace period), people
press Ctrl-C.  While ``gpuloader.train.run`` trains, both only *record* the signal; the loop
stops at the next optimizer-step boundary, writes the checkpoint, and ``run`` raises
:class:`TrainingInterrupted` (a KeyboardInterrupt, so ``except Exception`` does not swallow it),
so ``--resume`` continues exactly.  A second signal of either kind restores the previous
handlers and is delivered at once (an impatient second Ctrl-C still stops the process).
Handlers are installed only from the main thread (Python allows no other) and are restored when
the run ends.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Dict, Iterator, Optional

__all__ = ["TrainingInterrupted", "Signals", "deferred_signals"]

_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None))
                 if s is not None)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by a signal after saving its checkpoint.  ``signum``: the signal number;
    ``exit_code``: 128 + signum, the status a shell reports for it."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class Signals:
    """The signal recorded while handlers were deferred (``signum`` is None until one arrives)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:  # the second signal: act as if we were never here
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def install(self) -> None:
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@contextlib.contextmanager
def deferred_signals() -> Iterator[Signals]:
    """Record SIGINT/SIGTERM instead of acting on them, for the duration of the block
    (NOTE(train-signals)); outside the main thread nothing is deferred."""
    caught = Signals()
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    caught.install()
    try:
        yield caught
    finally:
        caught.restore()
