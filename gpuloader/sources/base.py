"""The Source protocol: where samples live and how a batch of rows is gathered.

A source exposes named fields that share dimension 0 (the sample axis).  ``read_into`` gathers
rows straight into arrays the caller owns — the loader's preallocated (pinned) host slots — so
a batch costs one pass over the bytes and no intermediate copies.

NOTE(read-contract): ``read_into(indices, out)`` writes sample ``indices[k]`` of field ``f`` to
``out[f][k]`` for every k.  ``indices`` is a 1-D int64 array of in-range, non-negative indices in
any order (duplicates allowed); sorted, duplicate-free indices are the fast path, and the loader
always passes those.  ``out[f]`` has shape ``(len(indices), *fields[f].shape)`` and dtype
``fields[f].dtype``, and may be larger along dim 0 only if the caller slices it first.  A source
must be picklable and must (re)open OS handles lazily in whichever process reads.
"""
from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass
from typing import (Callable, Dict, Generic, Mapping, Optional, Protocol, Sequence, Tuple,
                    TypeVar, runtime_checkable)

import numpy as np

from gpuloader.checks import index_vector
from gpuloader.errors import (ArgumentError, ArgumentTypeError, FieldNotFoundError,
                              SampleIndexError, SourceError, describe)

#: Target bytes of one storage-friendly block for sources without a natural chunk (npy, RAM).
DEFAULT_BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class FieldSpec:
    """Type and per-sample shape of one field (the shape excludes the sample axis).

    ``ragged``: samples differ in length (see sources/ragged.py); ``shape`` is then the shape
    of one token and ``sample_nbytes`` the bytes of one token.
    """

    dtype: np.dtype
    shape: Tuple[int, ...]
    ragged: bool = False

    @property
    def sample_nbytes(self) -> int:
        """Bytes one sample of this field occupies."""
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.shape, dtype=np.int64)))


@runtime_checkable
class Source(Protocol):
    """Protocol every storage backend implements (see NOTE(read-contract))."""

    @property
    def fields(self) -> Mapping[str, FieldSpec]:
        """Field name -> FieldSpec, in a stable order."""

    def __len__(self) -> int:
        """Number of samples (dimension 0 shared by all fields)."""

    @property
    def chunk_length(self) -> int:
        """Rows per storage block: HDF5 chunk length, or a few MB of rows for flat files."""

    def read_into(self, indices: np.ndarray, out: Dict[str, np.ndarray]) -> None:
        """Gather ``indices`` rows of every field into ``out`` (see NOTE(read-contract))."""

    def close(self) -> None:
        """Release file handles and maps held by this process; reading reopens them."""


def sample_nbytes(fields: Mapping[str, FieldSpec]) -> int:
    """Bytes one sample occupies over all ``fields``."""
    return sum(spec.sample_nbytes for spec in fields.values())


def rows_per_block(fields: Mapping[str, FieldSpec], block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows that fill about ``block_bytes``, at least 1."""
    return max(1, block_bytes // max(1, sample_nbytes(fields)))


def coalesce_runs(sorted_indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Split sorted indices into runs of consecutive values.

    Returns ``(starts, lengths)``: run ``r`` covers source rows
    ``starts[r] .. starts[r] + lengths[r] - 1`` and the matching output rows follow each other.
    """
    n = len(sorted_indices)
    if n == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    breaks = np.flatnonzero(np.diff(sorted_indices) != 1) + 1
    begins = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [n]))
    return sorted_indices[begins].astype(np.int64), (ends - begins).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Helpers shared by the sources (added with the npy / HDF5 / in-RAM backends).
# --------------------------------------------------------------------------------------------

#: Runs at least this long are copied as one slice; shorter ones go through ``np.take``.
#: Measured on float32 rows of 8 B .. 16 KiB: ``np.take(..., mode="clip")`` costs about one
#: memcpy per row, a slice copy about 0.4 us of Python overhead, so slices only win for runs of
#: a few hundred rows (and then by ~10%).
LONG_RUN_ROWS = 256


@dataclass(frozen=True)
class StorageInfo:
    """How one field is stored and read, for ``gpuloader inspect`` and for tests.

    ``format``: "npy", "raw", "hdf5" or "ram".  ``layout``: "contiguous", "chunked",
    "compressed" (chunked with any filter) or "strided" (an in-RAM view with gaps).
    ``read_path``: "memmap" (numpy gather from a memory map), "chunk-map" (gather from
    memory-mapped HDF5 chunks), "slab" (h5py ``read_direct`` of whole dim-0 slabs) or "ram".
    """

    format: str
    layout: str
    read_path: str
    path: Optional[str] = None
    key: Optional[str] = None
    compression: Optional[str] = None
    chunk_rows: Optional[int] = None


def native_dtype(dtype: np.dtype) -> np.dtype:
    """``dtype`` in the machine's byte order (torch only holds native-order data)."""
    dtype = np.dtype(dtype)
    return dtype if dtype.isnative else dtype.newbyteorder("=")


