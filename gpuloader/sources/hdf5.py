"""HDF5 datasets as fields, read without h5py's per-index fancy indexing.

Each field gets one of three read paths, chosen from how its bytes are stored:

``memmap``     contiguous, unfiltered data: the file's bytes at ``get_offset()`` are mapped and
               gathered like a ``.npy`` file (no HDF5 call, no h5py lock, parallel threads).
``chunk-map``  chunked, unfiltered data whose chunks span every dimension but the first: each
               chunk's bytes are mapped; a batch is one gather over row addresses.  Chunks never
               written read as the dataset's fill value.
``slab``       everything else (compressed or filtered chunks, chunks that split other
               dimensions, compact/virtual/external storage): indices are grouped by chunk and
               each group's covering dim-0 slab is read once with ``read_direct``.  Compressed
               chunks spanning every dimension but the first are decompressed once into a
               small cache and served from there (NOTE(decoded-chunks) in chunks.py).

The two map paths read batches that are not in the page cache with positional reads in flight
instead of page faults (NOTE(cold-probe) in pread.py); ``will_need`` passes readahead hints
for the bytes of a range of rows (readahead.py).

NOTE(hdf5-handles): only the path and per-field facts are pickled.  Each process opens the
file (and maps it) on first read and keeps one handle for all its threads; ``close()`` closes
this process's handle.  h5py serialises its own calls, the memmap paths need no lock.

NOTE(hdf5-errors): h5py's own errors name neither the file nor the dataset.  Metadata errors
(``metadata_errors``), read errors (``read_error``: file, dataset, rows) and external raw files
that are missing (checked when the dataset opens) become errors that name them and say what to
check.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Any, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple,
                    Union)

import h5py
import numpy as np

from gpuloader.errors import (ArgumentError, FieldNotFoundError, GpuLoaderError, SourceError,
                              SourceNotFoundError, add_note)
from gpuloader.sources.base import (FieldSpec, ProcessLocal, RowPlan, StorageInfo, ThreadScratch,
                                    check_field_names, check_lengths, check_mapped_size,
                                    check_out, native_dtype,
                                    rows_per_block)
from gpuloader.sources.chunks import ChunkedReader, read_error
from gpuloader.sources.pread import RowFile

PathLike = Union[str, "os.PathLike[str]"]

#: Upper bound of the per-dataset chunk cache (bytes); see :func:`chunk_cache`.
_MAX_CACHE_BYTES = 256 << 20
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


def is_hdf5_file(path: PathLike) -> bool:
    """True when ``path`` is an HDF5 file (signature at byte 0 or after a user block)."""
    try:
        return bool(h5py.is_hdf5(os.fspath(path)))
    except OSError:
        return False


def chunk_cache(plans: Sequence[Hdf5Field]) -> Tuple[int, int]:
    """``(rdcc_nbytes, rdcc_nslots)`` for the slab-read fields of one file.

    Enough for four dim-0 rows of chunks of the largest field (so consecutive batches that
    share a chunk decompress it once, even with a few reader threads), never below the HDF5
    library's default (1 MiB before HDF5 2.0, 8 MiB since) nor above 256 MiB; slots are a
    prime about ten times the number of chunks that fit.
    """
    _, default_slots, default_bytes, _ = h5py.h5p.create(h5py.h5p.FILE_ACCESS).get_cache()
    need, smallest = 0, None
    for plan in plans:
        if plan.read_path != "slab" or plan.chunks is None:
            continue
        chunk_bytes = int(np.prod(plan.chunks, dtype=np.int64)) * plan.dtype.itemsize
        across = int(np.prod([-(-s // c) for s, c in zip(plan.shape[1:], plan.chunks[1:])],
                             dtype=np.int64))
        need = max(need, 4 * across * chunk_bytes)
        smallest = chunk_bytes if smallest is None else min(smallest, chunk_bytes)
    nbytes = int(min(max(need, default_bytes), max(_MAX_CACHE_BYTES, default_bytes)))
    wanted_slots = 10 * nbytes // max(1, smallest or nbytes)
    return nbytes, _next_prime(max(int(default_slots), wanted_slots))


def _next_prime(n: int) -> int:
    candidate = n | 1
    while any(candidate % d == 0 for d in range(3, int(candidate ** 0.5) + 1, 2)):
        candidate += 2
    return candidate


def _plan_field(dset: h5py.Dataset, key: str) -> Hdf5Field:
    """Decide how ``dset`` is read; SourceError for data that cannot fill a numpy buffer."""
    dtype = dset.dtype
    if dset.ndim == 0:
        raise SourceError(f"HDF5 dataset {key!r} is a scalar; a field needs a sample axis")
    if dtype.hasobject or h5py.check_vlen_dtype(dtype) is not None:
        raise SourceError(
            f"HDF5 dataset {key!r} has variable-length dtype {dtype}; fields need fixed-size "
            f"numeric data, select others with fields=[...]")
    dcpl = dset.id.get_create_plist()
    layout_code = dcpl.get_layout()
    filters = [dcpl.get_filter(i)[3].decode("ascii", "replace")
               for i in range(dcpl.get_nfilters())]
    compression = dset.compression or (filters[0] if filters else None)
    # Memory-mapping needs the bytes on disk to be exactly numpy's layout of a simple dtype.
    mappable = (dtype.kind in "biufc" and dtype.fields is None and dtype.subdtype is None
                and dset.external is None)
    shape = tuple(int(s) for s in dset.shape)
    fill = dset.fillvalue if mappable else None
    if layout_code == h5py.h5d.CHUNKED:
        chunks = tuple(int(c) for c in dset.chunks)
        layout = "compressed" if filters else "chunked"
        full_rows = chunks[1:] == shape[1:]
        read_path = "chunk-map" if (mappable and not filters and full_rows) else "slab"
        return Hdf5Field(key, dtype, shape, layout, read_path, compression, chunks,
                         chunks[0], fill)
    block = rows_per_block({key: FieldSpec(native_dtype(dtype), shape[1:])})
    if layout_code == h5py.h5d.CONTIGUOUS:
        read_path = "memmap" if mappable and dset.id.get_offset() is not None else "slab"
        return Hdf5Field(key, dtype, shape, "contiguous", read_path, None, None, block, fill)
    layout = "compact" if layout_code == h5py.h5d.COMPACT else "virtual"
    return Hdf5Field(key, dtype, shape, layout, "slab", None, None, block, fill)


def _dataset_keys(group: h5py.Group) -> List[str]:
    """Every dataset path under ``group`` (for error messages)."""
    keys: List[str] = []
    group.visititems(lambda name, obj: keys.append(name) if isinstance(obj, h5py.Dataset)
                     else None)
    return keys


def _resolve(h5: h5py.File, fields: Optional[Union[Sequence[str], Mapping[str, str]]],
             path: str) -> Dict[str, str]:
    """Field name -> dataset path, from ``fields`` or the file's top-level datasets."""
    what = f"HDF5 file {path!r}"
    if fields is None:
        names = [name for name, obj in h5.items()
                 if isinstance(obj, h5py.Dataset) and obj.ndim >= 1]
        if not names:
            raise SourceError(
                f"{what} has no top-level dataset with a sample axis; datasets found: "
                f"{_dataset_keys(h5)[:50]}; pass fields=['group/name', ...]")
        return {name: name for name in names}
    if isinstance(fields, Mapping):
        wanted = {str(k): str(v) for k, v in fields.items()}
        if not wanted:
            raise ArgumentError(f"{what}: fields={{}} selects no dataset")
    else:
        wanted = {name: name for name in check_field_names(fields, what)}
    for name, key in wanted.items():
        obj = h5.get(key.lstrip("/"))
        if not isinstance(obj, h5py.Dataset):
            raise FieldNotFoundError(
                f"{what} has no dataset {key!r}; datasets: {_dataset_keys(h5)[:50]}")
    return {name: key.lstrip("/") for name, key in wanted.items()}


