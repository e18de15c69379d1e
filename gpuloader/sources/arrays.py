"""Fields given as objects: numpy arrays, CPU tensors, h5py datasets, memmaps, other Sources.

In-RAM arrays are gathered directly.  Objects backed by files are turned into file sources so
they pickle as paths and reopen lazily in each process: an h5py Dataset becomes an
:class:`Hdf5Source` (by file name and dataset path), an ``np.memmap`` of a whole file (what
``np.load(..., mmap_mode="r")`` returns) an :class:`NpySource` over the same bytes.
"""
from __future__ import annotations

import mmap
import os
from typing import Any, Dict, List, Mapping, Tuple

import h5py
import numpy as np
import torch

from gpuloader.errors import ArgumentError, ArgumentTypeError, SourceError, describe
from gpuloader.sources.base import (FieldSpec, RowPlan, Source, StorageInfo, check_lengths,
                                    check_out, native_dtype, rows_per_block)
from gpuloader.sources.hdf5 import Hdf5Source
from gpuloader.sources.npy import FlatFile, NpySource

#: What a field value may be, for error messages.
ACCEPTED = ("a numpy array, a CPU torch.Tensor, an h5py.Dataset or a gpuloader Source with "
            "one field")


def tensor_to_numpy(name: str, tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's memory; ArgumentError for tensors that have none."""
    if tensor.device.type != "cpu":
        raise ArgumentError(
            f"array {name!r} is a tensor on {tensor.device}; gpuloader reads samples from host "
            f"memory or files — pass it as {name}.cpu() (the loader's device= option moves "
            f"batches to the GPU)")
    if tensor.layout != torch.strided:
        raise ArgumentTypeError(
            f"array {name!r} is a {tensor.layout} tensor; pass a dense tensor (.to_dense())")
    try:
        return tensor.detach().resolve_conj().resolve_neg().numpy()
    except TypeError as exc:  # e.g. bfloat16 has no numpy dtype
        raise ArgumentTypeError(
            f"array {name!r} has dtype {tensor.dtype}, which numpy cannot hold; convert it, "
            f"e.g. {name}.float()") from exc


def _whole_file_map(arr: np.ndarray) -> bool:
    """True for an np.memmap that maps a file from its start (not a slice of one)."""
    return (isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap)
            and getattr(arr, "filename", None) is not None
            and arr.mode in ("r", "r+", "w+")  # "c" (copy-on-write) may differ from the file
            and (arr.flags.c_contiguous or arr.flags.f_contiguous))


