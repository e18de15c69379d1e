"""``ArrayDataset`` (a torch map-style Dataset over a Source) and ``open_dataset``.

An ArrayDataset is what the loader's fast path reads in batches: it owns a Source and says
whether samples are dicts (named fields) or tuples (positional, like ``TensorDataset``).  Used
by torch's own DataLoader it still reads batches in one call, through ``__getitems__``.
"""
from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.utils.data

from gpuloader.checks import index_vector, torch_dtype
from gpuloader.errors import (ArgumentError, ArgumentTypeError, FieldNotFoundError,
                              SampleIndexError, SourceError, SourceNotFoundError, describe)
from gpuloader.sources.arrays import ArraysSource
from gpuloader.sources.base import FieldSpec, Source, check_field_names
from gpuloader.sources.binidx import is_binidx
from gpuloader.sources.discover import open_source
from gpuloader.sources.ragged import RaggedSource, SpanColumn, check_offsets, ragged_names

Sample = Union[Tuple[torch.Tensor, ...], Dict[str, torch.Tensor]]



class Ragged:
    """A variable-length field held in RAM: ``Ragged(values, offsets)``.

    Sample ``i`` is ``values[offsets[i]:offsets[i + 1]]``.  ``values``: a numpy array or CPU
    tensor, tokens first (any per-token shape after).  ``offsets``: integers, ``n + 1``
    entries, ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == len(values)``; anything
    else is a ValueError naming "offsets" and the first bad index.  Pass it to ArrayDataset
    like any array: ``ArrayDataset(tokens=Ragged(values, offsets), y=labels)``.
    """

    def __init__(self, values: Any, offsets: Any) -> None:
        arrays = ArraysSource({"values": values})
        if isinstance(offsets, torch.Tensor):
            offsets = offsets.detach().cpu().numpy()
        self.offsets = check_offsets(offsets, len(arrays), "Ragged")
        self.column = SpanColumn(arrays, self.offsets[:-1], np.diff(self.offsets), kind="ram")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __repr__(self) -> str:
        return f"Ragged({len(self)} samples, {int(self.offsets[-1])} values)"


def _torch_dtype(name: str, spec: FieldSpec) -> torch.dtype:
    """The torch dtype of a field; SourceError when torch has none."""
    try:
        return torch_dtype(np.dtype(spec.dtype))
    except (TypeError, ValueError) as exc:
        raise SourceError(
            f"field {name!r} has dtype {np.dtype(spec.dtype)}, which torch cannot hold; fields "
            f"need bool, (u)int8/16/32/64, float16/32/64 or complex64/128 data") from exc


