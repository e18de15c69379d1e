"""Reading rows that are not in the page cache: many positional reads in flight at once.

A gather from a memory map faults its pages in one at a time, in one thread: on cold data that
is one storage round trip per row, far below what the disk serves to many requests at once.
Flat-file sources (``.npy``, raw, contiguous and unfiltered chunked HDF5) therefore read each
batch in one of two ways, decided per batch:

- **warm** (the rows are cached): the usual numpy gather from the map — nothing changes;
- **cold**: every run of neighbouring rows becomes one ``os.preadv`` straight into the batch
  buffer, executed by a pool of :data:`IO_THREADS` threads (``preadv`` releases the GIL), so
  that many requests are in flight.

NOTE(cold-probe): the decision reads up to :data:`PROBE_RUNS` of the batch's rows, spread over
it, with ``preadv(..., RWF_NOWAIT)``, which fails with EAGAIN (or reads short) instead of
waiting for storage.  All of them served: the batch is taken to be cached and gathered from the
map (the probed rows are simply read twice, ~2 us each).  The first miss: the whole batch goes
to the pool.  Batches after a cached probe skip it for a while (NOTE(probe-backoff)), so warm
epochs barely pay for it.
Filesystems without RWF_NOWAIT always take the warm path (the behaviour before this module).

NOTE(io-leases): the pool belongs to the process and runs only while some reader holds a lease
(``lease()``; the fast path's reader threads and reader processes hold one while they live).
Without a lease — a user's own ``dataset[i]``, torch's DataLoader — reads take the warm path,
so no thread is ever started behind a caller's back, and the last ``release()`` joins the
threads, so none outlives the loader's ``close()``.

NOTE(read-around): a file that fits in memory is worth reading whole: every byte of it is
needed within the epoch.  For such a file each missing row is read with its aligned
:data:`READ_AROUND` block (a ``POSIX_FADV_WILLNEED`` of the block, then the row's ``preadv``,
which waits only for its own pages), so a cold shuffled epoch reads the file in large requests,
32 at a time, and its rows turn warm within seconds.  A memory map does the same on each page
fault (the device's readahead size around the faulting row: 128 KB by default, 8 MB on the
development VM), one fault at a time per process.  A file larger
than that is read row by row: blocks around its rows would evict each other before the epoch
came back for their neighbours.
"""
from __future__ import annotations

import errno
import os
import threading
from collections import deque
from typing import Callable, Deque, List, Optional, Tuple

import numpy as np
import psutil

#: Reads in flight at once (threads of the pool).  Measured on this project's VM disk: 32
#: threads of one-row reads reach ~42k rows/s cold, 8 threads ~24k, 64 no more than 32.
IO_THREADS = 32
#: Rows probed with RWF_NOWAIT per batch (NOTE(cold-probe)).
PROBE_RUNS = 8
#: NOTE(probe-backoff): after a probe finds a batch cached, the next ``interval`` batches are
#: gathered unprobed, the interval doubling per cached probe up to this; a cold probe resets it.
#: Warm epochs then pay for one probe in 16 batches; a file that turns cold is gathered through
#: page faults for at most that many batches before the pool takes over again.
MAX_PROBE_INTERVAL = 16
#: Cached probes in a row before the backoff starts (a file being read in is partly cached).
PROBES_BEFORE_BACKOFF = 2
#: NOTE(read-around): a cold file no larger than this fraction of the available memory is read
#: in aligned blocks of READ_AROUND bytes around each missing row.
FIT_FRACTION = 0.5
READ_AROUND = 128 << 10
#: Longer runs are split into requests of this many bytes, so one long run is read in parallel.
MAX_REQUEST_BYTES = 256 << 10

_NOWAIT = getattr(os, "RWF_NOWAIT", None)


class _Job:
    """Work for the pool: ``count`` items, item ``k`` done by ``run(k)``; its caller waits on
    ``done``, and ``error`` holds its first failure."""

    __slots__ = ("run", "count", "claimed", "left", "error", "done")

    def __init__(self, run: Callable[[int], None], count: int) -> None:
        self.run = run
        self.count = count
        self.claimed = 0
        self.left = count
        self.error: Optional[BaseException] = None
        self.done = threading.Event()


