"""What the baseline cases read through: plain Datasets for torch's DataLoader, index streams."""
from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping

import numpy as np
import torch

from gpuloader.bench.raw import RawField
from gpuloader.order import epoch_order


class PerSampleDataset(torch.utils.data.Dataset):
    """What users write by hand: ``__getitem__`` reads one row of every field (no batched hook).

    Samples are dicts of tensors (copies), so torch's ``default_collate`` stacks them.
    """

    def __init__(self, raw: Mapping[str, RawField]) -> None:
        self.raw = dict(raw)
        first = next(iter(self.raw.values())).open()
        self._len = int(first.shape[0])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.array(f.open()[index])) for name, f in self.raw.items()}


class HideBatchedHook(torch.utils.data.Dataset):
    """A map-style Dataset seen through ``__getitem__`` only (torch then fetches per sample)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


class StreamSampler(torch.utils.data.Sampler):
    """Endless index stream: epoch orders 0, 1, ... each cut to whole batches."""

    def __init__(self, order: str, n: int, seed: int, batch_size: int, block_length: int) -> None:
        self.order, self.n, self.seed = order, n, seed
        self.batch_size, self.block_length = batch_size, block_length

    def __iter__(self) -> Iterator[int]:
        for batch in batch_stream(self.order, self.n, self.seed, self.batch_size,
                                  self.block_length):
            yield from batch.tolist()


def batch_stream(order: str, n: int, seed: int, batch_size: int,
                 block_length: int) -> Iterator[np.ndarray]:
    """Batches of indices of epoch orders 0, 1, ... (see NOTE(bench-fairness)); endless."""
    epoch = 0
    whole = (n // batch_size) * batch_size
    while True:
        indices = epoch_order(order, n, seed=seed, epoch=epoch, block_length=block_length)
        for start in range(0, whole, batch_size):
            yield indices[start:start + batch_size]
        epoch += 1
