"""Epoch orders: which sample indices a rank visits in an epoch, and in what order.

Everything here is a pure function of its arguments, so every rank and every process computes the
same order without talking to the others.  Nothing is materialised per sample: an
:class:`EpochOrder` computes the indices of any span of positions on demand, so starting or
resuming an epoch costs microseconds and memory does not grow with the dataset (a billion samples
cost the same as a thousand).

NOTE(epoch-order): the global order of an epoch depends only on ``(order, n, seed, epoch,
block_length, window_blocks)`` and :data:`ORDER_VERSION`; its keys are drawn from
``np.random.SeedSequence([seed % 2**64, epoch % 2**64, ORDER_VERSION])``.  Rank ``r`` of
``world_size`` then takes the contiguous slice ``[r * per, (r + 1) * per)`` of that order, where
``per = shard_size(n, world_size, drop_last)``.  With ``drop_last`` the tail of the order is cut
so the ranks are disjoint; without it the order is padded cyclically from its start (like
``torch.utils.data.DistributedSampler``), so all ranks together cover every index and at most
``world_size - 1`` indices repeat.  Slices are contiguous rather than strided so the storage
locality of the "block" order survives.

Orders:

=============  ==========================================================================
sequential     ``0, 1, ..., n - 1``
shuffle        a keyed pseudo-random permutation of ``[0, n)`` (:func:`keyed_permutation`)
block          split ``[0, n)`` into blocks of ``block_length`` consecutive rows, shuffle the
               block order (the one array kept: ``n / block_length`` entries), then shuffle
               the samples inside each window of ``window_blocks`` consecutive (already
               shuffled) blocks with a keyed permutation per window.  ``block_length``
               consecutive positions then span at most two windows: at most
               ``2 * window_blocks`` storage blocks (one more next to the short last block).
=============  ==========================================================================

NOTE(keyed-permutation): an alternating Feistel network over ``a + b`` bits (the smallest
``2**(a+b) >= size``, at least 4, so under ``2 * size`` values) is a bijection of
``[0, 2**(a+b))`` for any round function; re-applying it to values ``>= size`` until they fall
below ("cycle walking") restricts it to a bijection of ``[0, size)``, taking under two
applications on average.  The round function is the splitmix64 finaliser of one part mixed with
a round key and a per-window tweak.  Halves under 4 bits get 12 rounds, others 6 (measured: 6
rounds over 2-bit halves leave positions visibly non-uniform).  tests/test_order.py checks
permutation, determinism and uniformity (chi-square over the position of each element and over
adjacent pairs).
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from gpuloader.checks import ORDERS, check_order
from gpuloader.checks import as_int as _as_int
from gpuloader.checks import int_at_least as _at_least
from gpuloader.errors import ArgumentError, ArgumentTypeError, describe

__all__ = ["ORDERS", "ORDER_VERSION", "EpochOrder", "check_order", "shard_size", "epoch_order",
           "keyed_permutation", "resolve_seed"]


_SEED_MODULUS = 1 << 64


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


#: Part of every order's key: bumped whenever an order changes, so a checkpoint's (seed, epoch)
#: cannot silently resume into another order (loaders refuse older state versions).
ORDER_VERSION = 2
_ROUNDS = 12  # for halves under _SMALL_HALF bits; half as many above
_SMALL_HALF = np.uint64(4)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
#: Positions computed at once and kept by an EpochOrder (8 bytes each): amortises numpy's
#: per-call cost over several batches while staying O(1) in the dataset size.
_MEMO_POSITIONS = 1 << 16


def _keys(seed: int, epoch: int, count: int) -> np.ndarray:
    """``count`` uint64 keys of the epoch (NOTE(epoch-order))."""
    sequence = np.random.SeedSequence([seed % _SEED_MODULUS, epoch % _SEED_MODULUS,
                                       ORDER_VERSION])
    return sequence.generate_state(count, np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array (a good 64-bit hash)."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _split_bits(size: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Bits ``(a, b)`` of the two Feistel halves for domains of ``size`` (uint64, >= 1):
    ``a + b = max(2, ceil(log2(size)))`` and ``a = floor((a + b) / 2)``, so ``2**(a+b) < 2 *
    size`` (or 4) and cycle walking takes under two applications on average."""
    bits = np.ceil(np.log2(np.maximum(size, 4).astype(np.float64))).astype(np.uint64)
    # float rounding near powers of two: make sure 2**bits >= size
    bits = bits + (np.left_shift(np.uint64(1), bits) < size).astype(np.uint64)
    low = bits >> np.uint64(1)
    return low, bits - low