class ArraysSource:
    """Fields from in-memory objects, sharing dim 0: ``ArraysSource({"x": x, "y": y})``.

    Values: numpy arrays and CPU tensors (read in place, never copied; the caller must not
    resize them), h5py datasets (reopened by path), whole-file ``np.memmap`` objects (mapped
    again in each process), and Sources with exactly one field (renamed to the key).

    Pickling copies in-RAM arrays (a fork does not); file-backed fields pickle as paths.
    """

    def __init__(self, arrays: Mapping[str, Any]) -> None:
        if not isinstance(arrays, Mapping) or not arrays:
            raise ArgumentError(
                f"ArraysSource needs a non-empty mapping name -> array, got {describe(arrays)}")
        self._ram: Dict[str, np.ndarray] = {}
        self._parts: List[Tuple[Any, Dict[str, str]]] = []  # (source, {our name: its name})
        specs: Dict[str, FieldSpec] = {}
        lengths: Dict[str, int] = {}
        h5_groups: Dict[str, Dict[str, h5py.Dataset]] = {}
        flat: Dict[str, FlatFile] = {}
        for name, value in arrays.items():
            name = str(name)
            if isinstance(value, h5py.Dataset):
                h5_groups.setdefault(os.fspath(value.file.filename), {})[name] = value
                spec = FieldSpec(native_dtype(value.dtype), tuple(value.shape[1:]))
                length = int(value.shape[0]) if value.ndim else -1
            elif isinstance(value, Source):
                spec, length = self._add_source(name, value)
            else:
                arr = self._as_array(name, value)
                if _whole_file_map(arr):
                    flat[name] = FlatFile(os.fspath(arr.filename), int(arr.offset), arr.dtype,
                                          tuple(arr.shape),
                                          not arr.flags.c_contiguous, "raw")
                else:
                    self._ram[name] = arr
                spec, length = FieldSpec(native_dtype(arr.dtype), tuple(arr.shape[1:])), len(arr)
            if length < 0:
                raise SourceError(f"array {name!r} is a scalar; a field needs a sample axis")
            specs[name], lengths[name] = spec, length
        self._length = check_lengths(lengths, "ArraysSource")
        if flat:
            self._parts.append((NpySource.from_files(flat), {n: n for n in flat}))
        for datasets in h5_groups.values():
            self._parts.append((Hdf5Source.from_datasets(datasets), {n: n for n in datasets}))
        self._fields = specs

    def _add_source(self, name: str, source: Any) -> Tuple[FieldSpec, int]:
        inner = list(source.fields)
        if len(inner) != 1:
            raise ArgumentError(
                f"source given as array {name!r} has fields {inner}; a Source used as one array "
                f"needs exactly one field (pass it alone to ArrayDataset to use all its fields)")
        self._parts.append((source, {name: inner[0]}))
        return source.fields[inner[0]], len(source)

    @staticmethod
    def _as_array(name: str, value: Any) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            arr = tensor_to_numpy(name, value)
        elif isinstance(value, np.ndarray):
            arr = value
        else:
            raise ArgumentTypeError(
                f"array {name!r} is a {type(value).__name__} ({describe(value)}); expected "
                f"{ACCEPTED}; wrap lists with np.asarray(...)")
        if arr.ndim == 0:
            raise SourceError(f"array {name!r} is 0-d; a field needs a sample axis")
        if arr.dtype.hasobject:
            raise SourceError(
                f"array {name!r} has dtype {arr.dtype}; fields need fixed-size numeric data")
        return arr

    @property
    def fields(self) -> Mapping[str, FieldSpec]:
        """Field name -> FieldSpec, in the order given."""
        return self._fields

    @property
    def arrays(self) -> Mapping[str, np.ndarray]:
        """Field name -> in-RAM array, when every field is in RAM; else empty."""
        return dict(self._ram) if len(self._ram) == len(self._fields) else {}

    @property
    def storage(self) -> Mapping[str, StorageInfo]:
        """Field name -> StorageInfo, in field order."""
        found: Dict[str, StorageInfo] = {}
        for name, arr in self._ram.items():
            layout = "contiguous" if arr.flags.c_contiguous else "strided"
            found[name] = StorageInfo("ram", layout, "ram")
        for source, names in self._parts:
            inner = getattr(source, "storage", {})
            for ours, theirs in names.items():
                if theirs in inner:
                    found[ours] = inner[theirs]
        return {name: found[name] for name in self._fields if name in found}

    def __len__(self) -> int:
        return self._length

    @property
    def chunk_length(self) -> int:
        """The largest block of the file-backed parts with a natural one, else ~4 MiB of rows."""
        natural = [int(s.chunk_length) for s, _ in self._parts if not isinstance(s, NpySource)]
        return max(natural) if natural else rows_per_block(self._fields)

    def read_into(self, indices: np.ndarray, out: Dict[str, np.ndarray]) -> None:
        """Gather ``indices`` into ``out`` (see NOTE(read-contract) in base.py)."""
        plan = RowPlan(indices, self._length)
        check_out(self._fields, len(plan.indices), out)
        for name, arr in self._ram.items():
            plan.gather(arr, out[name])
        for source, names in self._parts:
            source.read_into(plan.indices, {theirs: out[ours] for ours, theirs in names.items()})

    def close(self) -> None:
        """Close the file-backed parts (in-RAM arrays stay referenced)."""
        for source, _ in self._parts:
            source.close()

    def __repr__(self) -> str:
        listing = ", ".join(f"{n}: {s.dtype}{list(s.shape)}" for n, s in self._fields.items())
        return f"ArraysSource({len(self)} samples; {listing})"
