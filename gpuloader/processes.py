"""Reader processes, for sources whose reads cannot run in parallel in threads.

h5py serialises every call behind one global lock, so compressed (or otherwise unmappable) HDF5
fields read through h5py gain nothing from threads.  With ``num_workers > 0`` the fast path then
reads in worker processes instead: each opens the (picklable) source itself, gathers a batch into
one of a ring of shared-memory slots, and the consumer copies the rows out into the batch's own
buffer — one memcpy, small next to decompression.  The pool follows readers.Pool.

NOTE(process-slots): a job owns its slot from ``submit`` until ``result`` has copied it out, so at
most ``slots`` jobs are in flight; the fast path keeps ``prefetch_depth + 1`` in flight and the
loader gives the pool ``buffers.ring_slots(prefetch_depth)`` slots.

NOTE(pool-renewal): a pool belongs to the process that started it.  In a process forked from it
(a loader used in ``os.fork()``'s child, or in a forked worker of some other library) the
workers, queues and shared-memory slots are the parent's: the child never touches them -- not
even in ``close()`` -- and its first ``submit`` raises a RuntimeError saying so.  (Starting
workers of its own is not possible there: torch's ``share_memory_`` hangs in a process forked
from one that already shared memory.)  A worker that died (killed, out of memory) fails
the epoch it was serving with a clear error; the next ``submit`` with no job in flight -- the
next epoch -- stops the survivors and starts a fresh set, as torch starts fresh workers for
each epoch.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import numpy as np
import torch

from gpuloader.buffers import allocate, numpy_views
from gpuloader.errors import add_note
from gpuloader.readers import ReadJob, describe_indices
from gpuloader.sources import pread
from gpuloader.sources.base import FieldSpec, Source
from gpuloader.stats import LoaderStats

_POLL_S = 0.1
_JOIN_S = 5.0


def needs_processes(source: Source) -> bool:
    """True when some field is read through h5py calls (``read_path == "slab"``), which hold
    h5py's global lock: threads would take turns, processes run side by side."""
    storage = getattr(source, "storage", None) or {}
    return any(info.read_path == "slab" for info in storage.values())


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError carrying its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # any pickling failure: send text instead
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _serve(shared: List[Any]) -> None:
    """Worker process loop: read (seq, slot, indices) jobs until a None arrives.

    ``shared`` is ``[source, slots, jobs, done]``: one list, which the parent's ``close()``
    empties, so its Process objects stop holding the shared memory and queues (NOTE(no-leaks)).
    """
    source, slots, jobs, done = shared
    torch.set_num_threads(1)  # the parent's compute threads need the cores
    pread.acquire()  # this process's cold reads may use an I/O pool (NOTE(io-leases))
    try:
        _serve_jobs(source, slots, jobs, done)
    finally:
        pread.release()


def _serve_jobs(source: Source, slots: List[Any], jobs: Any, done: Any) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        seq, slot, indices = job
        started = time.perf_counter()
        try:
            source.read_into(indices, numpy_views(slots[slot], len(indices)))
            done.put((seq, None, time.perf_counter() - started))
        except Exception as exc:  # handed to the consumer, which re-raises it
            done.put((seq, _portable(exc), time.perf_counter() - started))


