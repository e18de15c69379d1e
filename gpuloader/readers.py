"""Background reader threads that gather batches from a Source into caller-given buffers.

numpy's gathers out of memory maps and in-RAM arrays release the GIL, so reader threads read
ahead while the training step runs, even at ``num_workers=0``.  Threads are named, wait on a
condition that ``close()`` signals (so it returns promptly), and hand exceptions back to the
consumer with the indices that were being read.

NOTE(work-stealing): while the consumer waits for a batch it reads queued jobs itself — its own
batch if no reader has started it, else the next one queued that is ready.  When readers are starved of CPU
(by the training step's threads or other processes) the pipeline then degrades to reading
synchronously instead of sleeping on a preempted reader.

NOTE(no-gpu-wait-on-draw): a job into a pinned host slot first waits (``before``) for the device
copy out of that slot's previous batch, which can sit behind GPU work of steps long queued.
Drawing a batch must not make that wait for another batch: the consumer steals only jobs whose
``ready()`` says the wait is over, and the process pool (processes.py) writes a slot — and so
waits — only when it copies a finished read out, never on submit.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, Optional, Protocol, Tuple

import numpy as np

from gpuloader.errors import add_note
from gpuloader.sources import pread
from gpuloader.sources.base import Source
from gpuloader.stats import LoaderStats

_POLL_S = 0.1  # how often a waiting consumer re-checks that the pool is still open


@dataclass
class ReadJob:
    """Read ``indices`` into ``out`` (numpy views of a buffer)."""

    seq: int
    indices: np.ndarray
    out: Dict[str, np.ndarray]
    before: Optional[Callable[[], None]] = None  # run by the reader first (e.g. wait for a slot)
    #: True when ``before`` would not block (the slot's last device copy finished); None: never
    #: blocks.  The consumer only reads jobs that are ready (NOTE(no-gpu-wait-on-draw)).
    ready: Optional[Callable[[], bool]] = None

    def is_ready(self) -> bool:
        """Whether ``before`` can run now without waiting for the GPU."""
        return self.ready is None or self.ready()


class Pool(Protocol):
    """What the fast path reads through: reader threads (ReaderPool) or reader processes
    (ProcessReaderPool in processes.py).  Jobs are submitted in order and collected by seq."""

    def submit(self, job: ReadJob) -> None:
        """Queue ``job``."""

    def result(self, seq: int) -> ReadJob:
        """Wait for job ``seq``; its rows are then in its buffers, or its error is raised."""

    def done(self, seq: int) -> bool:
        """True once job ``seq`` finished and its rows are in its buffers; never blocks."""

    def drain(self) -> None:
        """Wait for (or drop) every job in flight and forget their results."""

    def close(self) -> None:
        """Stop the readers; idempotent."""


def describe_indices(indices: np.ndarray, limit: int = 8) -> str:
    """A short text naming the indices of a failed read."""
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    more = f", ... ({len(indices)} in all)" if len(indices) > limit else ""
    return f"[{shown}{more}]"


class ReaderPool:
    """``threads`` daemon threads serving read jobs in submission order; results are fetched
    by seq (see NOTE(work-stealing)).

    Lifetime: threads start in the constructor and end in :meth:`close` (idempotent).
    """

    def __init__(self, source: Source, threads: int, stats: LoaderStats, *,
                 name: str = "gpuloader-reader") -> None:
        self._source = source
        self._stats = stats
        self._queue: Deque[ReadJob] = deque()
        self._done: Dict[int, Tuple[ReadJob, Optional[BaseException], str]] = {}
        self._running = 0
        self._cond = threading.Condition()
        self._stop = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        pread.acquire()  # cold batches may use the I/O pool while we live (NOTE(io-leases))
        self._leased = True
        for t in self._threads:
            t.start()

    def submit(self, job: ReadJob) -> None:
        """Queue ``job``; its result is collected with :meth:`result`."""
        with self._cond:
            self._queue.append(job)
            self._cond.notify()

    def result(self, seq: int) -> ReadJob:
        """Block until job ``seq`` finished — reading queued jobs here meanwhile (NOTE(work-
        stealing)) — and re-raise its exception with the indices added."""
        with self._cond:
            while seq not in self._done:
                if self._stop:
                    raise RuntimeError("gpuloader: the reader pool was closed while waiting")
                job = self._job_to_steal(seq)
                if job is not None:
                    self._queue.remove(job)
                    self._running += 1
                    self._cond.release()
                    try:
                        outcome = self._read(job)
                    except BaseException:
                        # Interrupted mid-read (KeyboardInterrupt): put the job back unread, or
                        # drain() would wait for it forever (close() hangs) and a later
                        # result() for it would never return.
                        self._cond.acquire()
                        self._running -= 1
                        self._queue.appendleft(job)
                        self._cond.notify_all()
                        raise
                    self._cond.acquire()
                    self._record(job, *outcome)
                    continue
                self._cond.wait(_POLL_S)
            job, error, where = self._done.pop(seq)
        if error is not None:
            add_note(error, f"gpuloader: raised in {where} while reading sample indices "
                            f"{describe_indices(job.indices)}")
            raise error
        return job

    def _job_to_steal(self, seq: int) -> Optional[ReadJob]:
        """Our job ``seq`` first if nobody started it, else the next queued job that is ready:
        either way the consumer reads instead of sleeping while readers are starved.  Another
        batch's job that would wait for the GPU is left to the readers (NOTE(no-gpu-wait-on-
        draw)).  The caller holds ``_cond``."""
        own = next((j for j in self._queue if j.seq == seq), None)
        if own is not None:
            return own
        return next((j for j in self._queue if j.is_ready()), None)

    def done(self, seq: int) -> bool:
        """True when job ``seq`` has finished (successfully or not); never blocks."""
        with self._cond:
            return seq in self._done

    def drain(self) -> None:
        """Drop queued jobs, wait for running ones, and forget every result."""
        with self._cond:
            self._queue.clear()
            while self._running and not self._stop:
                self._cond.wait(_POLL_S)
            self._done.clear()

    def _read(self, job: ReadJob) -> Tuple[Optional[BaseException], str]:
        where = f"reader thread {threading.current_thread().name}"
        started = time.perf_counter()
        try:
            if job.before is not None:
                job.before()
            self._source.read_into(job.indices, job.out)
            error: Optional[BaseException] = None
        except Exception as exc:  # handed to the consumer, which re-raises it
            error = exc
        self._stats.add_read(time.perf_counter() - started)
        return error, where

    def _record(self, job: ReadJob, error: Optional[BaseException], where: str) -> None:
        """Store a finished job's outcome; the caller holds ``_cond``."""
        self._done[job.seq] = (job, error, where)
        self._running -= 1
        self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._queue.popleft()
                self._running += 1
            try:
                outcome = self._read(job)
            except BaseException as exc:  # SystemExit from a source: a thread would end
                # silently, leaving its job neither done nor queued (result()/drain() hang).
                outcome = (exc, f"reader thread {threading.current_thread().name}")
            with self._cond:
                self._record(job, *outcome)

    def close(self) -> None:
        """Stop and join every thread; queued jobs are dropped."""
        with self._cond:
            self._stop = True
            self._queue.clear()
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()
        self._done.clear()
        if self._leased:
            self._leased = False
            pread.release()