class ArrayDataset(torch.utils.data.Dataset):
    """A map-style Dataset over arrays that share dimension 0.

    ``ArrayDataset(x, y)`` gives tuple samples (fields "0", "1", ...) like ``TensorDataset``;
    ``ArrayDataset(x=x, y=y)`` gives dict samples.  Values may be numpy arrays, CPU tensors,
    h5py datasets or Sources with one field, mixed freely; a single Source with several fields
    may be passed alone (positional: tuple samples in its field order).

    Samples and batches are fresh tensors the caller owns (a batch's samples from
    ``__getitems__`` are views of one batch tensor).  Pickles cheaply: file-backed fields
    travel as paths; in-RAM arrays are copied by pickle (not by fork).
    """

    def __init__(self, *arrays: Any, **named_arrays: Any) -> None:
        if arrays and named_arrays:
            raise ArgumentError(
                f"ArrayDataset takes arrays either positionally (tuple samples) or by name "
                f"(dict samples), not both; got {len(arrays)} positional and named "
                f"{sorted(named_arrays)}")
        if not arrays and not named_arrays:
            raise ArgumentError(
                "ArrayDataset needs at least one array: ArrayDataset(x, y) or "
                "ArrayDataset(x=x, y=y)")
        named = bool(named_arrays)
        values = named_arrays if named else {str(i): a for i, a in enumerate(arrays)}
        columns = {str(k): v.column for k, v in values.items() if isinstance(v, Ragged)}
        if columns:
            rest = {str(k): v for k, v in values.items() if not isinstance(v, Ragged)}
            fixed = ArraysSource(rest) if rest else None
            self._setup(RaggedSource(columns, fixed, [str(k) for k in values]), named=named)
            return
        only = next(iter(values.values()))
        if len(values) == 1 and isinstance(only, Source) and len(only.fields) > 1:
            if named:
                raise ArgumentError(
                    f"a Source with fields {list(only.fields)} cannot be one named array; pass "
                    f"it positionally or use ArrayDataset.from_source(source)")
            self._setup(only, named=False)
            return
        self._setup(ArraysSource(values), named=named)

    @classmethod
    def from_source(cls, source: Source, *, named: bool = True) -> "ArrayDataset":
        """A dataset over ``source``'s fields: dict samples if ``named``, else tuples."""
        if not isinstance(source, Source):
            raise ArgumentTypeError(
                f"from_source needs a Source (fields, __len__, chunk_length, read_into, close), "
                f"got {describe(source)}")
        self = cls.__new__(cls)
        self._setup(source, named=bool(named))
        return self

    def _setup(self, source: Source, *, named: bool) -> None:
        self._source = source
        self._named = named
        self._fields: Dict[str, FieldSpec] = dict(source.fields)
        self._torch_dtypes = {n: _torch_dtype(n, s) for n, s in self._fields.items()}
        self._ragged = ragged_names(self._fields)

    @property
    def ragged_fields(self) -> List[str]:
        """Names of the variable-length fields (empty for fixed-size datasets)."""
        return list(self._ragged)

    def lengths(self, name: Optional[str] = None) -> np.ndarray:
        """Per-sample lengths (int64, read-only) of ragged field ``name``.

        ``name`` may be left out when the dataset has exactly one ragged field.
        """
        if not self._ragged:
            raise ArgumentError(
                f"lengths: this dataset has no variable-length field (fields "
                f"{list(self._fields)} are all fixed-size)")
        if name is None:
            if len(self._ragged) > 1:
                raise ArgumentError(
                    f"lengths: the dataset has ragged fields {self._ragged}; name one, e.g. "
                    f"lengths({self._ragged[0]!r})")
            name = self._ragged[0]
        if name not in self._ragged:
            raise FieldNotFoundError(
                f"lengths: no ragged field {name!r}; ragged fields: {self._ragged}")
        return self._source.lengths(name)  # type: ignore[attr-defined]

    @property
    def source(self) -> Source:
        """The Source samples are read from."""
        return self._source

    @property
    def named(self) -> bool:
        """True: samples and batches are dicts; False: tuples (batches lists, as in torch)."""
        return self._named

    @property
    def fields(self) -> Mapping[str, FieldSpec]:
        """Field name -> FieldSpec (dtype, per-sample shape), in sample order."""
        return self._fields

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: Any) -> Sample:
        """Sample ``index`` (negative counts from the end), as tensors it alone owns."""
        if isinstance(index, (bool, np.bool_)) or not hasattr(index, "__index__"):
            raise ArgumentTypeError(
                f"ArrayDataset index must be an int, got {describe(index)}; for many samples "
                f"use read_batch(indices) or __getitems__(indices)")
        i = self._normalize_one(operator.index(index))
        idx = np.array([i], dtype=np.int64)
        tensors = self._empty(1, idx)
        self._source.read_into(idx, self._as_numpy(tensors))
        return self.pack({n: t if n in self._ragged else t[0] for n, t in tensors.items()})

    def __getitems__(self, indices: Sequence[int]) -> List[Sample]:
        """Samples ``indices`` as a list (torch's batched-fetch hook), read in one call.

        Each sample's tensors are views of one freshly read batch tensor per field.
        """
        idx = self._normalize(indices)
        batch = self._read(idx)
        names = list(batch)
        columns = [self._split(idx, n, batch[n]) if n in self._ragged else batch[n].unbind(0)
                   for n in names]
        if self._named:
            return [dict(zip(names, row)) for row in zip(*columns)]
        return [tuple(row) for row in zip(*columns)]

    def read_batch(self, indices: Any) -> Sample:
        """Rows ``indices`` (any order, duplicates allowed) of every field, in one read.

        Returns a dict or tuple of tensors with ``len(indices)`` rows, owned by the caller.
        Ragged fields come packed: their samples' values end to end (``lengths`` says where
        each ends); the DataLoader pads them or adds offsets.
        """
        return self.pack(self._read(indices))

    def _split(self, idx: np.ndarray, name: str, values: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        lengths = self._source.lengths(name)[idx]  # type: ignore[attr-defined]
        return torch.split(values, lengths.tolist())

    def pack(self, arrays: Mapping[str, torch.Tensor]) -> Sample:
        """Arrange a field -> tensor mapping as this dataset's samples are (dict or tuple)."""
        missing = [n for n in self._fields if n not in arrays]
        if missing:
            raise FieldNotFoundError(
                f"pack: no tensor for field {missing[0]!r}; expected fields {list(self._fields)}")
        if self._named:
            return {n: arrays[n] for n in self._fields}
        return tuple(arrays[n] for n in self._fields)

    def close(self) -> None:
        """Close the source's handles in this process (reading again reopens them)."""
        self._source.close()

    def __repr__(self) -> str:
        listing = ", ".join(
            f"{n}: {np.dtype(s.dtype)}[*]{list(s.shape) if s.shape else ''}" if s.ragged
            else f"{n}: {np.dtype(s.dtype)}{list(s.shape)}" for n, s in self._fields.items())
        kind = "named" if self._named else "positional"
        return f"ArrayDataset({len(self)} samples, {kind}; {listing})"

    # ---- internals ----------------------------------------------------------------------

    def _normalize_one(self, i: int) -> int:
        n = len(self)
        if i < -n or i >= n:
            raise SampleIndexError(
                f"index {i} is out of range for an ArrayDataset of {n} samples; valid indices "
                f"are {-n}..{n - 1}")
        return i + n if i < 0 else i

    def _normalize(self, indices: Any) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        idx, ok = index_vector(indices)
        if not ok:
            raise ArgumentTypeError(
                f"indices must be a 1-D sequence of ints, got {describe(indices)} (shape "
                f"{idx.shape}, dtype {idx.dtype}); for one sample use dataset[i]")
        n = len(self)
        if idx.size:
            bad = idx[(idx < -n) | (idx >= n)]
            if bad.size:
                raise SampleIndexError(
                    f"index {int(bad[0])} is out of range for an ArrayDataset of {n} samples; "
                    f"valid indices are {-n}..{n - 1}")
            if idx.min() < 0:
                idx = np.where(idx < 0, idx + n, idx)
        return idx

    def _empty(self, rows: int, idx: Optional[np.ndarray] = None) -> Dict[str, torch.Tensor]:
        """Uninitialised tensors for ``rows`` samples (ragged fields: those of ``idx``)."""
        def count(name: str) -> int:
            if name not in self._ragged:
                return rows
            return int(self._source.lengths(name)[idx].sum())  # type: ignore[attr-defined]
        return {n: torch.empty((count(n), *s.shape), dtype=self._torch_dtypes[n])
                for n, s in self._fields.items()}

    @staticmethod
    def _as_numpy(tensors: Mapping[str, torch.Tensor]) -> Dict[str, np.ndarray]:
        return {n: t.numpy() for n, t in tensors.items()}

    def _read(self, indices: Any) -> Dict[str, torch.Tensor]:
        idx = self._normalize(indices)
        tensors = self._empty(len(idx), idx)
        self._source.read_into(idx, self._as_numpy(tensors))
        return tensors


def open_dataset(path: Union[str, "os.PathLike[str]"], fields: Optional[Sequence[str]] = None, *,
                 dtype: Any = None, shape: Optional[Sequence[int]] = None) -> ArrayDataset:
    """An ArrayDataset with dict samples over the file or folder at ``path``.

    A folder: one field per ``*.npy`` file (named by stem, sorted), and one ragged field NAME
    per ``NAME.values.npy`` + ``NAME.offsets.npy`` pair.  A ``.npy`` file: one field named by
    its stem.  A Megatron ``.bin``/``.idx`` pair (its prefix or either file): one ragged field
    "tokens".  In HDF5, a group holding ``values`` and ``offsets`` is a ragged field named by
    the group, and so is a 1-D variable-length dataset (slower).  ``.h5``/``.hdf5``/``.hdf`` or any file with the HDF5 signature:
    the top-level datasets (``fields`` may name nested ones, ``"grp/z"``).  Anything else is
    raw binary and needs ``dtype`` (``shape`` defaults to ``(-1,)``; one -1 is inferred).
    ``fields`` selects and orders the fields.
    """
    p = Path(os.fspath(path))
    if not p.exists() and not is_binidx(p):
        raise SourceNotFoundError(
            f"open_dataset: path {str(p)!r} does not exist; expected a .npy file, a folder of "
            f".npy files, an HDF5 file (.h5/.hdf5/.hdf), a Megatron .bin/.idx prefix or a raw "
            f"binary file with dtype=")
    if fields is not None:
        fields = check_field_names(fields, "open_dataset")  # existence: the source checks
    return ArrayDataset.from_source(open_source(p, fields, dtype=dtype, shape=shape), named=True)
