"""Recognising datasets the fast path can read in batches, and shaping their batches.

An ``ArrayView`` is what the fast path needs from a dataset: its Source, an optional map from
dataset positions to source rows (for ``Subset``), and how batches are structured so they equal
what torch's ``default_collate`` would build from the same samples (a dict for named fields, a
list for positional ones).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.utils.data as tud

from gpuloader.sources.base import FieldSpec, Source, sample_nbytes


@dataclass(frozen=True)
class ArrayView:
    """The fast path's handle on a dataset (lifetime: the loader's)."""

    source: Source
    index_map: Optional[np.ndarray]
    named: bool
    owner: Any  # an ArrayDataset the loader made itself (closed with it), else None

    @property
    def fields(self) -> Dict[str, FieldSpec]:
        return dict(self.source.fields)

    @property
    def sample_nbytes(self) -> int:
        """Bytes of one sample over all fields."""
        return sample_nbytes(self.source.fields)

    @property
    def block_length(self) -> int:
        """Rows per storage block, for the "block" order."""
        return max(1, int(getattr(self.source, "chunk_length", 1)))

    def structure(self, tensors: Dict[str, torch.Tensor]) -> Any:
        """A batch shaped like default_collate's output: dict if named, else a list."""
        if self.named:
            return dict(tensors)
        return list(tensors.values())

    def split(self, tensors: Dict[str, torch.Tensor]) -> List[Any]:
        """The batch as a list of samples (dicts or tuples), for a user's collate_fn."""
        names = list(tensors)
        rows = len(next(iter(tensors.values()))) if tensors else 0
        if self.named:
            return [{name: tensors[name][i] for name in names} for i in range(rows)]
        return [tuple(tensors[name][i] for name in names) for i in range(rows)]

    def close(self) -> None:
        close = getattr(self.owner, "close", None)
        if close is not None:
            close()


def _fetches_like(dataset: Any, base: type) -> bool:
    """True when torch would fetch ``dataset``'s samples with ``base``'s own methods: a subclass
    that overrides ``__getitem__`` or ``__getitems__`` (e.g. to transform samples) must go
    through the generic path, or its override would be skipped."""
    cls = type(dataset)
    return (cls.__getitem__ is base.__getitem__
            and getattr(cls, "__getitems__", None) is getattr(base, "__getitems__", None))


def _readable(tensor: torch.Tensor) -> bool:
    """True for tensors the fast path copies exactly: dense, on the CPU, with a numpy dtype and
    no autograd history to keep (torch's collate would stack them into a graph)."""
    if tensor.device.type != "cpu" or tensor.layout != torch.strided or tensor.requires_grad:
        return False
    try:
        torch.empty(0, dtype=tensor.dtype).numpy()
    except TypeError:  # bfloat16, quantized and other dtypes numpy has no match for
        return False
    return True


def array_view(dataset: Any) -> Optional[ArrayView]:
    """An ArrayView for ArrayDataset, CPU TensorDataset, and (nested) Subsets of them; else None.

    Only datasets whose batches the fast path reproduces exactly qualify (see ``_fetches_like``
    and ``_readable``); everything else takes the generic path, which is torch's own.
    """
    from gpuloader.dataset import ArrayDataset

    if isinstance(dataset, ArrayDataset):
        if not _fetches_like(dataset, ArrayDataset):
            return None
        # The caller owns its dataset (other loaders may share it): close() leaves it open.
        return ArrayView(dataset.source, None, dataset.named, None)
    if isinstance(dataset, tud.TensorDataset):
        if not dataset.tensors or not _fetches_like(dataset, tud.TensorDataset) or \
                not all(_readable(t) for t in dataset.tensors):
            return None
        wrapped = ArrayDataset(*dataset.tensors)
        return ArrayView(wrapped.source, None, False, wrapped)
    if isinstance(dataset, tud.Subset):
        if not _fetches_like(dataset, tud.Subset):
            return None
        inner = array_view(dataset.dataset)
        if inner is None:
            return None
        indices = np.asarray(list(dataset.indices), dtype=np.int64)
        n = len(dataset.dataset)
        if len(indices) and (indices.min() < -n or indices.max() >= n):
            return None  # let the generic path raise torch's own IndexError at fetch time
        indices = np.where(indices < 0, indices + n, indices)
        if inner.index_map is not None:
            indices = inner.index_map[indices]
        return ArrayView(inner.source, indices, inner.named, None)
    return None
