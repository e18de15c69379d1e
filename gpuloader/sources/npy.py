"""Memory-mapped flat files: ``.npy`` files, folders of ``.npy`` files, raw binary files.

Every field is one file mapped read-only; a batch is one numpy gather from the map into the
caller's buffer (see :class:`gpuloader.sources.base.RowPlan`), which releases the GIL, so
reader threads copy in parallel.  Batches whose rows are not in the page cache are read with
many positional reads in flight instead (NOTE(cold-probe) in pread.py).  Only paths and header facts are pickled; each process maps
the files itself on first read (NOTE(read-contract) in base.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from gpuloader.errors import (ArgumentError, ArgumentTypeError, SourceError, SourceNotFoundError,
                              add_note, describe)
from gpuloader.sources.base import (FieldSpec, ProcessLocal, RowPlan, StorageInfo, check_lengths,
                                    check_mapped_size, check_out, native_dtype, rows_per_block,
                                    select_fields)
from gpuloader.sources.pread import RowFile

PathLike = Union[str, "os.PathLike[str]"]

#: The first bytes of every ``.npy`` file.
NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class FlatFile:
    """Where one field's bytes are: ``shape`` (samples first) of ``dtype`` at byte ``offset``.

    ``dtype`` is the storage dtype (its byte order may differ from the machine's); ``fortran``
    marks column-major ``.npy`` files.  ``format`` is "npy" or "raw".
    """

    path: str
    offset: int
    dtype: np.dtype
    shape: Tuple[int, ...]
    fortran: bool = False
    format: str = "raw"

    def open(self) -> np.ndarray:
        """A read-only map of the file as a plain ndarray (lifetime: until dropped)."""
        if int(np.prod(self.shape, dtype=np.int64)) == 0:
            return np.empty(self.shape, dtype=self.dtype)  # mmap refuses zero-length maps
        mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset,
                       shape=self.shape, order="F" if self.fortran else "C")
        # A plain ndarray view skips np.memmap's per-slice __array_finalize__ bookkeeping.
        return mm.view(np.ndarray)

    @property
    def row_nbytes(self) -> int:
        """Bytes of one sample as stored."""
        return int(self.dtype.itemsize * np.prod(self.shape[1:], dtype=np.int64))

    def row_file(self) -> Optional[RowFile]:
        """Positional reads of this file's rows, when its rows are C-ordered bytes that need no
        conversion (native byte order); None otherwise (those are gathered from the map)."""
        if self.fortran or not self.dtype.isnative or self.row_nbytes == 0 or not self.shape[0]:
            return None
        return RowFile(self.path)


def is_npy_file(path: Path) -> bool:
    """True when ``path`` is named ``*.npy`` or starts with the ``.npy`` magic bytes."""
    if path.suffix.lower() == ".npy":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(len(NPY_MAGIC)) == NPY_MAGIC
    except OSError:
        return False


def npy_file(path: Path) -> FlatFile:
    """Header facts of the ``.npy`` file ``path``; SourceError if it is corrupt or truncated."""
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as exc:  # numpy's words for a bad header or a short file
        raise SourceError(
            f"{str(path)!r} is not a readable .npy file ({exc}); expected a file written by "
            f"numpy.save with a fixed-size dtype") from exc
    if mm.ndim == 0:
        raise SourceError(
            f"{str(path)!r} holds a 0-d array; a field needs a sample axis (ndim >= 1)")
    offset = int(mm.offset)  # bytes of the header before the data
    fortran = mm.ndim > 1 and mm.flags.f_contiguous and not mm.flags.c_contiguous
    return FlatFile(str(path), offset, mm.dtype, tuple(mm.shape), fortran, "npy")


def raw_file(path: Path, dtype: object, shape: Optional[Sequence[int]]) -> FlatFile:
    """A raw binary file read as ``dtype`` in ``shape`` (one -1 is inferred from the size)."""
    try:
        dt = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError as exc:
        raise ArgumentTypeError(
            f"dtype={describe(dtype)} is not a numpy dtype; use e.g. dtype='float32'") from exc
    if dt.hasobject or dt.itemsize == 0:
        raise ArgumentError(
            f"dtype={describe(dtype)} has no fixed size; raw files need e.g. 'float32', 'int64'")
    dims = _parse_shape(shape)
    size = path.stat().st_size
    known = int(np.prod([d for d in dims if d != -1], dtype=np.int64)) * dt.itemsize
    if -1 in dims:
        if known == 0 or size % known:
            raise SourceError(
                f"raw file {str(path)!r} has {size} bytes, not a multiple of one shape={dims} "
                f"row of dtype {dt} ({known} bytes); check dtype= and shape=")
        dims = tuple(size // known if d == -1 else d for d in dims)
    elif known != size:
        raise SourceError(
            f"raw file {str(path)!r} has {size} bytes but shape={dims} of dtype {dt} needs "
            f"{known}; use -1 for the dimension to infer, e.g. shape=(-1, ...)")
    return FlatFile(str(path), 0, dt, dims, False, "raw")


def _parse_shape(shape: Optional[Sequence[int]]) -> Tuple[int, ...]:
    if shape is None:
        return (-1,)
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError) as exc:
        raise ArgumentTypeError(
            f"shape={describe(shape)} must be a tuple of ints, e.g. shape=(-1, 256)") from exc
    if not dims or dims.count(-1) > 1 or any(d < -1 for d in dims):
        raise ArgumentError(
            f"shape={dims} is not accepted: give non-negative sizes with at most one -1 (the "
            f"dimension inferred from the file size), e.g. shape=(-1, 256)")
    return dims


def discover(paths: Union[PathLike, Sequence[PathLike]], *, dtype: object = None,
             shape: Optional[Sequence[int]] = None) -> Dict[str, FlatFile]:
    """Field name -> FlatFile for ``paths`` (files or folders of ``.npy`` files), in order."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ArgumentError("NpySource: paths=[] names no file; give .npy files or a folder")
    if shape is not None and dtype is None:
        raise ArgumentError(
            f"shape={describe(shape)} needs dtype= (it only applies to raw binary files)")
    found: Dict[str, FlatFile] = {}
    used_raw = False
    for item in items:
        path = Path(os.fspath(item))
        for file in _expand(path):
            if is_npy_file(file):
                flat = npy_file(file)
            elif dtype is None:
                raise SourceError(
                    f"{str(file)!r} is neither a .npy file nor HDF5; to read it as raw binary "
                    f"pass dtype= (and shape=, e.g. dtype='float32', shape=(-1, 256))")
            else:
                flat = raw_file(file, dtype, shape)
                used_raw = True
            if file.stem in found:
                raise SourceError(
                    f"two files give field {file.stem!r}: {found[file.stem].path!r} and "
                    f"{str(file)!r}; field names come from file stems and must differ")
            found[file.stem] = flat
    if dtype is not None and not used_raw:
        raise ArgumentError(
            f"dtype={describe(dtype)} applies to raw binary files only; every path given is a "
            f".npy file whose header already says its dtype and shape")
    return found


def _expand(path: Path) -> List[Path]:
    if not path.exists():
        raise SourceNotFoundError(
            f"path {str(path)!r} does not exist; expected a .npy file, a folder of .npy files "
            f"or a raw binary file")
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.glob("*.npy") if p.is_file())
    if not files:
        raise SourceError(
            f"folder {str(path)!r} contains no .npy files; expected one <field>.npy per field")
    return files


