"""Reader processes, for sources whose reads cannot run in parallel in threads.

h5py serialises every call behind one global lock, so compressed (or otherwise unmappable) HDF5
fields read through h5py gain nothing from threads.  With ``num_workers > 0`` the fast path then
reads in worker processes instead: each opens the (picklable) source itself, gathers a batch into
one of a ring of shared-memory slots, and the consumer copies the rows out into the batch's own
buffer — one memcpy, small next to decompression.  The pool has the ReaderPool interface.

NOTE(process-slots): a job owns its slot from ``submit`` until ``result`` has copied it out, so at
most ``slots`` jobs are in flight; the fast path keeps ``prefetch_depth + 1`` in flight and the
loader gives the pool ``prefetch_depth + 2`` slots.
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from gpuloader.buffers import allocate, numpy_views
from gpuloader.readers import ReadJob, describe_indices
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


def _serve(source: Source, slots: List[Dict[str, torch.Tensor]], jobs: Any, done: Any) -> None:
    """Worker process loop: read (seq, slot, indices) jobs until a None arrives."""
    torch.set_num_threads(1)  # the parent's compute threads need the cores
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
        self._stats = stats
        self.capacity = capacity
        self._slots = [allocate(fields, capacity, device=torch.device("cpu")) for _ in
                       range(slots)]
        for slot in self._slots:
            for t in slot.values():
                t.share_memory_()
        self._free = list(range(slots))
        self._jobs = ctx.Queue()
        self._done_q = ctx.Queue()
        self._waiting: Dict[int, Tuple[ReadJob, int]] = {}
        self._done: Dict[int, Tuple[Optional[BaseException], float]] = {}
        self._procs = [ctx.Process(target=_serve, name=f"gpuloader-reader-proc-{i}",
                                   args=(source, self._slots, self._jobs, self._done_q),
                                   daemon=True) for i in range(max(1, processes))]
        for p in self._procs:
            p.start()
        self._closed = False

    def submit(self, job: ReadJob) -> None:
        """Queue ``job`` into a free slot (see NOTE(process-slots))."""
        if job.before is not None:
            job.before()
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
        """True when job ``seq`` has finished; never blocks."""
        self._collect(block=False)
        return seq in self._done

    def result(self, seq: int) -> ReadJob:
        """Wait for job ``seq``, copy its rows out of the slot, re-raise its error if any."""
        while seq not in self._done:
            dead = [p.name for p in self._procs if not p.is_alive()]
            if dead:
                raise RuntimeError(f"gpuloader: reader process(es) {', '.join(dead)} exited "
                                   "unexpectedly (killed, or out of memory?)")
            self._collect(block=True)
        error, _ = self._done.pop(seq)
        job, slot = self._waiting.pop(seq)
        try:
            if error is not None:
                error.add_note(f"gpuloader: raised in a reader process while reading sample "
                               f"indices {describe_indices(job.indices)}")
                raise error
            rows = len(job.indices)
            for name, out in job.out.items():
                np.copyto(out, self._slots[slot][name][:rows].numpy())
            return job
        finally:
            self._free.append(slot)

    def drain(self) -> None:
        """Wait for every job in flight and forget their results."""
        while self._waiting and not self._closed:
            seqs = list(self._waiting)
            for seq in seqs:
                while seq not in self._done and any(p.is_alive() for p in self._procs):
                    self._collect(block=True)
                self._done.pop(seq, None)
                _, slot = self._waiting.pop(seq)
                self._free.append(slot)

    def close(self) -> None:
        """Stop the worker processes (joined; terminated if they do not exit in time)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._procs:
            self._jobs.put(None)
        for p in self._procs:
            p.join(_JOIN_S)
            if p.is_alive():
                p.terminate()
                p.join()
        for q in (self._jobs, self._done_q):
            q.close()
            q.join_thread()
        self._waiting.clear()
        self._done.clear()

    @property
    def alive(self) -> bool:
        """True while any worker process runs."""
        return any(p.is_alive() for p in self._procs)
