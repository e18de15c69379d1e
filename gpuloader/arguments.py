"""The DataLoader's argument checks that go beyond one value: torch-compatible batch sizes and
the combinations of gpuloader's options with torch's (each refusal names both sides and the
fix)."""
from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch.utils.data as tud

from gpuloader.checks import check_order
from gpuloader.ecosystem import LIGHTNING_HINT
from gpuloader.errors import ArgumentError, ArgumentTypeError, describe

BatchSize = Union[int, str, None]


class _BatchSizeTypeError(ArgumentTypeError, ValueError):
    """A batch_size of the wrong type: a TypeError as gpuloader's errors are, and the
    ValueError torch's DataLoader raises for it, so ``except ValueError`` code keeps working."""


def check_batch_size(batch_size: object) -> BatchSize:
    """``batch_size`` as torch takes it (a positive int or None), or "auto"."""
    if batch_size is None or (isinstance(batch_size, str) and batch_size == "auto"):
        return batch_size  # type: ignore[return-value]
    # Each message starts with torch's own (BatchSampler's), which drop-in callers may match.
    torch_message = ("batch_size should be a positive integer value, but got "
                     f"batch_size={batch_size}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise _BatchSizeTypeError(f'{torch_message}; batch_size must be a positive int, None, '
                                  f'or "auto"; got {describe(batch_size)}')
    if batch_size <= 0:
        raise ArgumentError(f'{torch_message}; batch_size must be a positive int, None, or '
                            f'"auto" (use batch_size=None to disable batching)')
    return int(batch_size)


def check_combination(dataset: Any, auto: bool, shuffle: Optional[bool], sampler: Any,
                       batch_sampler: Any, order: Optional[str], distributed: bool) -> None:
    """Refuse gpuloader options that contradict each other or torch's."""
    if auto and batch_sampler is not None:
        raise ArgumentError('batch_size="auto" is mutually exclusive with batch_sampler; '
                            "pass one or the other")
    if auto and isinstance(dataset, tud.IterableDataset):
        raise ArgumentError(f'batch_size="auto" needs a map-style dataset (it sizes batches '
                            f"from a sample's bytes and the dataset's length); got the "
                            f"IterableDataset {type(dataset).__name__}: pass an int batch_size")
    if order is not None:
        check_order(order)
        if shuffle and order == "sequential":
            raise ArgumentError('order="sequential" contradicts shuffle=True; pass '
                                'order="shuffle" or "block", or shuffle=False')
        if sampler is not None or batch_sampler is not None:
            raise ArgumentError(f"order={order!r} is mutually exclusive with sampler/"
                                "batch_sampler, which already define the order")
    if distributed and (sampler is not None or batch_sampler is not None):
        raise ArgumentError("distributed=True shards gpuloader's own order and is mutually "
                            "exclusive with sampler/batch_sampler; pass a DistributedSampler "
                            f"as sampler with distributed=False instead ({LIGHTNING_HINT})")


def check_state_layout(state: object, version: int) -> None:
    """Raise unless ``state`` is a dict of this format ``version`` with the parts every state
    has (DataLoader's docstring); each part's owner checks its contents."""
    if not isinstance(state, dict):
        raise ArgumentError(f"state must be a dict from gpuloader.DataLoader.state_dict() "
                            f"(version {version}), got {describe(state)}")
    saved = state.get("version")
    if saved != version:
        raise ArgumentError(
            f"state has version {describe(saved)}, but this gpuloader reads state version "
            f"{version} only (version 1 orders differ, so resuming would deliver other "
            "samples; version 2 was not nested by owner); start the epoch over with "
            "set_epoch() instead")
    missing = [k for k in ("cursor", "order", "sizing") if k not in state]
    if missing:
        raise ArgumentError(f"state is missing {', '.join(map(repr, missing))}; pass the "
                            "dict gpuloader.DataLoader.state_dict() returned")
    for key in ("cursor", "order"):
        if not isinstance(state[key], dict):
            raise ArgumentTypeError(f"state[{key!r}] must be a dict, got "
                                    f"{describe(state[key])}")
