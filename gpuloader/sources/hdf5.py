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
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import h5py
import numpy as np

from gpuloader.errors import (ArgumentError, FieldNotFoundError, GpuLoaderError, SourceError,
                              SourceNotFoundError, add_note)
from gpuloader.sources.base import (FieldSpec, ProcessLocal, RowPlan, StorageInfo, ThreadScratch,
                                    check_field_names, check_lengths, check_mapped_size,
                                    check_out, native_dtype,
                                    rows_per_block)
from gpuloader.sources.chunks import ChunkedReader
from gpuloader.sources.hdf5_read import (FieldReader, FileHandles, Hdf5Field, SlabReader,
                                         make_reader)

PathLike = Union[str, "os.PathLike[str]"]

#: Upper bound of the per-dataset chunk cache (bytes); see :func:`chunk_cache`.
_MAX_CACHE_BYTES = 256 << 20


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
# Per-process state: the open file and its readers (hdf5_read.py).
# --------------------------------------------------------------------------------------------

@dataclass
class _Opened:
    """This process's handle on one file: the h5py file (slab readers only) and the readers."""

    h5: Optional[h5py.File]
    readers: Dict[str, FieldReader]
    files: "FileHandles"

    @classmethod
    def open(cls, path: str, plans: Mapping[str, Hdf5Field], cache: Tuple[int, int]) -> "_Opened":
        h5 = _open_file(path, cache)
        files = FileHandles()
        readers: Dict[str, FieldReader] = {}
        try:
            for name, plan in plans.items():
                readers[name] = make_reader(h5[plan.key], plan, files)
        except BaseException:
            h5.close()
            files.close()
            raise
        if any(isinstance(r, (SlabReader, ChunkedReader)) for r in readers.values()):
            return cls(h5, readers, files)
        h5.close()  # every field reads through maps: hold no HDF5 handle at all
        return cls(None, readers, files)

    def close(self) -> None:
        if self.h5 is not None:
            self.h5.close()
        self.files.close()


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
