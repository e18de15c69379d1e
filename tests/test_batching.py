"""Token budgets and length buckets: pure functions of their arguments."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuloader.batching import (TokenBudget, boundaries, bucket, cut, default_bucket_window,
                                padding_efficiency, shard_batches)
from gpuloader.order import epoch_order

budgets = st.builds(TokenBudget, st.integers(1, 200), st.integers(1, 8),
                    st.one_of(st.none(), st.integers(2, 9)))
length_lists = st.lists(st.integers(0, 120), min_size=0, max_size=80)


def spans(ends):
    starts = np.concatenate(([0], ends[:-1]))
    return list(zip(starts.tolist(), ends.tolist()))


def check_batches(lengths, ends, budget):
    """Every batch fits the budget (or is one over-long sample) and is maximal."""
    for a, b in spans(ends):
        batch = lengths[a:b]
        assert b > a
        if budget.max_samples is not None:
            assert b - a <= budget.max_samples
        assert budget.cost(batch) <= budget.max_tokens or b - a == 1
    if len(ends):
        assert ends[-1] == len(lengths)


@settings(max_examples=80, deadline=None)
@given(length_lists, budgets)
def test_boundaries_are_greedy_and_fit(lens, budget):
    lengths = np.array(lens, dtype=np.int64)
    ends = boundaries(lengths, budget)
    check_batches(lengths, ends, budget)
    for a, b in spans(ends):  # greedy: one more sample would not fit (or hits the cap)
        if b < len(lengths) and (budget.max_samples is None or b - a < budget.max_samples):
            assert budget.cost(lengths[a:b + 1]) > budget.max_tokens


@settings(max_examples=60, deadline=None)
@given(length_lists, budgets, st.integers(1, 30), st.integers(0, 2**63), st.integers(0, 5))
def test_bucket_is_a_permutation_of_fitting_batches(lens, budget, window, seed, epoch):
    lengths = np.array(lens, dtype=np.int64)
    order = epoch_order("shuffle", len(lengths), seed=seed, epoch=epoch)
    new, ends = bucket(order, lengths, budget, window=window, seed=seed, epoch=epoch)
    assert sorted(new.tolist()) == sorted(order.tolist())
    check_batches(lengths[new], ends, budget)
    again = bucket(order, lengths, budget, window=window, seed=seed, epoch=epoch)
    np.testing.assert_array_equal(again[0], new)
    np.testing.assert_array_equal(again[1], ends)


@settings(max_examples=60, deadline=None)
@given(length_lists, budgets, st.integers(1, 4), st.booleans())
def test_shards_have_equal_batch_counts(lens, budget, world, drop_last):
    lengths = np.array(lens, dtype=np.int64)
    order = epoch_order("shuffle", len(lengths), seed=3, epoch=1)
    new, ends = bucket(order, lengths, budget, window=7, seed=3, epoch=1)
    shards = [shard_batches(new, ends, rank=r, world_size=world, drop_last=drop_last)
              for r in range(world)]
    counts = {len(e) for _, e in shards}
    assert len(counts) == 1
    seen = np.concatenate([o for o, _ in shards]) if shards else np.empty(0)
    if drop_last:
        assert len(set(seen.tolist())) == len(seen)  # disjoint
    else:
        assert set(seen.tolist()) == set(new.tolist())  # every sample somewhere
    for o, e in shards:
        check_batches(lengths[o], e, budget)


def test_over_long_samples_travel_alone():
    lengths = np.array([3, 50, 2, 2, 70, 1])
    ends = boundaries(lengths, TokenBudget(10))
    assert [b - a for a, b in spans(ends)] == [1, 1, 2, 1, 1]


def test_pad_to_multiple_counts_in_the_budget():
    lengths = np.array([5, 5, 5, 5])
    assert cut(lengths, 0, 4, TokenBudget(20)) == 4
    assert cut(lengths, 0, 4, TokenBudget(20, multiple=8)) == 2


def test_buckets_are_efficient_and_their_order_random():
    rng = np.random.default_rng(0)
    n = 20000
    lengths = np.clip(rng.lognormal(5.0, 1.0, n), 1, 4096).astype(np.int64)
    budget = TokenBudget(8192)
    order = epoch_order("shuffle", n, seed=7, epoch=0)
    new, ends = bucket(order, lengths, budget, window=default_bucket_window(lengths, budget),
                       seed=7, epoch=0)
    assert padding_efficiency(lengths[new], ends) >= 0.9
    fixed = np.minimum(np.arange(32, n + 32, 32), n)
    assert padding_efficiency(lengths[order], fixed) < 0.4
    starts = np.concatenate(([0], ends[:-1]))
    means = np.add.reduceat(lengths[new], starts) / (ends - starts)
    # batch order stays random: mean length uncorrelated with position in the epoch
    r = np.corrcoef(np.arange(len(means)), means)[0, 1]
    assert abs(r) < 4 / np.sqrt(len(means))
    other = bucket(order, lengths, budget, window=1000, seed=7, epoch=1)[0]
    assert not np.array_equal(other, new)
