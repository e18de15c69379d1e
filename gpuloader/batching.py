"""Spans of an epoch order -> batches: token budgets and length buckets (pure functions).

Fixed-size batches are consecutive spans of the order cut at the live batch size (see
NOTE(cursor) in fastpath.py).  Datasets with a ragged field may instead be batched by a token
budget; everything here is a pure function of its arguments.

NOTE(token-budget): a batch of ``B`` samples whose longest has ``L`` tokens costs
``B * padded(L)`` tokens, ``padded(L)`` being ``L`` rounded up to ``pad_to_multiple_of`` (at
least 1).  A batch is the longest prefix of the remaining span whose cost is at most
``max_tokens`` and, when given, holds at most ``max_samples`` samples; a sample that alone
exceeds the budget is a batch of its own (never dropped, never truncated).

NOTE(length-buckets): a random order is grouped by length without losing its randomness.  The
epoch order is cut into windows of ``bucket_window`` positions; each window is sorted by length
(stable), cut into batches by the budget, and the window's batches are shuffled.  The result
is a new order (a permutation of the old one) plus the batch ends, a pure function of (seed,
epoch, lengths, budget), so resuming recomputes it and skips the consumed prefix.  Distributed
runs plan the batches of the whole order once and give rank ``r`` the contiguous slice
``[r * per, (r + 1) * per)`` of the batch list (``per`` batches each, like
NOTE(epoch-order)): every rank steps the same number of times.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

#: Windows hold about this many batches by default (see :func:`default_bucket_window`).
BATCHES_PER_WINDOW = 100
_FIRST_PROBE = 64


@dataclass(frozen=True)
class TokenBudget:
    """How a ragged batch is sized: ``max_tokens`` padded tokens, ``multiple`` rounding of the
    padded length, ``max_samples`` cap (None: no cap)."""

    max_tokens: int
    multiple: int = 1
    max_samples: Optional[int] = None

    def padded(self, length: int) -> int:
        """``length`` rounded up to ``multiple``, at least 1."""
        m = self.multiple
        return max(1, -(-int(length) // m) * m)

    def cost(self, lengths: np.ndarray) -> int:
        """Padded tokens of one batch holding samples of ``lengths``."""
        return len(lengths) * self.padded(int(lengths.max())) if len(lengths) else 0


def cut(lengths: np.ndarray, start: int, stop: int, budget: TokenBudget) -> int:
    """End of the batch that starts at ``start`` (NOTE(token-budget)), at most ``stop``.

    ``lengths`` are in order; the result is in ``(start, stop]``.  Work is proportional to the
    batch's size (a doubling probe), not to the budget.
    """
    limit = stop - start
    if budget.max_samples is not None:
        limit = min(limit, budget.max_samples)
    if limit <= 0:
        return start
    m = budget.multiple
    cap = min(limit, max(1, budget.max_tokens // budget.padded(int(lengths[start]))))
    probe = min(cap, _FIRST_PROBE)
    while True:
        running = np.maximum.accumulate(lengths[start:start + probe])
        padded = np.maximum(1, -(-running // m) * m)
        cost = padded * np.arange(1, probe + 1, dtype=np.int64)
        k = int(np.searchsorted(cost, budget.max_tokens, side="right"))
        if k < probe or probe == cap:
            return start + max(1, k)
        probe = min(cap, 2 * probe)


def boundaries(lengths: np.ndarray, budget: TokenBudget) -> np.ndarray:
    """Ends (exclusive positions) of the greedy batches over ``lengths`` in order (int64)."""
    ends = []
    pos, n = 0, len(lengths)
    while pos < n:
        pos = cut(lengths, pos, n, budget)
        ends.append(pos)
    return np.asarray(ends, dtype=np.int64)


def default_bucket_window(lengths: np.ndarray, budget: TokenBudget) -> int:
    """About :data:`BATCHES_PER_WINDOW` batches of the mean sample: the window in samples."""
    if len(lengths) == 0:
        return 1
    per_batch = max(1, budget.max_tokens // budget.padded(int(np.ceil(lengths.mean()))))
    if budget.max_samples is not None:
        per_batch = min(per_batch, budget.max_samples)
    return max(1, BATCHES_PER_WINDOW * per_batch)


def _rng(seed: int, epoch: int) -> np.random.Generator:
    # A stream of its own: (seed, epoch, 1) never collides with order.py's (seed, epoch).
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed % (1 << 64),
                                                                      epoch, 1])))


def _take_batches(ends: np.ndarray, chosen: np.ndarray) -> tuple:
    """Positions of batches ``chosen`` (indices into ``ends``) back to back, and their ends."""
    starts = np.concatenate(([0], ends[:-1])) if len(ends) else ends
    sizes = (ends - starts)[chosen]
    total = int(sizes.sum())
    out_starts = np.cumsum(sizes) - sizes
    positions = np.repeat(starts[chosen] - out_starts, sizes) + np.arange(total, dtype=np.int64)
    return positions, np.cumsum(sizes).astype(np.int64)


def bucket(order: np.ndarray, lengths: np.ndarray, budget: TokenBudget, *, window: int,
           seed: int, epoch: int) -> tuple:
    """NOTE(length-buckets): ``(new_order, ends)`` for ``order`` (sample indices) whose
    samples have ``lengths[order]`` tokens.  ``new_order`` is a permutation of ``order``."""
    n = len(order)
    if n == 0:
        return order.copy(), np.empty(0, dtype=np.int64)
    lens = lengths[order]
    win = np.arange(n, dtype=np.int64) // window
    perm = np.lexsort((lens, win))
    sorted_lens = lens[perm]
    ends = []
    batch_window = []
    for w0 in range(0, n, window):
        w1 = min(n, w0 + window)
        pos = w0
        while pos < w1:
            pos = cut(sorted_lens, pos, w1, budget)
            ends.append(pos)
            batch_window.append(w0 // window)
    ends_arr = np.asarray(ends, dtype=np.int64)
    shuffled = np.lexsort((_rng(seed, epoch).random(len(ends_arr)),
                           np.asarray(batch_window, dtype=np.int64)))
    positions, new_ends = _take_batches(ends_arr, shuffled)
    return order[perm[positions]], new_ends


def shard_batches(order: np.ndarray, ends: np.ndarray, *, rank: int, world_size: int,
                  drop_last: bool) -> tuple:
    """Rank ``rank``'s batches: the contiguous slice of ``per`` batches (NOTE(length-buckets)).

    ``per`` is ``len(ends) // world_size`` with ``drop_last`` (the tail batches are dropped),
    else ``ceil(len(ends) / world_size)`` and the batch list is padded by repeating batches
    from its start, as ``DistributedSampler`` pads samples.  Returns ``(order, ends)``.
    """
    nb = len(ends)
    if world_size == 1:
        return order, ends
    per = nb // world_size if drop_last else -(-nb // world_size)
    chosen = np.arange(rank * per, (rank + 1) * per, dtype=np.int64) % max(1, nb)
    if nb == 0:
        return order[:0], ends[:0]
    positions, new_ends = _take_batches(ends, chosen)
    return order[positions], new_ends


def padding_efficiency(lengths: np.ndarray, ends: np.ndarray, multiple: int = 1) -> float:
    """Real tokens / padded tokens over the batches ending at ``ends`` (lengths in order)."""
    if len(ends) == 0:
        return 1.0
    starts = np.concatenate(([0], ends[:-1]))
    longest = np.maximum.reduceat(lengths, starts) if len(lengths) else np.zeros(0, np.int64)
    padded = np.maximum(1, -(-longest // multiple) * multiple)
    real = float(lengths.sum())
    return real / float(((ends - starts) * padded).sum())


def length_summary(lengths: np.ndarray) -> dict:
    """count, total, mean, p50/p90/p99 and max of per-sample ``lengths``."""
    if len(lengths) == 0:
        return {"count": 0, "tokens": 0, "mean": 0.0, "p50": 0, "p90": 0, "p99": 0, "max": 0}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {"count": int(len(lengths)), "tokens": int(lengths.sum()),
            "mean": float(lengths.mean()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": int(lengths.max())}


def plan_efficiency(lengths: np.ndarray, budget: TokenBudget, *, seed: int = 0,
                    window: Optional[int] = None) -> dict:
    """Padding efficiency a token budget reaches over ``lengths``: bucketed random order
    (NOTE(length-buckets), epoch 0), storage order, and the batch count of each."""
    from gpuloader.order import epoch_order

    n = len(lengths)
    order = epoch_order("shuffle", n, seed=seed, epoch=0)
    window = window or default_bucket_window(lengths, budget)
    new, ends = bucket(order, lengths, budget, window=window, seed=seed, epoch=0)
    seq_ends = boundaries(lengths, budget)
    return {"max_tokens": budget.max_tokens, "pad_to_multiple_of": budget.multiple,
            "bucket_window": window,
            "shuffle": padding_efficiency(lengths[new], ends, budget.multiple),
            "shuffle_batches": int(len(ends)),
            "sequential": padding_efficiency(lengths, seq_ends, budget.multiple),
            "sequential_batches": int(len(seq_ends))}