class IoPool:
    """``threads`` daemon threads that execute positional reads; see NOTE(io-leases).

    Lifetime: threads start in the constructor and are joined by :meth:`close`.
    """

    def __init__(self, threads: int = IO_THREADS) -> None:
        self._jobs: Deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._threads = [threading.Thread(target=self._run, name=f"gpuloader-io-{i}",
                                          daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def read(self, fd: int, requests: List[Tuple[memoryview, int]], around: int = 0) -> None:
        """Fill every ``buffer`` with the bytes of ``fd`` at its offset; blocks until all are
        read.  With ``around`` > 0, the aligned block of that many bytes around each request is
        read into the page cache too (NOTE(read-around)).  Raises the first OSError (or
        EOFError for a file shorter than a request)."""
        if not requests:
            return
        if around:
            job = _Job(lambda k: read_around(fd, *requests[k], around), len(requests))
        else:
            job = _Job(lambda k: read_fully(fd, *requests[k]), len(requests))
        with self._cond:
            if self._stop:
                raise RuntimeError("gpuloader: the I/O pool was closed")
            self._jobs.append(job)
            self._cond.notify(job.count)  # wake as many threads as there are items, no more
        job.done.wait()
        if job.error is not None:
            raise job.error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._jobs[0]
                k = job.claimed
                job.claimed += 1
                if job.claimed == job.count:
                    self._jobs.popleft()
            try:
                if job.error is None:
                    job.run(k)
            except (OSError, EOFError) as exc:  # handed to the caller of read()
                job.error = exc
            with self._cond:
                job.left -= 1
                if job.left == 0:
                    job.done.set()

    def close(self) -> None:
        """Stop and join the threads (queued jobs are finished first by nobody: callers of
        :meth:`read` hold leases, so there are none when the last lease is released)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()


def read_fully(fd: int, buf: memoryview, offset: int, flags: int = 0) -> int:
    """``preadv`` until ``buf`` is full; returns the bytes read (short only with ``flags``,
    e.g. RWF_NOWAIT).  EOFError when the file ends first."""
    done = 0
    size = len(buf)
    while done < size:
        got = os.preadv(fd, [buf[done:]], offset + done, flags) if flags else \
            os.preadv(fd, [buf[done:]], offset + done)
        if got == 0:
            if flags:
                return done
            raise EOFError(f"file ends before byte {offset + size} (read {offset + done})")
        done += got
        if flags:
            return done  # a non-blocking read stops at the first short answer
    return done


def read_around(fd: int, buf: memoryview, offset: int, around: int) -> None:
    """``read_fully`` after asking the kernel for the ``around``-aligned blocks holding the
    request (they are read into the page cache in one request; the read waits only for its
    own pages)."""
    lo = offset - offset % around
    os.posix_fadvise(fd, lo, offset + len(buf) - lo, os.POSIX_FADV_WILLNEED)
    read_fully(fd, buf, offset)


# ------------------------------------------------------------------------------- leases

_LEASE_LOCK = threading.Lock()
_leases = 0
_pool: Optional[IoPool] = None


def acquire() -> None:
    """Take a lease: cold batches may now use the pool (NOTE(io-leases))."""
    global _leases
    with _LEASE_LOCK:
        _leases += 1


def release() -> None:
    """Return a lease; the last one stops and joins the pool's threads."""
    global _leases, _pool
    with _LEASE_LOCK:
        _leases = max(0, _leases - 1)
        pool = _pool if _leases == 0 else None
        if pool is not None:
            _pool = None
    if pool is not None:
        pool.close()


def active_pool() -> Optional[IoPool]:
    """The process's pool while a lease is held (started on first use), else None."""
    global _pool
    if _leases == 0:
        return None
    with _LEASE_LOCK:
        if _leases and _pool is None:
            _pool = IoPool()
        return _pool


def _forget_after_fork() -> None:
    # A forked child has none of the parent's threads and none of its leases.
    global _LEASE_LOCK, _leases, _pool
    _LEASE_LOCK = threading.Lock()
    _leases, _pool = 0, None


os.register_at_fork(after_in_child=_forget_after_fork)


# ------------------------------------------------------------------------------- rows

def requests_for(offsets: np.ndarray, out: np.ndarray, row_nbytes: int
                 ) -> List[Tuple[memoryview, int]]:
    """Requests that read row ``k`` (at byte ``offsets[k]``) into ``out[k]``: neighbouring rows
    (consecutive in both the file and ``out``) are one request, split at MAX_REQUEST_BYTES."""
    n = len(offsets)
    if n == 0:
        return []
    flat = memoryview(out.reshape(n, -1).view(np.uint8)).cast("B")
    breaks = np.flatnonzero(np.diff(offsets) != row_nbytes) + 1
    begins = np.concatenate(([0], breaks)).tolist()
    ends = np.concatenate((breaks, [n])).tolist()
    starts = offsets[begins].tolist() if len(begins) else []
    step = max(1, MAX_REQUEST_BYTES // max(1, row_nbytes)) * row_nbytes
    requests: List[Tuple[memoryview, int]] = []
    for a, b, offset in zip(begins, ends, starts):
        lo, hi = a * row_nbytes, b * row_nbytes
        for piece in range(lo, hi, step):
            requests.append((flat[piece:min(hi, piece + step)], offset + piece - lo))
    return requests


class RowFile:
    """Fixed-size rows of one file read with positional reads (one per process: holds an fd).

    ``read(offsets, out)`` implements NOTE(cold-probe): it returns False when the caller should
    gather from its map (the rows are cached, no lease is held, or the filesystem cannot say),
    True after it read every row itself.  ``out``'s rows must be C-contiguous bytes.
    Lifetime: the fd is open until :meth:`close`.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.probes = _NOWAIT is not None
        self._skip = 0  # batches left to gather unprobed (NOTE(probe-backoff))
        self._interval = 0
        self._hits = 0  # cached probes in a row

    def read(self, offsets: np.ndarray, out: np.ndarray) -> bool:
        """Read row ``k`` from byte ``offsets[k]`` into ``out[k]`` if the rows are cold (see
        the class); ``offsets`` is an int64 array as long as ``out``."""
        if not self.probes or len(offsets) == 0 or not out.flags.c_contiguous or out.size == 0:
            return False
        pool = active_pool()
        if pool is None:
            return False
        if self._skip > 0:  # NOTE(probe-backoff); threads race on these counters harmlessly
            self._skip -= 1
            return False
        if self._cached(offsets, out):
            self._hits += 1
            if self._hits >= PROBES_BEFORE_BACKOFF:
                self._interval = min(MAX_PROBE_INTERVAL, max(1, 2 * self._interval))
                self._skip = self._interval
            return False
        self._hits = self._interval = 0
        around = READ_AROUND if self._fits_in_memory() else 0
        pool.read(self.fd, requests_for(offsets, out, out.nbytes // len(out)), around)
        return True

    def _fits_in_memory(self) -> bool:
        """NOTE(read-around): the file fits in FIT_FRACTION of the available memory (asked
        each cold batch: other processes' use changes)."""
        size = os.fstat(self.fd).st_size
        return size <= FIT_FRACTION * psutil.virtual_memory().available

    def _cached(self, offsets: np.ndarray, out: np.ndarray) -> bool:
        """True when every probed row (PROBE_RUNS of them, spread over the batch) is served
        from the page cache; each is read into its place in ``out``."""
        rows = out.reshape(len(out), -1).view(np.uint8)
        for k in np.linspace(0, len(offsets) - 1, min(PROBE_RUNS, len(offsets))).astype(int):
            buf = memoryview(rows[k])
            try:
                got = read_fully(self.fd, buf, int(offsets[k]), _NOWAIT)  # type: ignore[arg-type]
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self.probes = False  # this filesystem cannot tell: always gather
                    return True
                raise
            if got < len(buf):
                return False
        return True

    def will_need(self, offset: int, nbytes: int) -> None:
        """Ask the kernel to start reading ``nbytes`` at ``offset`` (POSIX_FADV_WILLNEED)."""
        if nbytes > 0 and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        """Close the fd (idempotent)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
