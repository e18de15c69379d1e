"""Compressed HDF5 chunks decoded once, then served to every batch that needs their rows.

The "block" order reads each window of a few chunks across one or two batches, so a chunk's rows
arrive in several ``read_into`` calls (and reader threads read neighbouring batches at once).
Reading the covering slab each time would decompress the chunk once per call; instead each
chunk is decompressed whole, once, into a per-process least-recently-used cache of decoded
chunks, and every batch gathers its rows from there.  Whole chunks a batch reads entirely (the
sequential order) go straight into the batch buffer, uncached.

NOTE(decoded-chunks): the cache holds at most ``budget`` bytes of decoded chunks per process
(:data:`CACHE_BYTES`, or two chunks if one is larger) — a constant, whatever the dataset size.
It is enough for the windows of the batches in flight: a window is a few chunks
(``window_blocks`` in order.py), and rows of a window are read by consecutive batches.  A chunk
is decoded by one thread while the others wait for it (h5py runs one call at a time anyway).
"""
from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from typing import Any, Dict, List, Tuple

import numpy as np
from h5py import h5z

from gpuloader.errors import SourceError

#: Bytes of decoded chunks one process keeps (NOTE(decoded-chunks)).
CACHE_BYTES = 64 << 20


def read_error(exc: BaseException, dset: Any, lo: int, hi: int) -> SourceError:
    """NOTE(hdf5-errors): h5py's read errors name neither file nor dataset; say both, the rows,
    and what to check."""
    return SourceError(
        f"reading dataset {dset.name.lstrip('/')!r} of {dset.file.filename}, rows {lo}..{hi}, "
        f"failed: {type(exc).__name__}: {exc}. A compressed chunk may be corrupt, the file "
        "truncated, or an external raw file missing; check it with `h5dump -d "
        f"{dset.name} {dset.file.filename}`")


class DecodedChunks:
    """LRU cache: chunk number -> its decoded rows (read-only; lifetime: until evicted)."""

    def __init__(self, dset: Any, chunk_rows: int, budget: int = CACHE_BYTES) -> None:
        self._dset = dset
        self._rows = chunk_rows
        self._length = int(dset.shape[0])
        row_nbytes = int(np.prod(dset.shape[1:], dtype=np.int64)) * dset.dtype.itemsize
        self._capacity = max(2, budget // max(1, chunk_rows * row_nbytes))
        self._chunks: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._lock = threading.Lock()
        self._decoding: Dict[int, threading.Event] = {}
        self.decoded = 0  # chunks decompressed so far (for tests and benchmarks)
        self._shuffled = _deflate_only(dset)

    def decode_into(self, first: int, out: np.ndarray) -> None:
        """Decompress the chunk starting at row ``first`` into ``out`` (its rows, any count up
        to the chunk's).  NOTE(raw-deflate): deflate chunks (optionally byte-shuffled) are read
        raw and inflated with zlib, which releases the GIL, so reader threads decompress in
        parallel and skip h5py's selection machinery (~3x less time per 64 KB chunk here);
        other filters go through h5py's ``read_direct``."""
        with self._lock:
            self.decoded += 1
        try:
            self._decode(first, out)
        except (OSError, zlib.error) as exc:  # a corrupt chunk: name file, dataset and rows
            raise read_error(exc, self._dset, first, first + len(out)) from exc

    def _decode(self, first: int, out: np.ndarray) -> None:
        if self._shuffled is not None:
            try:
                mask, raw = self._dset.id.read_direct_chunk((first,) + (0,) * (out.ndim - 1))
            except RuntimeError:  # a chunk never written: h5py gives the fill value below
                mask = -1
            if mask == 0:
                data = np.frombuffer(zlib.decompress(raw), dtype=np.uint8)
                stored = self._dset.dtype
                if self._shuffled:  # HDF5's shuffle filter: byte k of every element together
                    data = data.reshape(stored.itemsize, -1).T.reshape(-1)
                rows = data.view(stored).reshape((-1, *self._dset.shape[1:]))
                out[...] = rows[:len(out)]
                return
        self._dset.read_direct(out, source_sel=np.s_[first:first + len(out)])

    def get(self, chunk: int, dtype: np.dtype) -> np.ndarray:
        """The decoded rows of ``chunk`` as ``dtype``; decompressed now if not cached."""
        while True:
            with self._lock:
                rows = self._chunks.get(chunk)
                if rows is not None:
                    self._chunks.move_to_end(chunk)
                    return rows
                waiting = self._decoding.get(chunk)
                if waiting is None:
                    self._decoding[chunk] = threading.Event()
                    break
            waiting.wait()  # another thread decodes it; then look again
        try:
            lo = chunk * self._rows
            rows = np.empty((min(self._length, lo + self._rows) - lo, *self._dset.shape[1:]),
                            dtype=dtype)
            self.decode_into(lo, rows)
            rows.flags.writeable = False
            with self._lock:
                self._chunks[chunk] = rows
                while len(self._chunks) > self._capacity:
                    self._chunks.popitem(last=False)
        finally:
            with self._lock:
                self._decoding.pop(chunk).set()
        return rows


def _deflate_only(dset: Any) -> Any:
    """False for deflate chunks, True for shuffle + deflate, None for any other filters."""
    dcpl = dset.id.get_create_plist()
    codes = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
    if codes == [h5z.FILTER_DEFLATE]:
        return False
    if codes == [h5z.FILTER_SHUFFLE, h5z.FILTER_DEFLATE]:
        return True
    return None


class ChunkedReader:
    """Reads a compressed dataset whose chunks span every dimension but the first (see the
    module docstring).  ``read(plan, out, ...)`` follows the hdf5 readers' protocol."""

    def __init__(self, dset: Any, chunk_rows: int, budget: int = CACHE_BYTES) -> None:
        self.dset = dset
        self.chunk_rows = chunk_rows
        self.cache = DecodedChunks(dset, chunk_rows, budget)

    def will_need(self, first: int, count: int) -> None:
        return None  # h5py reads the chunks itself

    def read(self, plan: Any, out: np.ndarray, scratch: Any, key: str) -> None:
        idx = plan.indices
        order = None
        if not plan.is_sorted:
            order = np.argsort(idx, kind="stable")
            idx = idx[order]
        chunk = idx // self.chunk_rows
        cuts = np.flatnonzero(chunk[1:] != chunk[:-1]) + 1
        bounds = [0, *cuts.tolist(), len(idx)]
        length = int(self.dset.shape[0])
        whole: List[Tuple[int, int, int]] = []  # (out_start, out_stop, first_row) of whole chunks
        for a, b in zip(bounds[:-1], bounds[1:]):
            c = int(chunk[a])
            lo = c * self.chunk_rows
            if order is None and b - a == min(length, lo + self.chunk_rows) - lo:
                whole.append((a, b, lo))  # every row of the chunk, in order: no caching
                continue
            rows = self.cache.get(c, out.dtype)
            local = idx[a:b] - lo
            if order is None:
                np.take(rows, local, axis=0, out=out[a:b], mode="clip")
            else:
                out[order[a:b]] = rows[local]
        for a, b, first in whole:
            self.cache.decode_into(first, out[a:b])
