"""Convert between a folder of ``.npy`` files (or one ``.npy``) and an HDF5 file, streaming.

Each field is copied in blocks of rows (``block_bytes`` over all fields, default 64 MiB, whole
HDF5 chunks at a time), so memory stays bounded whatever the data size; ``.npy`` files are
written sequentially (header, then rows), never through a writable memory map.  The output is
written under a temporary name next to the destination and renamed into place at the end, so a
destination that exists is complete.

Kinds are chosen by name: ``.h5``/``.hdf5``/``.hdf`` is HDF5, a ``.npy`` path is one field, and
anything else is a folder of ``.npy`` files (one per field, named by field).  Only top-level
HDF5 datasets are fields (like ``gpuloader.open_dataset``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from gpuloader.errors import (ArgumentError, FieldNotFoundError, SourceError,
                              SourceNotFoundError, describe)

__all__ = ["convert", "COMPRESSIONS", "default_chunk_rows", "kind_of"]

PathLike = Union[str, "os.PathLike[str]"]

#: Accepted ``compression`` values (None and "none" mean uncompressed).
COMPRESSIONS = ("gzip", "lzf", "none")
_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
DEFAULT_BLOCK_BYTES = 64 << 20
#: Target bytes of one HDF5 chunk when ``chunk_rows`` is not given.
CHUNK_BYTES = 1 << 20


def kind_of(path: PathLike) -> str:
    """"hdf5", "npy" (one file) or "folder", from the path's name."""
    suffix = Path(path).suffix.lower()
    if suffix in _HDF5_SUFFIXES:
        return "hdf5"
    if suffix == ".npy":
        return "npy"
    return "folder"


def default_chunk_rows(row_nbytes: int, rows: int) -> int:
    """Rows of an HDF5 chunk of about ``CHUNK_BYTES`` (at least 1, at most ``rows``)."""
    return max(1, min(max(1, rows), CHUNK_BYTES // max(1, row_nbytes)))


@dataclass(frozen=True)
class _Field:
    name: str
    dtype: np.dtype
    shape: Tuple[int, ...]  # full shape, rows first
    reader: Any             # something sliceable along dim 0: a memmap or an h5py dataset

    @property
    def row_nbytes(self) -> int:
        return int(self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64)))


def _check_dtype(name: str, dtype: np.dtype, where: str) -> None:
    if dtype.kind not in "biufcSV" or dtype.hasobject:
        raise SourceError(f"field {name!r} in {where} has dtype {dtype}, which cannot be "
                          "converted (numeric, bool and fixed-size bytes are supported)")


@contextlib.contextmanager
def _open_source(src: Path) -> Iterator[List[_Field]]:
    if not src.exists():
        raise SourceNotFoundError(f"convert: source {str(src)!r} does not exist")
    import h5py

    kind = "folder" if src.is_dir() else ("hdf5" if h5py.is_hdf5(str(src)) else "npy")
    if kind == "hdf5":

        try:
            handle = h5py.File(src, "r")
        except OSError as exc:
            raise SourceError(f"convert: cannot open {str(src)!r} as HDF5: {exc}") from None
        try:
            fields = []
            for name, obj in handle.items():
                if isinstance(obj, h5py.Dataset) and obj.ndim >= 1:
                    _check_dtype(name, obj.dtype, str(src))
                    fields.append(_Field(name, np.dtype(obj.dtype), tuple(obj.shape), obj))
            yield fields
        finally:
            handle.close()
        return
    files = [src] if kind == "npy" else sorted(src.glob("*.npy"))
    if not files:
        raise SourceError(f"convert: folder {str(src)!r} holds no .npy files")
    fields = []
    for file in files:
        try:
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise SourceError(f"convert: cannot read {str(file)!r} as .npy: {exc}") from None
        if array.ndim < 1:
            raise SourceError(f"convert: {str(file)!r} holds a scalar; fields need a row axis")
        _check_dtype(file.stem, array.dtype, str(file))
        fields.append(_Field(file.stem, array.dtype, tuple(array.shape), array))
    yield fields


def _select(fields: List[_Field], wanted: Optional[Sequence[str]], src: Path) -> List[_Field]:
    by_name = {f.name: f for f in fields}
    if wanted:
        missing = [w for w in wanted if w not in by_name]
        if missing:
            raise FieldNotFoundError(f"convert: no field {missing[0]!r} in {str(src)!r}; fields: "
                                     f"{', '.join(by_name) or '(none)'}")
        fields = [by_name[w] for w in wanted]
    if not fields:
        raise SourceError(f"convert: {str(src)!r} has no array fields to convert")
    lengths = {f.name: f.shape[0] for f in fields}
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise SourceError(f"convert: fields of {str(src)!r} differ in length ({listing}); "
                          "choose fields that share dimension 0 with --fields")
    return fields


