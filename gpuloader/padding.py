"""Ragged batches laid out for the step: padded (NAME, NAME_lengths) or packed (NAME_offsets).

NOTE(ragged-batch): a batch of ``B`` samples of a dataset with ragged fields holds, per ragged
field NAME, either

- padded (default): ``NAME`` of shape ``(B, L, *token_shape)`` -- ``L`` the batch's longest
  sample rounded up to ``pad_to_multiple_of`` -- filled with ``pad_value`` after each sample,
  and ``NAME_lengths`` int64 ``(B,)``; or
- packed: ``NAME`` of shape ``(T, *token_shape)``, all samples end to end, and
  ``NAME_offsets`` int64 ``(B + 1,)`` (cu_seqlens: sample ``k`` is ``NAME[offsets[k]:
  offsets[k + 1]]``),

and every fixed field as usual, ``(B, *shape)``.  The shapes follow from the lengths alone, so
the consumer computes them (:meth:`RaggedLayout.shapes`) while a reader fills preallocated flat
buffers (:meth:`RaggedLayout.fill`): slots are sized once for the token budget
(:meth:`RaggedLayout.capacity`) and each batch is a view of their first elements.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from gpuloader.sources.base import FieldSpec, Source, ThreadScratch

Shape = Tuple[int, ...]


class RaggedLayout:
    """How the batches of one dataset with ragged fields look (NOTE(ragged-batch)).

    ``fields``: the dataset's fields; ``lengths``: ragged field -> per-sample lengths (int64,
    indexed by storage index); ``packed``/``pad_value``/``multiple`` as the DataLoader options.
    """

    def __init__(self, fields: Mapping[str, FieldSpec], lengths: Mapping[str, np.ndarray], *,
                 packed: bool, pad_value: Any, multiple: int) -> None:
        self.fields = dict(fields)
        self.lengths = dict(lengths)
        self.ragged = [n for n, s in self.fields.items() if s.ragged]
        self.packed = bool(packed)
        self.pad_value = pad_value
        self.multiple = int(multiple)
        self.suffix = "_offsets" if self.packed else "_lengths"
        self._scratch = ThreadScratch()

    def keys(self) -> List[str]:
        """Batch keys in order: each ragged field followed by its lengths/offsets key."""
        keys: List[str] = []
        for name in self.fields:
            keys.append(name)
            if name in self.lengths:
                keys.append(name + self.suffix)
        return keys

    def dtypes(self) -> Dict[str, np.dtype]:
        """Batch key -> numpy dtype."""
        out: Dict[str, np.dtype] = {}
        for name, spec in self.fields.items():
            out[name] = np.dtype(spec.dtype)
            if name in self.lengths:
                out[name + self.suffix] = np.dtype(np.int64)
        return out

    def padded(self, longest: int) -> int:
        """``longest`` rounded up to ``multiple`` (0 stays 0)."""
        return -(-int(longest) // self.multiple) * self.multiple

    def shapes(self, indices: np.ndarray) -> Dict[str, Shape]:
        """Batch key -> shape of the batch of ``indices`` (NOTE(ragged-batch))."""
        b = len(indices)
        out: Dict[str, Shape] = {}
        for name, spec in self.fields.items():
            if name not in self.lengths:
                out[name] = (b, *spec.shape)
                continue
            lens = self.lengths[name][indices]
            if self.packed:
                out[name] = (int(lens.sum()), *spec.shape)
                out[name + "_offsets"] = (b + 1,)
            else:
                longest = int(lens.max()) if b else 0
                out[name] = (b, self.padded(longest), *spec.shape)
                out[name + "_lengths"] = (b,)
        return out

    def buffer_fields(self) -> Dict[str, FieldSpec]:
        """Batch key -> FieldSpec of one buffer row: a token for ragged fields (flat buffers),
        a sample for fixed ones, an int64 for lengths/offsets."""
        out: Dict[str, FieldSpec] = {}
        for name, spec in self.fields.items():
            out[name] = FieldSpec(spec.dtype, tuple(spec.shape))
            if name in self.lengths:
                out[name + self.suffix] = FieldSpec(np.dtype(np.int64), ())
        return out

    def capacity(self, max_tokens: int, max_rows: int) -> Dict[str, int]:
        """Buffer rows per batch key that hold any batch of at most ``max_tokens`` padded
        tokens (or one over-long sample) and at most ``max_rows`` samples."""
        out: Dict[str, int] = {}
        for name in self.fields:
            if name not in self.lengths:
                out[name] = max_rows
                continue
            lens = self.lengths[name]
            longest = self.padded(int(lens.max())) if len(lens) else 0
            out[name] = max(int(max_tokens), longest, 1)
            out[name + self.suffix] = max_rows + 1
        return out

    @staticmethod
    def rows(shapes: Mapping[str, Shape], fields: Mapping[str, FieldSpec]) -> Dict[str, int]:
        """Buffer rows each batch key of ``shapes`` uses (its elements over one row's)."""
        return {k: int(np.prod(s, dtype=np.int64)) // max(1, int(np.prod(fields[k].shape,
                                                                          dtype=np.int64)))
                for k, s in shapes.items()}

    @staticmethod
    def views(flat: Mapping[str, Any], shapes: Mapping[str, Shape],
              rows: Mapping[str, int]) -> Dict[str, Any]:
        """Views of the first ``rows`` rows of flat buffers (tensors or arrays) in ``shapes``."""
        return {k: flat[k][:rows[k]].reshape(shapes[k]) for k in shapes}

    def fill(self, source: Source, indices: np.ndarray, out: Dict[str, np.ndarray]) -> None:
        """Read the batch of ``indices`` into ``out`` (arrays of :meth:`shapes`), in one read.

        Padded fields are read end to end into a per-thread scratch buffer and scattered
        into their rows (one vectorised copy); packed fields are read in place.
        """
        reads: Dict[str, np.ndarray] = {}
        scatter: List[Tuple[str, np.ndarray]] = []
        for name, spec in self.fields.items():
            if name not in self.lengths:
                reads[name] = out[name]
                continue
            lens = self.lengths[name][indices]
            if self.packed:
                reads[name] = out[name]
                offsets = out[name + "_offsets"]
                offsets[0] = 0
                np.cumsum(lens, out=offsets[1:])
            else:
                total = int(lens.sum())
                reads[name] = self._scratch.get(name, (total, *spec.shape), np.dtype(spec.dtype))
                out[name + "_lengths"][...] = lens
                scatter.append((name, lens))
        source.read_into(indices, reads)
        for name, lens in scatter:
            dest = out[name]
            dest[...] = self.pad_value
            mask = np.arange(dest.shape[1]) < lens[:, None]
            dest[mask] = reads[name]


class LayoutSource:
    """A Source-shaped adapter whose ``read_into`` fills a ragged batch (RaggedLayout.fill),
    so reader threads and processes run it like any other read.  ``out`` holds the batch
    keys with the shapes of ``layout.shapes(indices)``."""

    def __init__(self, source: Source, layout: RaggedLayout) -> None:
        self.source = source
        self.layout = layout

    @property
    def fields(self) -> Mapping[str, FieldSpec]:
        return self.source.fields

    def __len__(self) -> int:
        return len(self.source)

    @property
    def chunk_length(self) -> int:
        return int(self.source.chunk_length)

    def read_into(self, indices: np.ndarray, out: Dict[str, np.ndarray]) -> None:
        self.layout.fill(self.source, indices, out)

    def close(self) -> None:
        self.source.close()