def keyed_permutation(x: np.ndarray, size: np.ndarray, keys: np.ndarray,
                      tweak: np.ndarray) -> np.ndarray:
    """``pi(x)`` for the keyed bijection ``pi`` of ``[0, size)`` (NOTE(keyed-permutation)).

    ``x`` is a uint64 array; ``size`` and ``tweak`` (a window id) are uint64 scalars or arrays
    like ``x``: each element may have its own domain.  ``keys`` holds :data:`_ROUNDS` round
    keys.  Requires ``0 <= x < size``; returns a new uint64 array.
    """
    x = np.asarray(x, dtype=np.uint64)
    size = np.asarray(size, dtype=np.uint64)
    bits = _split_bits(size)
    tweak = _mix(np.array(tweak, dtype=np.uint64, ndmin=1))
    if tweak.shape != x.shape:  # one tweak for every element: keep it a scalar
        tweak = tweak[0]
    small = bits[0] < _SMALL_HALF
    if small.ndim == 0 or small.all() or not small.any():
        return _walk(x, size, bits, keys[:_rounds(bool(small.any()))], tweak)
    # Mixed domains (a short window among long ones): each group with its own round count.
    out = np.empty_like(x)
    for is_small in (True, False):
        where = np.flatnonzero(small == is_small)
        out[where] = _walk(x[where], size[where], (bits[0][where], bits[1][where]),
                           keys[:_rounds(is_small)], tweak if tweak.ndim == 0 else tweak[where])
    return out


def _rounds(small: bool) -> int:
    """Rounds for a domain (NOTE(keyed-permutation))."""
    return _ROUNDS if small else _ROUNDS // 2


def _walk(x: np.ndarray, size: np.ndarray, bits: Tuple[np.ndarray, np.ndarray],
          keys: np.ndarray, tweak: np.ndarray) -> np.ndarray:
    """The Feistel pass plus cycle walking (NOTE(keyed-permutation))."""
    out = _feistel(x, bits, keys, tweak)
    todo = np.flatnonzero(out >= size)
    while len(todo):  # apply again until inside [0, size)
        if size.ndim == 0:
            value = _feistel(out[todo], bits, keys, tweak)
            out[todo] = value
            todo = todo[value >= size]
            continue
        value = _feistel(out[todo], (bits[0][todo], bits[1][todo]), keys,
                         tweak if tweak.ndim == 0 else tweak[todo])
        out[todo] = value
        todo = todo[value >= size[todo]]
    return out


def _feistel(value: np.ndarray, bits: Tuple[np.ndarray, np.ndarray], keys: np.ndarray,
             tweak: np.ndarray) -> np.ndarray:
    """One pass of an alternating Feistel network (a bijection of ``[0, 2**(a+b))``): the
    value is ``a`` high bits and ``b`` low bits; each round keeps one part and adds a keyed
    hash of it to the other, and the two swap roles.  An even number of rounds.  ``bits`` and
    ``tweak`` are arrays like ``value`` or scalars.  Returns a new array."""
    a, b = bits
    one = np.uint64(1)
    masks = ((one << a) - one, (one << b) - one)
    left = value >> b  # a bits
    right = value & masks[1]  # b bits
    for r, key in enumerate(keys):
        f = right ^ tweak
        f += key
        _mix(f)
        np.bitwise_and(f, masks[r % 2], out=f)  # as wide as `left`
        f ^= left
        left, right = right, f
    left <<= b
    left |= right
    return left