def _read_block(field: _Field, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``field``; an HDF5 read error names file, dataset and rows
    (NOTE(hdf5-errors) in sources/hdf5.py)."""
    try:
        return np.ascontiguousarray(field.reader[start:stop], dtype=field.dtype)
    except OSError as exc:
        import h5py

        if not isinstance(field.reader, h5py.Dataset):
            raise
        from gpuloader.sources.chunks import read_error

        raise read_error(exc, field.reader, start, stop) from exc


def _blocks(rows: int, block_rows: int) -> Iterator[Tuple[int, int]]:
    for start in range(0, rows, block_rows):
        yield start, min(rows, start + block_rows)


def _write_npy_field(field: _Field, path: Path, block_rows: int, bar: Any) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(field.dtype), "fortran_order": False,
              "shape": field.shape}
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_2_0(fh, header)
        for start, stop in _blocks(field.shape[0], block_rows):
            block = _read_block(field, start, stop)
            fh.write(memoryview(block).cast("B"))
            bar.update(block.nbytes)


def _write_hdf5(fields: List[_Field], path: Path, chunk_rows: Optional[int],
                compression: Optional[str], block_rows: int, bar: Any) -> Dict[str, Any]:
    import h5py

    chunks: Dict[str, Any] = {}
    with h5py.File(path, "w") as handle:
        for field in fields:
            rows = field.shape[0]
            crows = chunk_rows or default_chunk_rows(field.row_nbytes, rows)
            crows = max(1, min(crows, max(1, rows)))
            chunk_shape = (crows,) + field.shape[1:]
            options: Dict[str, Any] = {}
            if compression == "gzip":
                options.update(compression="gzip", compression_opts=4)
            elif compression == "lzf":
                options.update(compression="lzf")
            dset = handle.create_dataset(field.name, shape=field.shape, dtype=field.dtype,
                                         chunks=chunk_shape if rows else None, **options)
            # whole chunks per write: a compressed chunk is then encoded once
            step = max(crows, block_rows - block_rows % crows)
            for start, stop in _blocks(rows, step):
                block = _read_block(field, start, stop)
                dset[start:stop] = block
                bar.update(block.nbytes)
            chunks[field.name] = chunk_shape
    return chunks


def convert(src: PathLike, dst: PathLike, *, fields: Optional[Sequence[str]] = None,
            chunk_rows: Optional[int] = None, compression: Optional[str] = None,
            block_bytes: int = DEFAULT_BLOCK_BYTES, overwrite: bool = False,
            progress: bool = False) -> Dict[str, Any]:
    """Copy the fields of ``src`` to ``dst`` (kinds by name, see the module docstring).

    ``fields``: which to copy (default all, which must share dimension 0).  ``chunk_rows``: rows
    per HDF5 chunk (default about 1 MiB of rows).  ``compression``: "gzip", "lzf" or
    None/"none" (HDF5 only).  ``overwrite``: replace an existing ``dst``.  Returns a summary:
    ``{"src", "dst", "format", "rows", "bytes", "fields": {name: {"dtype", "shape"}},
    "chunks": {name: chunk shape} (HDF5)}``.
    """
    source, target = Path(src), Path(dst)
    if compression is not None and compression not in COMPRESSIONS:
        raise ArgumentError(f"compression must be one of {', '.join(COMPRESSIONS)}; got "
                            f"{describe(compression)}")
    if compression == "none":
        compression = None
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ArgumentError(f"chunk_rows must be a positive int of rows per HDF5 chunk; got "
                            f"{describe(chunk_rows)}")
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 1:
        raise ArgumentError(f"block_bytes must be a positive int; got {describe(block_bytes)}")
    out_kind = kind_of(target)
    if out_kind != "hdf5" and (chunk_rows is not None or compression is not None):
        raise ArgumentError(f"chunk_rows and compression apply to HDF5 output only; "
                            f"{str(target)!r} is a .npy {'file' if out_kind == 'npy' else 'folder'}"
                            " (name it .h5 for HDF5)")
    if source.exists() and target.exists() and source.resolve() == target.resolve():
        raise ArgumentError(f"convert: source and destination are the same path {str(src)!r}")
    if target.exists() and not overwrite:
        raise ArgumentError(f"convert: destination {str(target)!r} exists; pass overwrite=True "
                            "(--overwrite) to replace it")
    from tqdm import tqdm

    with _open_source(source) as found:
        chosen = _select(found, fields, source)
        if out_kind == "npy" and len(chosen) != 1:
            raise ArgumentError(f"convert: {str(target)!r} is one .npy file but {len(chosen)} "
                                f"fields were chosen ({', '.join(f.name for f in chosen)}); "
                                "give a folder as destination or pick one with --fields")
        rows = chosen[0].shape[0]
        row_nbytes = sum(f.row_nbytes for f in chosen)
        total = rows * row_nbytes
        block_rows = max(1, block_bytes // max(1, row_nbytes))
        target.parent.mkdir(parents=True, exist_ok=True)
        summary: Dict[str, Any] = {
            "src": str(source), "dst": str(target),
            "format": "hdf5" if out_kind == "hdf5" else "npy", "rows": rows, "bytes": total,
            "fields": {f.name: {"dtype": str(f.dtype), "shape": list(f.shape[1:])}
                       for f in chosen},
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp",
                                    dir=str(target.parent)))
        try:
            with tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                      desc=f"convert {source.name} -> {target.name}", leave=False) as bar:
                if out_kind == "hdf5":
                    built = tmp / target.name
                    summary["chunks"] = {k: list(v) for k, v in _write_hdf5(
                        chosen, built, chunk_rows, compression, block_rows, bar).items()}
                    summary["compression"] = compression
                elif out_kind == "npy":
                    built = tmp / target.name
                    _write_npy_field(chosen[0], built, block_rows, bar)
                else:
                    built = tmp / "out"
                    built.mkdir()
                    for field in chosen:
                        _write_npy_field(field, built / f"{field.name}.npy", block_rows, bar)
            if target.exists():
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            os.replace(built, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return summary
