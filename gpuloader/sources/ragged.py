"""Ragged (variable-length) fields: samples of different lengths stored end to end.

A ragged field is a flat ``values`` array (tokens first, then an optional per-token shape) and,
per sample, where its values start and how many there are.  ``offsets`` (int64, n + 1 entries,
``offsets[0] == 0``, non-decreasing, ``offsets[-1] == len(values)``) is the usual spelling;
Megatron's ``.idx`` gives starts and lengths directly.

NOTE(ragged-read): ``read_into(indices, out)`` writes the values of samples ``indices`` end to
end into ``out[name]`` (shape ``(sum of their lengths, *token_shape)``), in the order of
``indices``.  The values are gathered in one call on the values' own Source with a token-index
array built by numpy (``np.repeat`` of the sample starts plus an ``arange``), so a batch is one
pass over the values -- sorted when ``indices`` is sorted, as the loader always passes -- and
never a Python loop over samples.  That Source is the ordinary fixed-row reader (memmap,
HDF5 chunk-map or chunk-aware slab reads, RAM), so every storage path of fixed fields serves
ragged values too.  Fixed fields of the same dataset are read by their own Source as usual.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import h5py
import numpy as np

from gpuloader.errors import ArgumentError, SourceError
from gpuloader.sources.base import (DEFAULT_BLOCK_BYTES, FieldSpec, ProcessLocal, RowPlan, Source, StorageInfo,
                                    check_lengths, native_dtype, select_fields)


def check_offsets(offsets: Any, n_values: int, what: str = "offsets") -> np.ndarray:
    """``offsets`` as an int64 array, validated; SourceError (a ValueError) naming the first
    bad index otherwise.  Accepted: 1-D integers, ``offsets[0] == 0``, non-decreasing,
    ``offsets[-1] == n_values``."""
    arr = np.asarray(offsets)
    if arr.ndim != 1 or len(arr) == 0 or (arr.dtype.kind not in "iu"):
        raise SourceError(
            f"{what}: offsets must be a non-empty 1-D integer array (n + 1 entries for n "
            f"samples), got shape {arr.shape} and dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if int(arr[0]) != 0:
        raise SourceError(f"{what}: offsets[0] must be 0, got {int(arr[0])} at index 0")
    drops = np.flatnonzero(arr[1:] < arr[:-1])
    if len(drops):
        i = int(drops[0]) + 1
        raise SourceError(
            f"{what}: offsets must be non-decreasing; offsets[{i}] = {int(arr[i])} is below "
            f"offsets[{i - 1}] = {int(arr[i - 1])} (first bad index {i})")
    if int(arr[-1]) != n_values:
        raise SourceError(
            f"{what}: offsets[-1] must equal len(values) = {n_values}, got {int(arr[-1])} "
            f"at index {len(arr) - 1}")
    return arr


def token_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Value rows of samples with ``starts``/``lengths``, end to end (int64, vectorised)."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    out_starts = np.cumsum(lengths) - lengths
    return np.repeat(starts - out_starts, lengths) + np.arange(total, dtype=np.int64)


class SpanColumn:
    """One ragged field: a one-field ``values`` Source (rows = tokens) plus per-sample spans.

    ``starts``/``lengths`` are int64 arrays held in RAM (16 bytes per sample); ``kind`` names
    the storage for ``gpuloader inspect`` ("megatron", "npy", "hdf5", "ram").
    """

    def __init__(self, values: Source, starts: np.ndarray, lengths: np.ndarray, *,
                 kind: str) -> None:
        self.values = values
        self.starts = np.ascontiguousarray(starts, dtype=np.int64)
        self.lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        self.kind = kind
        (self._inner,) = list(values.fields)
        self.spec = values.fields[self._inner]

    def __len__(self) -> int:
        return len(self.lengths)

    def gather(self, indices: np.ndarray, out: np.ndarray) -> None:
        """NOTE(ragged-read): values of samples ``indices`` end to end into ``out``."""
        rows = token_index(self.starts[indices], self.lengths[indices])
        self.values.read_into(rows, {self._inner: out})

    @property
    def storage(self) -> StorageInfo:
        inner = getattr(self.values, "storage", {}).get(self._inner)
        path = inner.path if inner is not None else None
        read_path = inner.read_path if inner is not None else "ram"
        return StorageInfo(self.kind, "ragged", read_path, path=path,
                           key=inner.key if inner is not None else None,
                           compression=inner.compression if inner is not None else None)

    def close(self) -> None:
        self.values.close()


class VlenColumn:
    """A 1-D HDF5 variable-length dataset.  Slower than ``values``/``offsets`` groups: h5py
    reads each selected element as its own object (the order is still one sorted pass), and
    the lengths need one full read of the dataset (done on open)."""

    kind = "hdf5-vlen"

    def __init__(self, path: str, key: str) -> None:
        self.path, self.key = path, key
        with h5py.File(path, "r") as h5:
            dset = h5[key]
            base = h5py.check_vlen_dtype(dset.dtype)
            if dset.ndim != 1 or base is None or np.dtype(base).kind not in "biuf":
                raise SourceError(
                    f"HDF5 dataset {key!r} in {path!r} is not a 1-D variable-length numeric "
                    f"dataset (dtype {dset.dtype}, shape {dset.shape})")
            self.spec = FieldSpec(native_dtype(np.dtype(base)), (), ragged=True)
            self.lengths = np.fromiter((len(v) for v in dset[()]), dtype=np.int64,
                                       count=len(dset))
        self._h5: ProcessLocal[h5py.File] = ProcessLocal()

    def __len__(self) -> int:
        return len(self.lengths)

    def gather(self, indices: np.ndarray, out: np.ndarray) -> None:
        """NOTE(ragged-read), through h5py's element reads (sorted, each sample once)."""
        if len(indices) == 0:
            return
        unique, inverse = np.unique(indices, return_inverse=True)
        dset = self._h5.get(lambda: h5py.File(self.path, "r"))[self.key]
        elements = dset[unique]
        np.concatenate([elements[k] for k in inverse.reshape(-1).tolist()], out=out)

    @property
    def storage(self) -> StorageInfo:
        return StorageInfo("hdf5", "vlen", "vlen (slow: h5py reads element by element)",
                           path=self.path, key=self.key)

    def close(self) -> None:
        h5 = self._h5.take()
        if h5 is not None:
            h5.close()


