"""Which Source a path on disk is: ``.npy`` files and folders, raw binary, HDF5, Megatron.

Ragged fields are recognised by layout: a Megatron ``.bin``/``.idx`` pair (field "tokens"), a
folder's ``NAME.values.npy`` + ``NAME.offsets.npy``, an HDF5 group ``NAME`` holding datasets
``values`` and ``offsets``, or a 1-D variable-length HDF5 dataset.  Everything else is read by
the fixed-row sources as before.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import h5py
import numpy as np

from gpuloader.errors import ArgumentError, SourceError
from gpuloader.sources.base import Source, select_fields
from gpuloader.sources.binidx import is_binidx, open_binidx
from gpuloader.sources.hdf5 import Hdf5Source, is_hdf5_file, metadata_errors
from gpuloader.sources.npy import NpySource, npy_file
from gpuloader.sources.ragged import (Column, RaggedSource, SpanColumn, VlenColumn,
                                      check_offsets, find_npy_pairs)

PathLike = Union[str, "os.PathLike[str]"]

#: File name endings read as HDF5 (other files are sniffed for the HDF5 signature).
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")


def _no_raw_options(path: Path, dtype: object, shape: object, what: str) -> None:
    if dtype is not None or shape is not None:
        raise ArgumentError(
            f"open_dataset: dtype=/shape= apply to raw binary files only; {str(path)!r} is "
            f"{what}, which carries its own dtype and shape")


def open_source(path: Path, fields: Optional[Sequence[str]], *, dtype: object = None,
                shape: Optional[Sequence[int]] = None) -> Source:
    """The Source for ``path`` (see the module docstring); ``fields`` selects and orders."""
    if path.suffix in (".bin", ".idx") or (not path.exists() and is_binidx(path)):
        if is_binidx(path):
            _no_raw_options(path, dtype, shape, "a Megatron indexed dataset")
            return _combine({"tokens": open_binidx(path)}, None, fields, str(path))
        if path.suffix == ".idx":
            open_binidx(path)  # raises: names the missing .bin
    if not path.is_dir() and (path.suffix.lower() in HDF5_SUFFIXES or is_hdf5_file(path)):
        _no_raw_options(path, dtype, shape, "HDF5")
        return _open_hdf5(path, fields)
    if path.is_dir():
        pairs = find_npy_pairs(path)
        if pairs:
            return _open_npy_folder(path, pairs, fields)
    return NpySource(path, fields, dtype=dtype, shape=shape)


def _combine(columns: Dict[str, Column], fixed: Optional[Source],
             fields: Optional[Sequence[str]], what: str) -> Source:
    """A RaggedSource over ``columns`` + ``fixed``, keeping only ``fields`` (in their order)."""
    available = list(columns) + (list(fixed.fields) if fixed is not None else [])
    names = select_fields(available, fields, what)
    columns = {n: c for n, c in columns.items() if n in names}
    if not columns:
        if fixed is None:
            raise SourceError(f"{what}: no field selected")
        return fixed
    return RaggedSource(columns, fixed, names)


def _open_npy_folder(path: Path, pairs: list, fields: Optional[Sequence[str]]) -> Source:
    skip = {Path(p).name for pair in pairs for p in (pair.values, pair.offsets)}
    plain = sorted(p for p in path.glob("*.npy") if p.is_file() and p.name not in skip)
    wanted = None if fields is None else set(fields)
    plain = [p for p in plain if wanted is None or p.stem in wanted]
    columns: Dict[str, Column] = {}
    for pair in pairs:
        if wanted is not None and pair.name not in wanted:
            continue
        values = NpySource.from_files({"values": npy_file(Path(pair.values))})
        count = len(values)
        offsets = check_offsets(np.load(pair.offsets, mmap_mode="r"), count,
                                f"ragged field {pair.name!r} ({pair.offsets})")
        columns[pair.name] = SpanColumn(values, offsets[:-1], np.diff(offsets), kind="npy")
    fixed = NpySource(plain) if plain else None
    return _combine(columns, fixed, fields, f"folder {str(path)!r}")


def _ragged_group(group: h5py.Group) -> bool:
    return (isinstance(group.get("values"), h5py.Dataset)
            and isinstance(group.get("offsets"), h5py.Dataset))


def _open_hdf5(path: Path, fields: Optional[Sequence[str]]) -> Source:
    if not path.exists() or not is_hdf5_file(path):
        return Hdf5Source(path, fields)  # raises, naming the path and what was expected
    fixed_keys: List[str] = []
    groups: List[str] = []
    vlen: List[str] = []
    with metadata_errors(os.fspath(path)), h5py.File(path, "r") as h5:
        keys = list(h5.keys()) if fields is None else [str(f).lstrip("/") for f in fields]
        for key in keys:
            obj = h5.get(key)
            if isinstance(obj, h5py.Group) and _ragged_group(obj):
                groups.append(key)
            elif isinstance(obj, h5py.Dataset) and h5py.check_vlen_dtype(obj.dtype) is not None:
                vlen.append(key)
            elif isinstance(obj, h5py.Dataset) and (fields is not None or obj.ndim >= 1):
                fixed_keys.append(key)
            elif fields is not None:
                fixed_keys.append(key)  # Hdf5Source names what is missing
        offsets = {g: h5[g]["offsets"][()] for g in groups}
        counts = {g: int(h5[g]["values"].shape[0]) if h5[g]["values"].ndim else -1
                  for g in groups}
    if not groups and not vlen:
        return Hdf5Source(path, fields)
    columns: Dict[str, Column] = {}
    for g in groups:
        offs = check_offsets(offsets[g], counts[g], f"HDF5 group {g!r} in {str(path)!r}")
        values = Hdf5Source(path, {"values": f"{g}/values"})
        columns[g] = SpanColumn(values, offs[:-1], np.diff(offs), kind="hdf5")
    for key in vlen:
        columns[key] = VlenColumn(os.fspath(path), key)
    fixed = Hdf5Source(path, fixed_keys) if fixed_keys else None
    order = keys if fields is not None else None
    return _combine(columns, fixed, order, f"HDF5 file {str(path)!r}")


def has_ragged_layout(path: PathLike) -> bool:
    """True when ``path`` holds a ragged field by layout (cheap: names and HDF5 metadata)."""
    p = Path(os.fspath(path))
    if is_binidx(p):
        return True
    if p.is_dir():
        return any(p.glob("*.values.npy")) or any(p.glob("*.offsets.npy"))
    if p.is_file() and is_hdf5_file(p):
        with h5py.File(p, "r") as h5:
            for obj in h5.values():
                if isinstance(obj, h5py.Group) and _ragged_group(obj):
                    return True
                if isinstance(obj, h5py.Dataset) and h5py.check_vlen_dtype(obj.dtype) is not None:
                    return True
    return False