class ProcessReaderPool:
    """``processes`` worker processes reading into ``slots`` shared-memory batch buffers.

    Lifetime: processes start in the constructor and end in :meth:`close` (idempotent); they
    are daemons, so they also end with the interpreter.
    """

    def __init__(self, source: Source, fields: Mapping[str, FieldSpec], capacity: int,
                 slots: int, processes: int, stats: LoaderStats, *,
                 context: Optional[Any] = None) -> None:
        ctx = context if context is not None else mp.get_context()
        if isinstance(ctx, str):
            ctx = mp.get_context(ctx)
        self._ctx = ctx
        self._source = source
        self._fields = fields
        self._stats = stats
        self.capacity = capacity
        self._slot_count = slots
        self._processes = max(1, processes)
        self._closed = False
        self._start()

    def _start(self) -> None:
        """Allocate slots and queues and start the workers (NOTE(pool-renewal))."""
        self._owner = os.getpid()
        self._slots = [allocate(self._fields, self.capacity, device=torch.device("cpu"))
                       for _ in range(self._slot_count)]
        for slot in self._slots:
            for t in slot.values():
                t.share_memory_()
        self._free = list(range(self._slot_count))
        self._jobs: Any = self._ctx.Queue()
        self._done_q: Any = self._ctx.Queue()
        self._waiting: Dict[int, Tuple[ReadJob, int]] = {}
        self._done: Dict[int, Tuple[Optional[BaseException], float]] = {}
        self._filled: Set[int] = set()  # finished jobs already copied out of their slots
        self._shared: List[Any] = [self._source, self._slots, self._jobs, self._done_q]
        self._procs = [self._ctx.Process(target=_serve, name=f"gpuloader-reader-proc-{i}",
                                         args=(self._shared,), daemon=True)
                       for i in range(self._processes)]
        for p in self._procs:
            p.start()

    @property
    def _foreign(self) -> bool:
        """True in a process forked from the one that started the workers."""
        return os.getpid() != self._owner

    def _forget(self) -> None:
        """Drop a forked parent's workers, queues and slots without touching them."""
        self._procs, self._shared, self._slots = [], [], []
        self._jobs = self._done_q = None
        self._waiting, self._done, self._filled = {}, {}, set()

    def _renew_if_needed(self) -> None:
        """NOTE(pool-renewal): a clear error in a forked child; fresh workers after one died."""
        if self._foreign:
            owner = self._owner
            self._forget()
            raise RuntimeError(
                f"gpuloader: this DataLoader's reader processes belong to process {owner}, "
                f"and this process ({os.getpid()}) was forked from it; a forked child cannot "
                "read through them (nor start its own: torch's shared memory does not work "
                "after such a fork).  Iterate the loader in the parent only, or start the "
                "child with the 'spawn' multiprocessing context and build a loader there")
        if not self._waiting and any(not p.is_alive() for p in self._procs):
            self._stop_workers()
            self._start()

    def submit(self, job: ReadJob) -> None:
        """Queue ``job`` into a free slot (see NOTE(process-slots)).  Its ``before`` runs only
        when the rows are copied out into its buffer (NOTE(no-gpu-wait-on-draw) in readers.py).
        See NOTE(pool-renewal) for a forked child and for workers that died."""
        if self._closed:
            raise RuntimeError("gpuloader: submit() on a closed reader-process pool")
        self._renew_if_needed()
        slot = self._free.pop()
        self._waiting[job.seq] = (job, slot)
        self._jobs.put((job.seq, slot, job.indices))

    def _collect(self, block: bool) -> None:
        while True:
            try:
                seq, error, seconds = self._done_q.get(timeout=_POLL_S) if block else \
                    self._done_q.get_nowait()
            except queue.Empty:
                return
            self._stats.add_read(seconds)
            self._done[seq] = (error, seconds)
            if block:
                return

    def done(self, seq: int) -> bool:
        """True when job ``seq`` has finished *and its rows are in the job's buffers*, as with
        ReaderPool: the fast path starts the device copy out of them on this signal.  Never
        blocks: while the job's buffer still feeds a device copy, it is not done yet (the copy
        out of the slot happens here, once)."""
        self._collect(block=False)
        if seq not in self._done:
            return False
        if seq not in self._filled and not self._waiting[seq][0].is_ready():
            return False
        self._fill(seq)
        return True

    def _fill(self, seq: int) -> None:
        """Copy finished job ``seq``'s rows out of its shared-memory slot (once)."""
        if seq in self._filled:
            return
        error, _ = self._done[seq]
        job, slot = self._waiting[seq]
        if job.before is not None:
            job.before()  # the buffer's previous device copy must be over before we write it
        if error is None:
            rows = len(job.indices)
            for name, out in job.out.items():
                np.copyto(out, self._slots[slot][name][:rows].numpy())
        self._filled.add(seq)

    def result(self, seq: int) -> ReadJob:
        """Wait for job ``seq``, copy its rows out of the slot, re-raise its error if any."""
        while seq not in self._done:
            dead = [p.name for p in self._procs if not p.is_alive()]
            if dead:
                raise RuntimeError(f"gpuloader: reader process(es) {', '.join(dead)} exited "
                                   "unexpectedly (killed, or out of memory?)")
            self._collect(block=True)
        try:
            self._fill(seq)
        finally:
            error, _ = self._done.pop(seq)
            job, slot = self._waiting.pop(seq)
            self._filled.discard(seq)
            self._free.append(slot)
        if error is not None:
            add_note(error, f"gpuloader: raised in a reader process while reading sample "
                            f"indices {describe_indices(job.indices)}")
            raise error
        return job

    def drain(self) -> None:
        """Wait for every job in flight and forget their results.  A job held by a worker that
        died never comes back: once any worker is dead, stop waiting (the pool is broken;
        ``result`` reports it) rather than hang ``close()`` on the way out of the error."""
        if self._foreign:  # the jobs in flight are the parent's (NOTE(pool-renewal))
            self._forget()
            return
        while self._waiting and not self._closed:
            seqs = list(self._waiting)
            for seq in seqs:
                while seq not in self._done and all(p.is_alive() for p in self._procs):
                    self._collect(block=True)
                self._done.pop(seq, None)
                self._filled.discard(seq)
                _, slot = self._waiting.pop(seq)
                self._free.append(slot)

    def close(self) -> None:
        """Stop the worker processes (joined; terminated if they do not exit in time).  In a
        forked child, only forget the parent's (NOTE(pool-renewal))."""
        if self._closed:
            return
        self._closed = True
        if self._foreign:
            self._forget()
            return
        self._stop_workers()

    def _stop_workers(self) -> None:
        for p in self._procs:
            if p.is_alive():
                self._jobs.put(None)
        for p in self._procs:
            p.join(_JOIN_S)
            if p.is_alive():
                p.terminate()
                p.join()
            p.close()  # its sentinel fd
        for q in (self._jobs, self._done_q):
            q.close()
            q.join_thread()
        self._waiting.clear()
        self._done.clear()
        self._filled.clear()
        # NOTE(no-leaks): release the shared-memory slots, the queues' pipes and semaphores now,
        # not when the loader is collected: "nothing outlives close()".  The Process objects
        # hold ``_shared`` among their args, so it is emptied in place.
        self._shared.clear()
        self._slots = []
        self._procs = []
        self._jobs = self._done_q = None

    @property
    def alive(self) -> bool:
        """True while any worker process runs."""
        return not self._closed and not self._foreign and any(p.is_alive() for p in self._procs)