def _sizes(n: int, block_length: int) -> Tuple[int, int]:
    """(number of blocks, rows of the last block)."""
    blocks = -(-n // block_length)
    return blocks, n - (blocks - 1) * block_length


class EpochOrder:
    """One rank's order of one epoch, computed on demand (see NOTE(epoch-order)).

    ``len(order)`` is ``shard_size(n, world_size, drop_last)``; ``order[a:b]`` (or
    :meth:`take`) returns the sample indices at positions ``a .. b - 1`` as a new int64 array.
    Memory: the "block" order keeps its block permutation (``n / block_length`` int64), every
    order a memo of at most :data:`_MEMO_POSITIONS` positions; nothing else grows with ``n``.
    """

    def __init__(self, order: str, n: int, *, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, block_length: int = 1, drop_last: bool = False,
                 window_blocks: int = 4) -> None:
        self.kind = check_order(order)
        self.n = _at_least("n", n, 0)
        seed_value = _as_int("seed", seed)
        epoch_value = _at_least("epoch", epoch, 0)
        self.rank, self.world_size = _check_rank(rank, world_size)
        self.block_length = _at_least("block_length", block_length, 1)
        self.window_blocks = _at_least("window_blocks", window_blocks, 1)
        self.per = shard_size(self.n, self.world_size, bool(drop_last))
        if self.kind == "block" and self.block_length == 1:
            self.kind = "shuffle"  # blocks of one row: a uniform permutation of the rows
        if self.n <= 1:
            self.kind = "sequential"
        keys = _keys(seed_value, epoch_value, _ROUNDS + 1)
        self._round_keys = keys[:_ROUNDS]
        self._block_perm: Optional[np.ndarray] = None
        self._short_slot = -1  # where the short last block sits in the block order
        if self.kind == "block":
            blocks, last = _sizes(self.n, self.block_length)
            rng = np.random.Generator(np.random.PCG64(int(keys[_ROUNDS])))
            self._block_perm = rng.permutation(blocks).astype(np.int64, copy=False)
            if last != self.block_length:
                self._short_slot = int(np.flatnonzero(self._block_perm == blocks - 1)[0])
        self._memo: Tuple[int, np.ndarray] = (0, np.empty(0, dtype=np.int64))

    def __len__(self) -> int:
        return self.per

    def __getitem__(self, span: slice) -> np.ndarray:
        if not isinstance(span, slice) or span.step not in (None, 1):
            raise ArgumentTypeError(f"EpochOrder supports order[a:b] only, got {span!r}")
        start, stop, _ = span.indices(self.per)
        return self.take(start, max(start, stop))

    def take(self, start: int, stop: int) -> np.ndarray:
        """Sample indices at positions ``start .. stop - 1`` (0 <= start <= stop <= len)."""
        first, memo = self._memo
        if first <= start and stop <= first + len(memo):
            return memo[start - first:stop - first].copy()
        end = min(self.per, max(stop, start + _MEMO_POSITIONS))
        values = self._compute(start, end)
        if end - start <= _MEMO_POSITIONS:
            self._memo = (start, values)  # one tuple store: safe for concurrent readers
        return values[:stop - start].copy()

    def chunks(self, size: int = _MEMO_POSITIONS) -> Iterator[np.ndarray]:
        """The whole order in consecutive pieces of at most ``size`` indices."""
        for start in range(0, self.per, size):
            yield self.take(start, min(self.per, start + size))

    def window_of(self, position: int) -> Optional[int]:
        """The readahead window holding ``position`` (windows are numbered in reading order);
        None for "shuffle", whose next rows are spread over the whole dataset."""
        if self.kind == "shuffle" or self.n == 0 or not 0 <= position < self.per:
            return None
        g = self._global(np.array([position], dtype=np.int64))
        if self.kind == "sequential":
            return int(g[0]) // (self.window_blocks * self.block_length)
        return int(self._window_of(g)[0][0])

    def window_rows(self, window: int) -> List[Tuple[int, int]]:
        """Row ranges ``(first_row, rows)`` that window ``window`` reads (empty past the end)."""
        L, wb = self.block_length, self.window_blocks
        if self.kind == "sequential":
            lo = window * wb * L
            return [(lo, min(wb * L, self.n - lo))] if 0 <= lo < self.n else []
        if self._block_perm is None:
            return []
        blocks, last = _sizes(self.n, L)
        slots = self._block_perm[max(0, window) * wb:(window + 1) * wb].tolist()
        return [(b * L, last if b == blocks - 1 else L) for b in slots]

    # ------------------------------------------------------------------ computation
    def _global(self, positions: np.ndarray) -> np.ndarray:
        """Shard positions -> positions of the global order (padding wraps to its start)."""
        g = positions + self.rank * self.per
        if self.rank * self.per + self.per > self.n and self.n:
            g %= self.n
        return g

    def _compute(self, start: int, stop: int) -> np.ndarray:
        g = self._global(np.arange(start, stop, dtype=np.int64))
        if self.kind == "sequential":
            return g
        if self.kind == "shuffle":
            out = keyed_permutation(g.astype(np.uint64), np.uint64(self.n), self._round_keys,
                                    np.uint64(0))
            return out.astype(np.int64)
        return self._block_indices(g)

    def _window_of(self, g: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(window id, position inside it, window size) of global positions ``g``."""
        L, wb = self.block_length, self.window_blocks
        size = wb * L
        deficit = 0 if self._short_slot < 0 else L - _sizes(self.n, L)[1]
        short_window = self._short_slot // wb if self._short_slot >= 0 else -1
        if deficit:
            # Windows after the short one start ``deficit`` positions earlier.
            later = g >= (short_window + 1) * size - deficit
            w = np.where(later, (g + deficit) // size, g // size)
            start = w * size - np.where(later, deficit, 0)
        else:
            w = g // size
            start = w * size
        blocks = len(self._block_perm) if self._block_perm is not None else 0
        rows = np.minimum((w + 1) * wb, blocks) * L - w * wb * L
        if deficit:
            rows = rows - np.where(w == short_window, deficit, 0)
        return w, g - start, rows

    def _block_indices(self, g: np.ndarray) -> np.ndarray:
        """See NOTE(epoch-order), "block"."""
        assert self._block_perm is not None
        L, wb = self.block_length, self.window_blocks
        w, local, rows = self._window_of(g)
        u = keyed_permutation(local.astype(np.uint64), rows.astype(np.uint64),
                              self._round_keys, (w + 1).astype(np.uint64)).astype(np.int64)
        j = u // L  # block slot inside the window
        if self._short_slot >= 0:
            # Inside the short block's window, slots after it start `deficit` rows earlier.
            short_local = self._short_slot - w * wb  # its slot in this window (else out of 0..wb)
            cut = short_local * L + _sizes(self.n, L)[1]
            after = (short_local >= 0) & (short_local < wb) & (u >= cut)
            shifted = u - cut
            j = np.where(after, short_local + 1 + shifted // L, j)
            offset = np.where(after, shifted % L, u - j * L)
        else:
            offset = u - j * L
        return self._block_perm[w * wb + j] * L + offset


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

    The whole of :class:`EpochOrder` at once (O(n) memory: for tests and baselines; loaders use
    the class).  ``seed`` is any int (taken modulo 2**64), ``epoch >= 0``.  The result has
    ``shard_size(n, world_size, drop_last)`` entries; with ``world_size == 1`` it is a
    permutation of ``range(n)``.
    """
    spans = EpochOrder(order, n, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                       block_length=block_length, drop_last=drop_last,
                       window_blocks=window_blocks)
    return spans.take(0, len(spans)) if len(spans) else np.empty(0, dtype=np.int64)


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