class Hdf5Source:
    """Fields read from the datasets of one HDF5 file.

    ``Hdf5Source(path, fields=None)``: ``fields`` is None (every top-level dataset with a
    sample axis, in the file's listing order — by name unless the file tracks creation order;
    they must share dim 0), a list of dataset paths (``"grp/z"`` allowed; the path is the
    field name) or a mapping field name -> dataset path.  See the module docstring for the
    read paths and NOTE(hdf5-handles) for handle lifetime.  ``storage`` and ``chunk_length``
    describe the layout (``gpuloader inspect`` prints them).
    """

    def __init__(self, path: PathLike,
                 fields: Optional[Union[Sequence[str], Mapping[str, str]]] = None) -> None:
        self.path = os.fspath(path)
        if not Path(self.path).exists():
            raise SourceNotFoundError(f"HDF5 file {self.path!r} does not exist")
        if not is_hdf5_file(self.path):
            raise SourceError(
                f"{self.path!r} is not an HDF5 file (no HDF5 signature); expected a file "
                f"written by h5py / HDF5, a .npy file, or raw binary with dtype=")
        with _open_file(self.path) as h5:
            with metadata_errors(self.path):
                keys = _resolve(h5, fields, self.path)
                plans = {name: _plan_field(h5[key], key) for name, key in keys.items()}
                for key in keys.values():
                    _check_external(h5[key], self.path)
        self._plans = plans
        self._length = check_lengths({n: p.shape[0] for n, p in plans.items()},
                                     f"HDF5 file {self.path!r}")
        self._fields = {n: FieldSpec(native_dtype(p.dtype), p.shape[1:])
                        for n, p in plans.items()}
        self._cache = chunk_cache(list(plans.values()))
        self._handles: ProcessLocal[_Opened] = ProcessLocal()
        self._scratch = ThreadScratch()

    @classmethod
    def from_datasets(cls, datasets: Mapping[str, h5py.Dataset]) -> "Hdf5Source":
        """A source over open h5py datasets of one file (reopened by path in each process)."""
        files = {os.fspath(d.file.filename) for d in datasets.values()}
        if len(files) != 1:
            raise SourceError(f"h5py datasets come from several files {sorted(files)}; "
                              f"use one Hdf5Source per file")
        first = next(iter(datasets.values()))
        path = files.pop()
        if first.file.driver == "fileobj" or not Path(path).exists():
            raise SourceError(
                f"h5py dataset {first.name!r} lives in a file without a path on disk "
                f"({path!r}); gpuloader reopens files by path — save it to a file or pass "
                f"np.asarray(dataset) to keep it in RAM")
        if first.file.mode == "r+":
            first.file.flush()  # our own handle reads the file, so unwritten data must land
        return cls(path, {name: d.name for name, d in datasets.items()})

    @property
    def fields(self) -> Mapping[str, FieldSpec]:
        """Field name -> FieldSpec (native byte order)."""
        return self._fields

    @property
    def storage(self) -> Mapping[str, StorageInfo]:
        """Field name -> StorageInfo (layout, compression, chunk rows, read path)."""
        return {n: StorageInfo("hdf5", p.layout, p.read_path, path=self.path, key=p.key,
                               compression=p.compression,
                               chunk_rows=p.chunks[0] if p.chunks else None)
                for n, p in self._plans.items()}

    def __len__(self) -> int:
        return self._length

    @property
    def chunk_length(self) -> int:
        """Largest chunk length (dim 0) over chunked fields, else about 4 MiB of rows."""
        chunked = [p.chunks[0] for p in self._plans.values() if p.chunks]
        return max(chunked) if chunked else rows_per_block(self._fields)

    def read_into(self, indices: np.ndarray, out: Dict[str, np.ndarray]) -> None:
        """Gather ``indices`` into ``out`` (see NOTE(read-contract) in base.py)."""
        plan = RowPlan(indices, self._length)
        check_out(self._fields, len(plan.indices), out)
        if len(plan.indices) == 0:
            return
        opened = self._handles.get(self._open)
        for filename, filemap in opened.files.maps.items():  # NOTE(shrunk-files) in base.py
            check_mapped_size(filename, filemap, filemap.size)
        for name, reader in opened.readers.items():
            try:
                reader.read(plan, out[name], self._scratch, name)
            except Exception as exc:  # name the file and field (the loader adds the indices)
                add_note(exc, f"gpuloader: while reading field {name!r} "
                              f"(dataset {self._plans[name].key!r}) from {self.path}")
                raise

    def will_need(self, first: int, count: int) -> None:
        """Hint the kernel that rows ``first .. first + count - 1`` are read soon (readahead)."""
        for reader in self._handles.get(self._open).readers.values():
            reader.will_need(first, count)

    def _open(self) -> "_Opened":
        return _Opened.open(self.path, self._plans, self._cache)

    def close(self) -> None:
        """Close this process's file handle and drop its maps; the next read reopens."""
        opened = self._handles.take()
        if opened is not None:
            opened.close()

    def __repr__(self) -> str:
        listing = ", ".join(f"{n}: {p.dtype}{list(p.shape[1:])} {p.read_path}"
                            for n, p in self._plans.items())
        return f"Hdf5Source({self.path!r}, {len(self)} samples; {listing})"


