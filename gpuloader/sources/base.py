"""The Source protocol: where samples live and how a batch of rows is gathered.

A source exposes named fields that share dimension 0 (the sample axis).  ``read_into`` gathers
rows straight into arrays the caller owns — the loader's preallocated (pinned) host slots — so
a batch costs one pass over the bytes and no intermediate copies.

NOTE(read-contract): ``read_into(indices, out)`` writes sample ``indices[k]`` of field ``f`` to
``out[f][k]`` for every k.  ``indices`` is a 1-D int64 array of in-range, non-negative indices in
any order (duplicates allowed); sorted, duplicate-free indices are the fast path, and the loader
always passes those.  ``out[f]`` has shape ``(len(indices), *fields[f].shape)`` and dtype
``fields[f].dtype``, and may be larger along dim 0 only if the caller slices it first.  A source
must be picklable and must (re)open OS handles lazily in whichever process reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Protocol, Tuple, runtime_checkable

import numpy as np

#: Target bytes of one storage-friendly block for sources without a natural chunk (npy, RAM).
DEFAULT_BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class FieldSpec:
    """Type and per-sample shape of one field (the shape excludes the sample axis)."""

    dtype: np.dtype
    shape: Tuple[int, ...]

    @property
    def sample_nbytes(self) -> int:
        """Bytes one sample of this field occupies."""
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.shape, dtype=np.int64)))


@runtime_checkable
class Source(Protocol):
    """Protocol every storage backend implements (see NOTE(read-contract))."""

    @property
    def fields(self) -> Mapping[str, FieldSpec]:
        """Field name -> FieldSpec, in a stable order."""

    def __len__(self) -> int:
        """Number of samples (dimension 0 shared by all fields)."""

    @property
    def chunk_length(self) -> int:
        """Rows per storage block: HDF5 chunk length, or a few MB of rows for flat files."""

    def read_into(self, indices: np.ndarray, out: Dict[str, np.ndarray]) -> None:
        """Gather ``indices`` rows of every field into ``out`` (see NOTE(read-contract))."""

    def close(self) -> None:
        """Release file handles and maps held by this process; reading reopens them."""


def sample_nbytes(fields: Mapping[str, FieldSpec]) -> int:
    """Bytes one sample occupies over all ``fields``."""
    return sum(spec.sample_nbytes for spec in fields.values())


def rows_per_block(fields: Mapping[str, FieldSpec], block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows that fill about ``block_bytes``, at least 1."""
    return max(1, block_bytes // max(1, sample_nbytes(fields)))


def coalesce_runs(sorted_indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Split sorted indices into runs of consecutive values.

    Returns ``(starts, lengths)``: run ``r`` covers source rows
    ``starts[r] .. starts[r] + lengths[r] - 1`` and the matching output rows follow each other.
    """
    n = len(sorted_indices)
    if n == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    breaks = np.flatnonzero(np.diff(sorted_indices) != 1) + 1
    begins = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [n]))
    return sorted_indices[begins].astype(np.int64), (ends - begins).astype(np.int64)