def check_out(fields: Mapping[str, FieldSpec], rows: int, out: Mapping[str, np.ndarray]) -> None:
    """Raise ArgumentError unless ``out`` holds one array per field, ``rows`` long, right dtype."""
    if out.keys() != fields.keys():
        raise ArgumentError(
            f"read_into: out has fields {sorted(out)}, expected exactly {list(fields)}")
    for name, spec in fields.items():
        arr = out[name]
        expected = (rows, *spec.shape)
        if arr.shape != expected or arr.dtype != spec.dtype:
            raise ArgumentError(
                f"read_into: out[{name!r}] has shape {arr.shape} and dtype {arr.dtype}; "
                f"expected shape {expected} and dtype {np.dtype(spec.dtype)}")


class RowPlan:
    """Validated indices of one ``read_into`` call and how to copy them, shared by all fields.

    Built once per call (``RowPlan(indices, length)``); ``gather`` then copies every field
    with the same segmentation: a single contiguous range is one slice copy, dense batches
    copy long runs as slices, everything else is one ``np.take`` (see LONG_RUN_ROWS).
    """

    __slots__ = ("indices", "segments", "_sorted")

    def __init__(self, indices: np.ndarray, length: int) -> None:
        idx, ok = index_vector(indices)
        if not ok:
            raise ArgumentError(
                f"read_into: indices must be a 1-D integer array, got shape {idx.shape} "
                f"and dtype {idx.dtype}")
        self.indices = idx
        self._sorted: Optional[bool] = None
        n = len(idx)
        #: (out_start, out_stop, src_start): src_start < 0 means "take indices[a:b]".
        self.segments: Tuple[Tuple[int, int, int], ...] = ()
        if n == 0:
            return
        first, last = int(idx[0]), int(idx[-1])
        # One contiguous range (sequential batches): O(1) pre-check, then one O(n) pass.
        if last - first == n - 1 and (n == 1 or bool((idx[1:] - idx[:-1] == 1).all())):
            self._check_bounds(first, last, length)
            self._sorted = True
            self.segments = ((0, n, first),)
            return
        lo, hi = int(idx.min()), int(idx.max())
        self._check_bounds(lo, hi, length)
        if 2 * n >= hi - lo + 1:  # dense: long runs are likely, find them
            self.segments = _run_segments(idx)
        else:
            self.segments = ((0, n, -1),)

    @staticmethod
    def _check_bounds(lo: int, hi: int, length: int) -> None:
        if lo < 0 or hi >= length:
            bad = lo if lo < 0 else hi
            raise SampleIndexError(
                f"read_into: sample index {bad} is out of range for a source of {length} "
                f"samples; indices must lie in [0, {length})")

    @property
    def is_sorted(self) -> bool:
        """True when the indices strictly increase (sorted and free of duplicates)."""
        if self._sorted is None:
            idx = self.indices
            self._sorted = len(idx) < 2 or bool(np.all(idx[1:] > idx[:-1]))
        return self._sorted

    def gather(self, src: np.ndarray, out: np.ndarray) -> None:
        """Copy rows ``indices`` of ``src`` into ``out`` (``out[k] = src[indices[k]]``)."""
        idx = self.indices
        # np.take makes a C-contiguous copy of a strided source on every call and cannot cast
        # between byte orders, so those sources go through numpy's (slower) fancy indexing.
        direct = src.flags.c_contiguous and src.dtype == out.dtype
        for a, b, s in self.segments:
            if s >= 0:
                out[a:b] = src[s:s + (b - a)]
            elif direct:
                np.take(src, idx[a:b], axis=0, out=out[a:b], mode="clip")  # bounds checked
            else:
                out[a:b] = src[idx[a:b]]


def _run_segments(idx: np.ndarray) -> Tuple[Tuple[int, int, int], ...]:
    """Segments for a dense batch: runs of LONG_RUN_ROWS or more as slices, the rest taken."""
    starts, lengths = coalesce_runs(idx)
    long_runs = np.flatnonzero(lengths >= LONG_RUN_ROWS)
    if len(long_runs) == 0:
        return ((0, len(idx), -1),)
    out_starts = np.cumsum(lengths) - lengths
    segments = []
    pos = 0
    for r in long_runs.tolist():
        a = int(out_starts[r])
        if a > pos:
            segments.append((pos, a, -1))
        b = a + int(lengths[r])
        segments.append((a, b, int(starts[r])))
        pos = b
    if pos < len(idx):
        segments.append((pos, len(idx), -1))
    return tuple(segments)


T = TypeVar("T")

# Guards the rare moment a source opens its handles.  A lock held by another thread at fork
# time would stay held forever in the child, so the child gets a fresh one.
_OPEN_LOCK = threading.Lock()


def _fresh_open_lock() -> None:
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_fresh_open_lock)


