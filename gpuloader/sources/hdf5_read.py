"""How one HDF5 field's bytes are read: its stored facts (:class:`Hdf5Field`) and the reader
chosen from them (:func:`make_reader`) -- map gathers, chunk-map gathers, decoded chunks or
``read_direct`` slabs.  The module docstring of ``hdf5.py`` describes the three read paths;
this module holds their per-process implementation, ``hdf5.py`` the source that opens files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Tuple

import h5py
import numpy as np

from gpuloader.sources.base import RowPlan, ThreadScratch
from gpuloader.sources.chunks import ChunkedReader, read_error
from gpuloader.sources.pread import RowFile

#: Chunk-map reads with more view switches than this go through one pass per view instead.
_MAX_SEGMENTS = 64


@dataclass(frozen=True)
class Hdf5Field:
    """How one HDF5 dataset is stored and will be read (plain facts, pickled to workers).

    ``shape`` includes dim 0; ``dtype`` is the storage dtype; ``block_rows`` is the dim-0
    extent of one storage block (chunk rows, or about 4 MiB of rows for contiguous data).
    """

    key: str
    dtype: np.dtype
    shape: Tuple[int, ...]
    layout: str
    read_path: str
    compression: Optional[str]
    chunks: Optional[Tuple[int, ...]]
    block_rows: int
    fill: Any

    @property
    def row_nbytes(self) -> int:
        """Bytes of one sample as stored."""
        return int(self.dtype.itemsize * np.prod(self.shape[1:], dtype=np.int64))


class FieldReader(Protocol):
    """Copies rows ``plan.indices`` of one field into ``out`` (scratch keyed by ``key``)."""

    def read(self, plan: RowPlan, out: np.ndarray, scratch: ThreadScratch, key: str) -> None:
        ...

    def will_need(self, first: int, count: int) -> None:
        """Readahead hint for rows ``first .. first + count - 1`` (may do nothing)."""


@dataclass
class FileHandles:
    """One read-only map and one positional-read handle per file this process reads."""

    maps: Dict[str, np.ndarray] = field(default_factory=dict)
    rows: Dict[str, RowFile] = field(default_factory=dict)

    def map(self, dset: h5py.Dataset) -> np.ndarray:
        """The whole file holding ``dset`` as read-only bytes."""
        filename = os.fspath(dset.file.filename)  # an external link may point at another file
        if filename not in self.maps:
            self.maps[filename] = np.memmap(filename, dtype=np.uint8, mode="r").view(np.ndarray)
        return self.maps[filename]

    def row_file(self, dset: h5py.Dataset) -> RowFile:
        """Positional reads of the file holding ``dset``."""
        filename = os.fspath(dset.file.filename)
        if filename not in self.rows:
            self.rows[filename] = RowFile(filename)
        return self.rows[filename]

    def close(self) -> None:
        for rows in self.rows.values():
            rows.close()
        self.rows.clear()
        self.maps.clear()


def make_reader(dset: h5py.Dataset, plan: Hdf5Field, files: FileHandles) -> FieldReader:
    """The reader for ``plan``; falls back to the slab path if the bytes are not where expected."""
    if plan.row_nbytes == 0 or plan.shape[0] == 0:
        return _NullReader()
    # Positional reads copy bytes as stored: only for data already in the machine's order.
    cold = files.row_file(dset) if plan.dtype.isnative else None
    if plan.read_path == "memmap":
        offset = dset.id.get_offset()
        filemap = files.map(dset)
        nbytes = plan.row_nbytes * plan.shape[0]
        if offset is not None and offset + nbytes <= filemap.size:
            view = np.ndarray(plan.shape, plan.dtype, buffer=filemap, offset=offset)
            return _MapReader(view, offset, plan.row_nbytes, cold)
    elif plan.read_path == "chunk-map":
        reader = _ChunkMapReader.build(dset, plan, files.map(dset), cold)
        if reader is not None:
            return reader
    elif plan.layout == "compressed" and plan.chunks is not None and \
            plan.chunks[1:] == plan.shape[1:]:
        return ChunkedReader(dset, plan.chunks[0])  # NOTE(decoded-chunks)
    return SlabReader(dset, plan)


class _NullReader:
    """Fields with no bytes per sample (or no samples): nothing to copy."""

    def read(self, plan: RowPlan, out: np.ndarray, scratch: ThreadScratch, key: str) -> None:
        return None

    def will_need(self, first: int, count: int) -> None:
        return None


@dataclass
class _MapReader:
    """Contiguous data: a gather from the mapped bytes, exactly like a ``.npy`` file (cold
    batches by positional reads of the rows at ``offset + row * row_nbytes``)."""

    view: np.ndarray
    offset: int
    row_nbytes: int
    cold: Optional[RowFile]

    def read(self, plan: RowPlan, out: np.ndarray, scratch: ThreadScratch, key: str) -> None:
        offsets = self.offset + plan.indices * self.row_nbytes
        if self.cold is None or not self.cold.read(offsets, out):
            plan.gather(self.view, out)

    def will_need(self, first: int, count: int) -> None:
        if self.cold is not None:
            self.cold.will_need(self.offset + first * self.row_nbytes, count * self.row_nbytes)


@dataclass
class _ChunkMapReader:
    """Unfiltered chunks spanning all non-sample dims, gathered straight from the file map.

    Chunk ``c`` holds rows ``c*C .. c*C+C-1`` at byte ``addr[c]``.  Viewing the file as rows
    of ``row_nbytes`` starting at byte ``r`` makes every chunk whose address is ``r`` modulo
    the row size a run of view rows, so a batch becomes one ``np.take`` per such view.  HDF5
    allocates chunks back to back, interrupted only by index nodes, so a dataset needs one or
    a few views.  ``view_of[c]`` is -1 for chunks never written (they read as ``fill``).
    """

    views: List[np.ndarray]
    view_of: np.ndarray
    first_row: np.ndarray
    chunk_rows: int
    fill: Any
    residues: np.ndarray  # byte offset of each view in the file
    row_nbytes: int
    cold: Optional[RowFile]

    @classmethod
    def build(cls, dset: h5py.Dataset, plan: Hdf5Field, filemap: np.ndarray,
              cold: Optional[RowFile]) -> Optional["_ChunkMapReader"]:
        rows = plan.chunks[0] if plan.chunks else 1
        addr = _chunk_addresses(dset, rows, -(-plan.shape[0] // rows))
        row_nbytes = plan.row_nbytes
        chunk_nbytes = rows * row_nbytes
        if addr is None or ((addr >= 0).any() and int(addr.max()) + chunk_nbytes > filemap.size):
            return None  # unexpected chunk sizes, or a file shorter than its index: use slab
        residues = np.where(addr >= 0, addr % row_nbytes, -1)
        kinds = [int(r) for r in np.unique(residues[residues >= 0])]
        views = [np.ndarray(((filemap.size - r) // row_nbytes, *plan.shape[1:]), plan.dtype,
                            buffer=filemap, offset=r) for r in kinds]
        view_of = np.full(len(addr), -1, dtype=np.int64)
        for v, r in enumerate(kinds):
            view_of[residues == r] = v
        first_row = np.where(addr >= 0, (addr - np.maximum(residues, 0)) // row_nbytes, 0)
        return cls(views, view_of, first_row.astype(np.int64), rows, plan.fill,
                   np.array(kinds, dtype=np.int64), row_nbytes, cold)

    def will_need(self, first: int, count: int) -> None:
        if self.cold is None or count <= 0:
            return
        chunks = np.arange(first // self.chunk_rows, (first + count - 1) // self.chunk_rows + 1)
        chunks = chunks[self.view_of[chunks] >= 0]
        starts = self.residues[self.view_of[chunks]] + self.first_row[chunks] * self.row_nbytes
        for lo, n in zip(*_byte_runs(np.sort(starts), self.chunk_rows * self.row_nbytes)):
            self.cold.will_need(lo, n)

    def read(self, plan: RowPlan, out: np.ndarray, scratch: ThreadScratch, key: str) -> None:
        idx = plan.indices
        chunk = idx // self.chunk_rows
        view_of = self.view_of[chunk]
        rows = self.first_row[chunk] + (idx - chunk * self.chunk_rows)
        if self.cold is not None and view_of.min() >= 0 and \
                self.cold.read(self.residues[view_of] + rows * self.row_nbytes, out):
            return
        if len(self.views) == 1 and view_of.min() >= 0:
            RowPlan(rows, len(self.views[0])).gather(self.views[0], out)
            return
        cuts = np.flatnonzero(view_of[1:] != view_of[:-1]) + 1
        if len(cuts) < _MAX_SEGMENTS:
            bounds = [0, *cuts.tolist(), len(idx)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                self._copy(int(view_of[a]), rows[a:b], out[a:b])
            return
        for v in np.unique(view_of).tolist():  # many switches: one pass per view
            where = np.flatnonzero(view_of == v)
            if v < 0:
                out[where] = self.fill
            else:
                out[where] = self.views[v][rows[where]]

    def _copy(self, v: int, rows: np.ndarray, out: np.ndarray) -> None:
        if v < 0:
            out[...] = self.fill
        elif self.views[v].dtype == out.dtype:
            # rows are in range by construction (build() checked every chunk lies in the map)
            np.take(self.views[v], rows, axis=0, out=out, mode="clip")
        else:
            out[...] = self.views[v][rows]  # byte-order conversion


def _byte_runs(starts: np.ndarray, size: int) -> Tuple[List[int], List[int]]:
    """Sorted extents of ``size`` bytes at ``starts`` merged where they touch: (starts, sizes)."""
    if len(starts) == 0:
        return [], []
    breaks = np.flatnonzero(np.diff(starts) != size) + 1
    begins = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(starts)]))
    return starts[begins].tolist(), ((ends - begins) * size).tolist()


def _chunk_addresses(dset: h5py.Dataset, rows: int, count: int) -> Optional[np.ndarray]:
    """File address of each dim-0 chunk (-1 if never written); None if a chunk is not full-size."""
    addr = np.full(count, -1, dtype=np.int64)
    expected = rows * int(np.prod(dset.chunks[1:], dtype=np.int64)) * dset.dtype.itemsize
    odd: List[int] = []

    def visit(info: Any) -> None:
        if info.size != expected:
            odd.append(info.size)
        addr[info.chunk_offset[0] // rows] = info.byte_offset

    if hasattr(dset.id, "chunk_iter"):  # HDF5 >= 1.12.3: one pass over the chunk index
        dset.id.chunk_iter(visit)
    else:
        for i in range(dset.id.get_num_chunks()):
            visit(dset.id.get_chunk_info(i))
    return None if odd else addr


@dataclass
class SlabReader:
    """Chunk-aware ``read_direct``: each storage block touched is read once per batch.

    Sorted indices are grouped by block (``block_rows`` rows); a group that is a run of
    consecutive rows is read straight into ``out`` (merged with neighbouring runs), any other
    group reads its covering slab into a per-thread scratch buffer and picks its rows.
    """

    dset: h5py.Dataset
    plan: Hdf5Field

    def will_need(self, first: int, count: int) -> None:
        return None  # h5py reads the chunks itself

    def read(self, plan: RowPlan, out: np.ndarray, scratch: ThreadScratch, key: str) -> None:
        idx = plan.indices
        order: Optional[np.ndarray] = None
        if not plan.is_sorted:
            order = np.argsort(idx, kind="stable")
            idx = idx[order]
        block = idx // self.plan.block_rows
        cuts = np.flatnonzero(block[1:] != block[:-1]) + 1
        bounds = [0, *cuts.tolist(), len(idx)]
        direct = order is None and out.flags.c_contiguous
        pending: Optional[List[int]] = None  # [out_start, src_lo, src_hi] of a direct run
        for a, b in zip(bounds[:-1], bounds[1:]):
            lo, hi = int(idx[a]), int(idx[b - 1]) + 1
            if direct and hi - lo == b - a:  # strictly increasing, so exactly rows lo..hi-1
                if pending is not None and pending[2] == lo:
                    pending[2] = hi
                    continue
                self._flush(pending, out)
                pending = [a, lo, hi]
                continue
            self._flush(pending, out)
            pending = None
            buf = scratch.get(key, (hi - lo, *self.plan.shape[1:]), out.dtype)
            self._read(buf, lo, hi)
            local = idx[a:b] - lo
            if order is None:
                np.take(buf, local, axis=0, out=out[a:b], mode="clip")
            else:
                out[order[a:b]] = buf[local]
        self._flush(pending, out)

    def _flush(self, pending: Optional[List[int]], out: np.ndarray) -> None:
        if pending is not None:
            a, lo, hi = pending
            self._read(out[a:a + hi - lo], lo, hi)

    def _read(self, dest: np.ndarray, lo: int, hi: int) -> None:
        try:
            self.dset.read_direct(dest, source_sel=np.s_[lo:hi])
        except OSError as exc:
            raise read_error(exc, self.dset, lo, hi) from exc