# --------------------------------------------------------------------------------------------
# Per-process state and the three readers.
# --------------------------------------------------------------------------------------------

class _Reader(Protocol):
    """Copies rows ``plan.indices`` of one field into ``out`` (scratch keyed by ``key``)."""

    def read(self, plan: RowPlan, out: np.ndarray, scratch: ThreadScratch, key: str) -> None:
        ...

    def will_need(self, first: int, count: int) -> None:
        """Readahead hint for rows ``first .. first + count - 1`` (may do nothing)."""


@dataclass
class _Opened:
    """This process's handle on one file: the h5py file (slab readers only) and the readers."""

    h5: Optional[h5py.File]
    readers: Dict[str, _Reader]
    files: "_Files"

    @classmethod
    def open(cls, path: str, plans: Mapping[str, Hdf5Field], cache: Tuple[int, int]) -> "_Opened":
        h5 = _open_file(path, cache)
        files = _Files()
        readers: Dict[str, _Reader] = {}
        try:
            for name, plan in plans.items():
                readers[name] = _make_reader(h5[plan.key], plan, files)
        except BaseException:
            h5.close()
            files.close()
            raise
        if any(isinstance(r, (_SlabReader, ChunkedReader)) for r in readers.values()):
            return cls(h5, readers, files)
        h5.close()  # every field reads through maps: hold no HDF5 handle at all
        return cls(None, readers, files)

    def close(self) -> None:
        if self.h5 is not None:
            self.h5.close()
        self.files.close()