class ProcessLocal(Generic[T]):
    """One lazily built value per process: OS handles, memory maps, open HDF5 files.

    ``get(build)`` returns this process's value, building it on first use in each process (a
    forked child sees the parent's value, notices the pid differs, and builds its own; the
    parent's value is dropped in the child without being closed).  Pickles as an empty slot,
    so a spawned worker opens its own handles.  Thread-safe.
    """

    __slots__ = ("_slot",)

    def __init__(self) -> None:
        self._slot: Optional[Tuple[int, T]] = None  # (pid, value), replaced atomically

    def get(self, build: Callable[[], T]) -> T:
        """This process's value, built with ``build()`` if there is none yet."""
        slot = self._slot
        pid = os.getpid()
        if slot is not None and slot[0] == pid:
            return slot[1]
        with _OPEN_LOCK:
            slot = self._slot
            if slot is None or slot[0] != pid:
                slot = (pid, build())
                self._slot = slot
            return slot[1]

    def take(self) -> Optional[T]:
        """Forget the value; return it if this process built it (so the caller may close it)."""
        slot, self._slot = self._slot, None
        if slot is not None and slot[0] == os.getpid():
            return slot[1]
        return None

    def __reduce__(self) -> Tuple[type, Tuple[()]]:
        return (ProcessLocal, ())


class ThreadScratch:
    """Per-thread reusable buffers (grow-only, one per key); pickles empty.

    Lifetime: a buffer lives as long as its thread and this object; it is overwritten by the
    next ``get`` with the same key in the same thread, so callers copy out before asking again.
    """

    __slots__ = ("_local",)

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, key: str, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A C-contiguous array of ``shape``/``dtype``; rows beyond ``shape[0]`` are reused."""
        buffers: Dict[str, np.ndarray] = self._local.__dict__.setdefault("buffers", {})
        buf = buffers.get(key)
        if buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:] or len(buf) < shape[0]:
            buf = np.empty(shape, dtype=dtype)
            buffers[key] = buf
        return buf[: shape[0]]

    def __reduce__(self) -> Tuple[type, Tuple[()]]:
        return (ThreadScratch, ())


def check_lengths(lengths: Mapping[str, int], what: str) -> int:
    """The common dim-0 length of ``lengths`` (field -> rows); SourceError naming them if not."""
    distinct = set(lengths.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{name!r}: {n}" for name, n in lengths.items())
        raise SourceError(
            f"{what}: fields must share dimension 0 (the sample axis), got lengths {{{listing}}}; "
            f"select fields of equal length with fields=[...]")
    return distinct.pop() if distinct else 0


def check_field_names(fields: object, what: str) -> list:
    """``fields`` as a list of distinct names; ArgumentTypeError/ArgumentError otherwise."""
    if isinstance(fields, (str, bytes)) or not isinstance(fields, Sequence):
        raise ArgumentTypeError(
            f"{what}: fields must be a list of field names, got {describe(fields)}; "
            f"e.g. fields=[{describe(str(fields))}]")
    names = [str(name) for name in fields]
    if not names:
        raise ArgumentError(f"{what}: fields=[] selects nothing; name at least one field")
    if len(set(names)) != len(names):
        raise ArgumentError(f"{what}: fields={names} names a field twice")
    return names


def select_fields(available: Sequence[str], fields: Optional[Sequence[str]],
                  what: str) -> list:
    """``fields`` (in its order) checked against ``available``; all of them when None."""
    if fields is None:
        return list(available)
    names = check_field_names(fields, what)
    missing = [name for name in names if name not in available]
    if missing:
        raise FieldNotFoundError(
            f"{what}: no field {missing[0]!r}; available fields: {list(available)}")
    return names


def _mapped_size(arr: np.ndarray) -> Optional[int]:
    """Current size in bytes of the file mapped under ``arr`` (fstat of the mapped file itself,
    so a file replaced by rename does not count); None when ``arr`` is not a file map."""
    obj: object = arr
    while obj is not None:
        if isinstance(obj, mmap.mmap):
            try:
                return obj.size()
            except (OSError, ValueError):  # closed map or unsupported: nothing to check
                return None
        obj = getattr(obj, "base", None)
    return None


def check_mapped_size(path: str, arr: np.ndarray, needed: int) -> None:
    """NOTE(shrunk-files): SourceError naming ``path`` when the file mapped under ``arr`` is
    now shorter than the ``needed`` bytes the map covers.

    Touching a mapped page past a file's end kills the process with SIGBUS, which no Python
    code can catch.  Sources call this before each read of a map, so a file truncated or
    rewritten in place between reads is reported instead.  What cannot be caught: a file that
    shrinks *during* a read (between this check and the copy) still raises SIGBUS.
    """
    size = _mapped_size(arr)
    if size is not None and size < needed:
        raise SourceError(
            f"{path}: the file shrank to {size:,} bytes while gpuloader had it mapped "
            f"({needed:,} bytes expected); reading past its end would kill the process with "
            "SIGBUS. Was it truncated or rewritten in place? Restore it (write new data to a "
            "new file and rename it over the old one), then open the dataset again")
