"""Epoch orders: which sample indices a rank visits in an epoch, and in what order.

Everything here is a pure function of its arguments, so every rank and every process computes the
same order without talking to the others, and resuming an epoch is O(1): recompute the order and
skip the consumed prefix.

NOTE(epoch-order): the global order of an epoch depends only on ``(order, n, seed, epoch,
block_length, window_blocks)``; it is drawn from ``np.random.Generator(PCG64(SeedSequence([seed,
epoch])))`` (``seed`` taken modulo 2**64).  Rank ``r`` of ``world_size`` then takes the contiguous
slice ``[r * per, (r + 1) * per)`` of that order, where ``per = shard_size(n, world_size,
drop_last)``.  With ``drop_last`` the tail of the order is cut so the ranks are disjoint; without
it the order is padded cyclically from its start (like ``torch.utils.data.DistributedSampler``),
so all ranks together cover every index and at most ``world_size - 1`` indices repeat.  Slices
are contiguous rather than strided so the storage locality of the "block" order survives.

Orders:

=============  ==========================================================================
sequential     ``0, 1, ..., n - 1``
shuffle        a uniform random permutation
block          split ``[0, n)`` into blocks of ``block_length`` consecutive rows, shuffle the
               block order, then shuffle the samples inside each window of ``window_blocks``
               consecutive (already shuffled) blocks.  ``block_length`` consecutive
               positions then span at most two windows: at most ``2 * window_blocks``
               storage blocks (one more next to the short last block).
=============  ==========================================================================
"""
from __future__ import annotations

import operator
from typing import Optional

import numpy as np
import torch

from gpuloader.errors import ArgumentError, ArgumentTypeError, describe

__all__ = ["ORDERS", "check_order", "shard_size", "epoch_order", "resolve_seed"]

#: Accepted values of ``order=``.
ORDERS: tuple[str, ...] = ("sequential", "shuffle", "block")

_SEED_MODULUS = 1 << 64


def _as_int(name: str, value: object) -> int:
    """``value`` as a Python int (numpy integers accepted, bool and float refused)."""
    if isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ArgumentTypeError(
            f"{name} must be an int, got {type(value).__name__} {describe(value)}"
        ) from None


def _at_least(name: str, value: object, low: int) -> int:
    number = _as_int(name, value)
    if number < low:
        raise ArgumentError(f"{name} must be an int >= {low}, got {number}")
    return number


def check_order(order: str) -> str:
    """Return ``order`` if it is one of :data:`ORDERS`; raise ArgumentError otherwise."""
    if not isinstance(order, str):
        raise ArgumentTypeError(
            f"order must be one of {', '.join(map(repr, ORDERS))}, "
            f"got {type(order).__name__} {describe(order)}"
        )
    if order not in ORDERS:
        raise ArgumentError(
            f"order must be one of {', '.join(map(repr, ORDERS))}, got {describe(order)}"
        )
    return order


def _check_rank(rank: object, world_size: object) -> tuple[int, int]:
    world = _at_least("world_size", world_size, 1)
    r = _as_int("rank", rank)
    if not 0 <= r < world:
        raise ArgumentError(
            f"rank must satisfy 0 <= rank < world_size={world}, got rank={r}"
        )
    return r, world


def shard_size(n: int, world_size: int, drop_last: bool) -> int:
    """Samples each rank gets per epoch, as ``torch.utils.data.DistributedSampler`` counts them.

    ``n // world_size`` with ``drop_last`` (the tail is dropped), ``ceil(n / world_size)``
    without (the order is padded by repeating its start).
    """
    total = _at_least("n", n, 0)
    world = _at_least("world_size", world_size, 1)
    if drop_last:
        return total // world
    return -(-total // world)


def _rng(seed: int, epoch: int) -> np.random.Generator:
    sequence = np.random.SeedSequence([seed % _SEED_MODULUS, epoch])
    return np.random.Generator(np.random.PCG64(sequence))


def _block_order(
    n: int, rng: np.random.Generator, block_length: int, window_blocks: int
) -> np.ndarray:
    """See NOTE(epoch-order), "block"."""
    n_blocks = -(-n // block_length)
    block_perm = rng.permutation(n_blocks).astype(np.int64, copy=False)
    if block_length == 1:
        # Blocks of one row: the block order is already a uniform permutation, and shuffling
        # inside windows would not change its distribution.
        return block_perm
    # Lay the blocks out as if n were a multiple of block_length, shuffle inside windows, then
    # drop the padding rows (>= n) of the short last block.  All windows but the last have
    # window_blocks * block_length positions, so one vectorised call shuffles them all.
    padded = block_perm[:, None] * block_length + np.arange(block_length, dtype=np.int64)
    padded = padded.reshape(-1)
    size = window_blocks * block_length
    regular = (len(padded) // size) * size
    if regular:
        head = padded[:regular].reshape(-1, size)
        rng.permuted(head, axis=1, out=head)
    if regular < len(padded):
        rng.shuffle(padded[regular:])
    if len(padded) == n:
        return padded
    return padded[padded < n]


def epoch_order(
    order: str,
    n: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    block_length: int = 1,
    drop_last: bool = False,
    window_blocks: int = 4,
) -> np.ndarray:
    """Indices rank ``rank`` visits in ``epoch``, in order (a new 1-D int64 array).

    See NOTE(epoch-order) for the orders and the sharding rule.  ``seed`` is any int (taken modulo
    2**64), ``epoch >= 0``.  The result has ``shard_size(n, world_size, drop_last)`` entries; with
    ``world_size == 1`` it is a permutation of ``range(n)``.
    """
    kind = check_order(order)
    total = _at_least("n", n, 0)
    seed_value = _as_int("seed", seed)
    epoch_value = _at_least("epoch", epoch, 0)
    r, world = _check_rank(rank, world_size)
    length = _at_least("block_length", block_length, 1)
    window = _at_least("window_blocks", window_blocks, 1)

    if kind == "sequential" or total <= 1:
        full = np.arange(total, dtype=np.int64)
    elif kind == "shuffle":
        full = _rng(seed_value, epoch_value).permutation(total).astype(np.int64, copy=False)
    else:
        full = _block_order(total, _rng(seed_value, epoch_value), length, window)

    if world == 1:
        return full
    per = shard_size(total, world, bool(drop_last))
    lo, hi = r * per, (r + 1) * per
    if hi <= total:
        return full[lo:hi].copy()
    # Padding: position p >= n holds full[p % n] (cyclic repeat from the start of the order).
    return np.take(full, np.arange(lo, hi, dtype=np.int64) % total)


def resolve_seed(seed: Optional[int], generator: Optional[torch.Generator]) -> int:
    """The base seed of a loader's orders.

    ``seed`` wins when given.  Otherwise one int64 is drawn from ``generator`` — or from torch's
    default generator when that is None, so ``torch.manual_seed`` makes runs reproducible — the
    same way ``torch.utils.data.RandomSampler`` draws its seed (a non-negative int64).
    """
    if seed is not None:
        return _as_int("seed", seed)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__} "
            f"{describe(generator)}"
        )
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
