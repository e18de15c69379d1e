"""Where the bytes are: the baselines read storage directly, bypassing gpuloader."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from gpuloader.dataset import ArrayDataset
from gpuloader.errors import (ArgumentError, ArgumentTypeError, FieldNotFoundError,
                              SourceNotFoundError, describe)

_Handle = Tuple[Any, Optional[Callable[[], None]]]   # (array-like, closer or None)


@dataclass(frozen=True)
class RawField:
    """Where one field's samples live, for the cases that bypass gpuloader.

    ``kind`` is ``"npy"`` (a ``.npy`` file, memory-mapped), ``"bin"`` (raw binary with ``dtype``,
    ``shape`` and ``offset``), ``"h5"`` (dataset ``key`` of the HDF5 file ``path``) or
    ``"array"`` (an in-RAM array given as ``array``).  :meth:`open` returns an array-like that
    supports ``a[i]``, ``a[sorted_int_array]`` and ``a[start:stop]`` (and ``read_direct`` for
    HDF5).  Handles are opened lazily per process, so the object may cross a fork or a pickle.
    """

    kind: str
    path: Optional[str] = None
    key: Optional[str] = None
    dtype: Optional[str] = None
    shape: Optional[Tuple[int, ...]] = None     # full shape, samples first ("bin" only)
    offset: int = 0
    array: Any = field(default=None, compare=False, repr=False)

    def open(self) -> Any:
        """The array-like for this process (cached per process id; see :func:`close_raw`)."""
        cache_key = (os.getpid(), self.kind, self.path, self.key, id(self.array))
        handle = _RAW_HANDLES.get(cache_key)
        if handle is None:
            handle = _RAW_HANDLES[cache_key] = self._open_handle()
        return handle[0]

    def _open_handle(self) -> _Handle:
        if self.kind == "array":
            return self.array, None
        if self.kind == "npy":
            return np.load(self.path, mmap_mode="r"), None
        if self.kind == "bin":
            return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r",
                             offset=self.offset, shape=self.shape), None
        if self.kind == "h5":
            import h5py

            h5file = h5py.File(self.path, "r")
            return h5file[self.key], h5file.close
        raise ArgumentError(
            f"RawField.kind must be one of 'npy', 'bin', 'h5', 'array', got {self.kind!r}"
        )


_RAW_HANDLES: Dict[tuple, _Handle] = {}


def close_raw() -> None:
    """Close every raw handle this process opened (HDF5 files; memmaps are just dropped)."""
    pid = os.getpid()
    for cache_key in [k for k in _RAW_HANDLES if k[0] == pid]:
        _, closer = _RAW_HANDLES.pop(cache_key)
        if closer is not None:
            closer()


def raw_fields_from_path(path: Union[str, os.PathLike], fields: Optional[Sequence[str]] = None,
                         *, dtype: Optional[str] = None,
                         shape: Optional[Sequence[int]] = None) -> Dict[str, RawField]:
    """The raw fields behind ``open_dataset(path, fields, dtype=dtype, shape=shape)``.

    Follows the same naming rules: a folder gives one field per ``*.npy`` (named by its stem), a
    ``.npy`` file one field named by its stem, an HDF5 file its top-level datasets, a raw binary
    file (``dtype`` and ``shape`` given) one field named by its stem.
    """
    p = Path(path)
    if not p.exists():
        raise SourceNotFoundError(f"--data / path: {str(p)!r} does not exist")
    if p.is_dir():
        found = {f.stem: RawField("npy", str(f)) for f in sorted(p.glob("*.npy"))}
    elif dtype is not None:
        found = {p.stem: _raw_binary_field(p, dtype, shape)}
    elif p.suffix == ".npy":
        found = {p.stem: RawField("npy", str(p))}
    else:
        found = _h5_fields(p)
    if fields is None:
        return found
    missing = [f for f in fields if f not in found]
    if missing:
        raise FieldNotFoundError(
            f"fields {missing!r} not found in {str(p)!r}; available: {sorted(found)}"
        )
    return {f: found[f] for f in fields}


def _raw_binary_field(p: Path, dtype: str, shape: Optional[Sequence[int]]) -> RawField:
    """The field of a raw binary file; a ``-1`` in ``shape`` is filled from the file size."""
    if shape is None:
        raise ArgumentError(f"shape is needed with dtype={dtype!r} for raw binary {str(p)!r}")
    row = tuple(int(s) for s in shape)
    itemsize = np.dtype(dtype).itemsize * int(np.prod([s for s in row if s != -1]))
    dims = tuple(p.stat().st_size // itemsize if s == -1 else s for s in row)
    return RawField("bin", str(p), dtype=str(np.dtype(dtype)), shape=dims)


def _h5_fields(p: Path) -> Dict[str, RawField]:
    """One field per top-level dataset (of at least one dimension) of the HDF5 file ``p``."""
    import h5py

    found: Dict[str, RawField] = {}
    with h5py.File(p, "r") as h5file:
        for name, obj in h5file.items():
            if isinstance(obj, h5py.Dataset) and obj.ndim >= 1:
                found[name] = RawField("h5", str(p), key=name)
    return found


def raw_fields_from_dataset(dataset: Any) -> Optional[Dict[str, RawField]]:
    """Raw fields of an ArrayDataset, from its source's ``storage`` description; else None.

    Flat files and HDF5 datasets are reopened from their paths; in-RAM fields are used when the
    source exposes its arrays.  None when any field's bytes cannot be reached directly.
    """
    source = getattr(dataset, "source", None)
    storage = getattr(source, "storage", None)
    if not isinstance(storage, Mapping) or not storage:
        return None
    files = getattr(source, "files", None)
    arrays = getattr(source, "arrays", None)
    found: Dict[str, RawField] = {}
    for name, info in storage.items():
        fmt = getattr(info, "format", None)
        path = getattr(info, "path", None)
        if fmt == "npy" and path:
            found[name] = RawField("npy", path)
        elif fmt == "raw" and isinstance(files, Mapping) and name in files:
            flat = files[name]
            found[name] = RawField("bin", flat.path, dtype=str(np.dtype(flat.dtype)),
                                   shape=tuple(flat.shape), offset=int(flat.offset))
        elif fmt == "hdf5" and path and getattr(info, "key", None):
            found[name] = RawField("h5", path, key=info.key)
        elif fmt == "ram" and isinstance(arrays, Mapping) and name in arrays:
            found[name] = RawField("array", array=arrays[name])
        else:
            return None
    return found


def as_raw_fields(raw: Mapping[str, Union[RawField, np.ndarray]]) -> Dict[str, RawField]:
    """``raw`` as given to :func:`compare` / :func:`open_case`: in-RAM arrays become fields."""
    return {str(k): _as_raw_field(v) for k, v in raw.items()}


def resolve_raw(dataset: Any, raw: Optional[Mapping[str, Union[RawField, np.ndarray]]]
                ) -> Optional[Dict[str, RawField]]:
    """The raw fields of a comparison: ``raw`` if given, else those of an ArrayDataset."""
    if raw is not None:
        return as_raw_fields(raw)
    return raw_fields_from_dataset(dataset) if isinstance(dataset, ArrayDataset) else None


def _as_raw_field(value: Any) -> RawField:
    if isinstance(value, RawField):
        return value
    if isinstance(value, np.ndarray):
        return RawField("array", array=value)
    raise ArgumentTypeError(f"raw field must be a RawField or ndarray, got {describe(value)}")