@dataclass
class _Files:
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


@contextlib.contextmanager
def metadata_errors(path: str) -> Iterator[None]:
    """NOTE(hdf5-errors): h5py's errors while reading a file's metadata (``RuntimeError: Unable
    to get group info (bad symbol table node signature)``, ...) name no file; re-raise them as
    a SourceError naming the file and what to check.  gpuloader's own errors pass through."""
    try:
        yield
    except (RuntimeError, OSError, KeyError) as exc:
        if isinstance(exc, GpuLoaderError):
            raise
        raise SourceError(
            f"{path}: cannot read the HDF5 metadata (groups, datasets, their types and "
            f"layouts): {type(exc).__name__}: {exc}. The file may be corrupt or truncated; "
            "check it with `h5ls -r` / `h5dump -H`, or re-create it") from exc


def _check_external(dset: h5py.Dataset, path: str) -> None:
    """NOTE(hdf5-errors): a dataset stored in external raw files names a missing one when the
    dataset opens, not with h5py's nameless error at the first batch."""
    for name, _offset, _size in dset.external or ():
        name = os.fsdecode(name)
        here = os.path.dirname(os.path.abspath(path))
        candidates = [name] if os.path.isabs(name) else [os.path.join(here, name), name]
        if not any(os.path.exists(c) for c in candidates):
            raise SourceNotFoundError(
                f"dataset {dset.name.lstrip('/')!r} of {path} stores its data in the external "
                f"file {name}, which is missing (looked in {', '.join(candidates)}); restore "
                "it beside the HDF5 file or where the dataset says")


def _open_file(path: str, cache: Optional[Tuple[int, int]] = None) -> h5py.File:
    """``path`` opened read-only, with chunk cache ``(nbytes, nslots)`` if given."""
    options = {} if cache is None else {"rdcc_nbytes": cache[0], "rdcc_nslots": cache[1]}
    try:
        return h5py.File(path, "r", **options)
    except OSError as exc:
        if "lock" not in str(exc).lower():
            raise SourceError(f"cannot open HDF5 file {path!r}: {exc}") from exc
    # Another process holds the file open for writing (HDF5's file lock); reading needs none.
    try:
        return h5py.File(path, "r", locking=False, **options)
    except OSError as exc:
        raise SourceError(f"cannot open HDF5 file {path!r}: {exc}") from exc


def _make_reader(dset: h5py.Dataset, plan: Hdf5Field, files: _Files) -> _Reader:
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
    return _SlabReader(dset, plan)


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
class _SlabReader:
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