class NpySource:
    """Fields backed by memory-mapped ``.npy`` or raw binary files (one file per field).

    ``NpySource(paths, fields=None, *, dtype=None, shape=None)``: ``paths`` is one path or a
    list; a folder contributes each of its ``*.npy`` files (sorted by name), a file one field
    named by its stem.  Files that are not ``.npy`` are raw binary and need ``dtype`` (and
    ``shape``, default ``(-1,)``, with at most one -1).  ``fields`` selects and orders fields.
    All fields must share dimension 0.

    Lifetime: maps are opened lazily in each process on first read and dropped by
    :meth:`close`; the files must not shrink while mapped.
    """

    def __init__(self, paths: Union[PathLike, Sequence[PathLike]],
                 fields: Optional[Sequence[str]] = None, *, dtype: object = None,
                 shape: Optional[Sequence[int]] = None) -> None:
        found = discover(paths, dtype=dtype, shape=shape)
        names = select_fields(list(found), fields, "NpySource")
        self.path: Optional[str] = (
            os.fspath(paths) if isinstance(paths, (str, os.PathLike)) else None)
        self._init({name: found[name] for name in names})

    @classmethod
    def from_files(cls, files: Mapping[str, FlatFile]) -> "NpySource":
        """A source over already described files (e.g. the map behind an ``np.memmap``)."""
        self = cls.__new__(cls)
        self.path = None
        self._init(dict(files))
        return self

    def _init(self, files: Dict[str, FlatFile]) -> None:
        self._files = files
        self._length = check_lengths({n: f.shape[0] for n, f in files.items()}, "NpySource")
        self._fields = {n: FieldSpec(native_dtype(f.dtype), tuple(f.shape[1:]))
                        for n, f in files.items()}
        self._maps: ProcessLocal[Dict[str, np.ndarray]] = ProcessLocal()
        self._rows: ProcessLocal[Dict[str, Optional[RowFile]]] = ProcessLocal()

    @property
    def fields(self) -> Mapping[str, FieldSpec]:
        """Field name -> FieldSpec (native byte order), in file order."""
        return self._fields

    @property
    def storage(self) -> Mapping[str, StorageInfo]:
        """Field name -> StorageInfo (format "npy" or "raw", read through a memory map)."""
        return {n: StorageInfo(f.format, "contiguous", "memmap", path=f.path)
                for n, f in self._files.items()}

    def __len__(self) -> int:
        return self._length

    @property
    def chunk_length(self) -> int:
        """Rows in about 4 MiB of samples (flat files have no natural block)."""
        return rows_per_block(self._fields)

    def read_into(self, indices: np.ndarray, out: Dict[str, np.ndarray]) -> None:
        """Gather ``indices`` into ``out`` (see NOTE(read-contract) in base.py)."""
        plan = RowPlan(indices, self._length)
        check_out(self._fields, len(plan.indices), out)
        maps = self._maps.get(self._open)
        rows = self._rows.get(self._open_rows)
        for name, arr in maps.items():
            flat = self._files[name]
            check_mapped_size(flat.path, arr, flat.offset + arr.nbytes)  # NOTE(shrunk-files)
            cold = rows[name]
            try:
                if cold is None or not cold.read(self._offsets(name, plan.indices), out[name]):
                    plan.gather(arr, out[name])
            except Exception as exc:  # name the file and field (the loader adds the indices)
                add_note(exc, f"gpuloader: while reading field {name!r} from {flat.path}")
                raise

    def will_need(self, first: int, count: int) -> None:
        """Hint the kernel that rows ``first .. first + count - 1`` are read soon (readahead)."""
        for name, cold in self._rows.get(self._open_rows).items():
            if cold is not None:
                flat = self._files[name]
                cold.will_need(flat.offset + first * flat.row_nbytes, count * flat.row_nbytes)

    def _offsets(self, name: str, indices: np.ndarray) -> np.ndarray:
        flat = self._files[name]
        return flat.offset + indices * flat.row_nbytes

    def _open(self) -> Dict[str, np.ndarray]:
        return {name: flat.open() for name, flat in self._files.items()}

    def _open_rows(self) -> Dict[str, Optional[RowFile]]:
        return {name: flat.row_file() for name, flat in self._files.items()}

    def close(self) -> None:
        """Drop this process's maps (the OS unmaps them once no batch view refers to them) and
        close its file descriptors."""
        self._maps.take()
        for cold in (self._rows.take() or {}).values():
            if cold is not None:
                cold.close()

    def __repr__(self) -> str:
        listing = ", ".join(f"{n}: {s.dtype}{list(s.shape)}" for n, s in self._fields.items())
        return f"NpySource({len(self)} samples; {listing})"
