"""Background reader threads that gather batches from a Source into caller-given buffers.

numpy copies out of memory maps and in-RAM arrays release the GIL, so a few threads read in
parallel even at ``num_workers=0``.  Threads are named, poll a stop event with a timeout (so
``close()`` returns promptly), and hand exceptions back to the consumer with the indices that
were being read.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import numpy as np

from gpuloader.sources.base import Source
from gpuloader.stats import LoaderStats

_POLL_S = 0.1  # how often idle threads look at the stop event


@dataclass
class ReadJob:
    """Read ``indices`` into ``out`` (numpy views of a buffer); ``payload`` rides along."""

    seq: int
    indices: np.ndarray
    out: Dict[str, np.ndarray]
    payload: Any = None
    before: Optional[Callable[[], None]] = None  # run in the reader first (e.g. wait for a slot)


def describe_indices(indices: np.ndarray, limit: int = 8) -> str:
    """A short text naming the indices of a failed read."""
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    more = f", ... ({len(indices)} in all)" if len(indices) > limit else ""
    return f"[{shown}{more}]"


class ReaderPool:
    """``threads`` daemon threads serving read jobs in any order; results are fetched by seq.

    Lifetime: threads start in the constructor and end in :meth:`close` (idempotent).
    """

    def __init__(self, source: Source, threads: int, stats: LoaderStats, *,
                 name: str = "gpuloader-reader") -> None:
        self._source = source
        self._stats = stats
        self._jobs: "queue.Queue[Optional[ReadJob]]" = queue.Queue()
        self._done: Dict[int, tuple] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._outstanding = 0
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        for t in self._threads:
            t.start()

    def submit(self, job: ReadJob) -> None:
        """Queue ``job``; its result is collected with :meth:`result`."""
        with self._cond:
            self._outstanding += 1
        self._jobs.put(job)

    def result(self, seq: int) -> ReadJob:
        """Block until job ``seq`` finished; re-raise its exception with the indices added."""
        with self._cond:
            while seq not in self._done:
                if self._stop.is_set():
                    raise RuntimeError("gpuloader: the reader pool was closed while waiting")
                self._cond.wait(_POLL_S)
            job, error, thread_name = self._done.pop(seq)
        if error is not None:
            error.add_note(f"gpuloader: raised in reader thread {thread_name} while reading "
                           f"sample indices {describe_indices(job.indices)}")
            raise error
        return job

    def done(self, seq: int) -> bool:
        """True when job ``seq`` has finished (successfully or not); never blocks."""
        with self._cond:
            return seq in self._done

    def drain(self) -> None:
        """Wait until no job is queued or running, and forget every result."""
        with self._cond:
            while self._outstanding and not self._stop.is_set():
                self._cond.wait(_POLL_S)
            self._done.clear()

    def _run(self) -> None:
        name = threading.current_thread().name
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if job is None:  # close() wakes each thread with one None
                return
            error: Optional[BaseException] = None
            started = time.perf_counter()
            try:
                if job.before is not None:
                    job.before()
                self._source.read_into(job.indices, job.out)
            except Exception as exc:  # handed to the consumer, which re-raises it
                error = exc
            self._stats.add_read(time.perf_counter() - started)
            with self._cond:
                self._done[job.seq] = (job, error, name)
                self._outstanding -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """Stop and join every thread; pending jobs are dropped."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for _ in self._threads:
            self._jobs.put(None)  # wake idle threads now instead of after their poll timeout
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()
        self._done.clear()

    @property
    def alive(self) -> bool:
        """True while any reader thread runs."""
        return any(t.is_alive() for t in self._threads)