Column = Any  # SpanColumn | VlenColumn


class RaggedSource:
    """Fields of which some are ragged: ``RaggedSource(columns, fixed=None, order=None)``.

    ``columns`` maps ragged field names to columns (SpanColumn, VlenColumn); ``fixed`` is an
    ordinary Source holding the other fields; ``order`` lists all field names in sample order
    (default: ragged first, then fixed).  Ragged fields have ``FieldSpec.ragged`` set and
    their ``shape`` is the per-token shape.  See NOTE(ragged-read) for ``read_into``.
    """

    def __init__(self, columns: Mapping[str, Column], fixed: Optional[Source] = None,
                 order: Optional[Sequence[str]] = None) -> None:
        if not columns:
            raise ArgumentError("RaggedSource needs at least one ragged column")
        self._columns: Dict[str, Column] = dict(columns)
        self._fixed = fixed
        specs: Dict[str, FieldSpec] = {}
        lengths: Dict[str, int] = {}
        for name, col in self._columns.items():
            spec = col.spec
            specs[name] = FieldSpec(spec.dtype, tuple(spec.shape), ragged=True)
            lengths[name] = len(col)
        if fixed is not None:
            for name, spec in fixed.fields.items():
                if name in specs:
                    raise SourceError(f"field {name!r} is both ragged and fixed-size")
                specs[name] = spec
                lengths[name] = len(fixed)
        self._length = check_lengths(lengths, "RaggedSource")
        names = select_fields(list(specs), order, "RaggedSource")
        if len(names) != len(specs):
            names += [n for n in specs if n not in names]
        self._fields = {n: specs[n] for n in names}

    @property
    def fields(self) -> Mapping[str, FieldSpec]:
        """Field name -> FieldSpec (ragged fields: per-token shape, ``ragged=True``)."""
        return self._fields

    @property
    def ragged_fields(self) -> List[str]:
        """Names of the ragged fields, in field order."""
        return [n for n in self._fields if n in self._columns]

    def lengths(self, name: str) -> np.ndarray:
        """Per-sample lengths (int64, read-only view) of ragged field ``name``."""
        view = self._columns[name].lengths.view()
        view.flags.writeable = False
        return view

    @property
    def storage(self) -> Mapping[str, StorageInfo]:
        """Field name -> StorageInfo (ragged fields have layout "ragged" or "vlen")."""
        found = dict(getattr(self._fixed, "storage", {})) if self._fixed is not None else {}
        found.update({n: c.storage for n, c in self._columns.items()})
        return {n: found[n] for n in self._fields if n in found}

    def __len__(self) -> int:
        return self._length

    @property
    def chunk_length(self) -> int:
        """The fixed part's block, else samples in about 4 MiB of values at the mean length."""
        if self._fixed is not None:
            return int(self._fixed.chunk_length)
        col = next(iter(self._columns.values()))
        mean = float(np.mean(col.lengths)) if self._length else 1.0
        return max(1, int(DEFAULT_BLOCK_BYTES // max(1.0, mean * max(1, col.spec.sample_nbytes))))

    def read_into(self, indices: np.ndarray, out: Dict[str, np.ndarray]) -> None:
        """NOTE(ragged-read) for ragged fields, NOTE(read-contract) for the others."""
        plan = RowPlan(indices, self._length)
        idx = plan.indices
        if set(out) != set(self._fields):
            raise ArgumentError(
                f"read_into: out has fields {sorted(out)}, expected exactly {list(self._fields)}")
        for name, col in self._columns.items():
            spec = self._fields[name]
            want = (int(col.lengths[idx].sum()), *spec.shape)
            if out[name].shape != want or out[name].dtype != spec.dtype:
                raise ArgumentError(
                    f"read_into: out[{name!r}] has shape {out[name].shape} and dtype "
                    f"{out[name].dtype}; ragged field {name!r} needs shape {want} and dtype "
                    f"{np.dtype(spec.dtype)} (its samples' values end to end)")
            col.gather(idx, out[name])
        if self._fixed is not None:
            self._fixed.read_into(idx, {n: out[n] for n in self._fixed.fields})

    def close(self) -> None:
        """Close every part's handles in this process (reads reopen them)."""
        for col in self._columns.values():
            col.close()
        if self._fixed is not None:
            self._fixed.close()

    def __repr__(self) -> str:
        listing = ", ".join(
            f"{n}: {s.dtype}{'[*]' if s.ragged else ''}{list(s.shape)}"
            for n, s in self._fields.items())
        return f"RaggedSource({len(self)} samples; {listing})"


def ragged_names(fields: Mapping[str, FieldSpec]) -> List[str]:
    """Names of the ragged fields in ``fields``."""
    return [n for n, s in fields.items() if getattr(s, "ragged", False)]


@dataclass(frozen=True)
class OffsetsPair:
    """Paths of a ``NAME.values.npy`` + ``NAME.offsets.npy`` pair in a folder."""

    name: str
    values: str
    offsets: str


def find_npy_pairs(folder: "os.PathLike[str]") -> List[OffsetsPair]:
    """Every ``NAME.values.npy`` of ``folder`` with its ``NAME.offsets.npy`` (sorted by name);
    SourceError if one half of a pair is missing."""
    from pathlib import Path
    root = Path(folder)
    pairs: List[OffsetsPair] = []
    values = {p.name[: -len(".values.npy")]: p for p in root.glob("*.values.npy")}
    offsets = {p.name[: -len(".offsets.npy")]: p for p in root.glob("*.offsets.npy")}
    for name in sorted(set(values) | set(offsets)):
        if name not in values or name not in offsets:
            have, missing = ((offsets[name], f"{name}.values.npy") if name not in values
                             else (values[name], f"{name}.offsets.npy"))
            raise SourceError(
                f"folder {str(root)!r} has {have.name} but no {missing}; a ragged field NAME "
                f"needs both NAME.values.npy and NAME.offsets.npy")
        pairs.append(OffsetsPair(name, str(values[name]), str(offsets[name])))
    return pairs
