"""Tests of gpuloader.order: epoch orders, sharding, seeds (see NOTE(epoch-order))."""
from __future__ import annotations

import numpy as np
import pytest
import torch
# hypothesis is a test extra: on a machine without it (a bare GPU box) skip, do not error.
pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gpuloader.errors import ArgumentError, ArgumentTypeError
from gpuloader.order import (ORDERS, EpochOrder, check_order, epoch_order, keyed_permutation,
                             resolve_seed, shard_size)

FAST = settings(max_examples=60, deadline=None)

sizes = st.integers(min_value=0, max_value=300)
seeds = st.integers(min_value=-(2**70), max_value=2**70)
epochs = st.integers(min_value=0, max_value=10**6)
block_lengths = st.integers(min_value=1, max_value=40)
windows = st.integers(min_value=1, max_value=6)


def _order(kind: str, n: int, **kw: int) -> np.ndarray:
    kw.setdefault("seed", 0)
    kw.setdefault("epoch", 0)
    return epoch_order(kind, n, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- permutations


@FAST
@given(kind=st.sampled_from(ORDERS), n=sizes, seed=seeds, epoch=epochs, length=block_lengths,
       window=windows)
def test_every_order_is_a_permutation(kind, n, seed, epoch, length, window):
    out = epoch_order(kind, n, seed=seed, epoch=epoch, block_length=length, window_blocks=window)
    assert out.dtype == np.int64 and out.ndim == 1
    assert np.array_equal(np.sort(out), np.arange(n))


def test_sequential_is_arange():
    assert np.array_equal(_order("sequential", 7, seed=5, epoch=3), np.arange(7))


@pytest.mark.parametrize("kind", ["shuffle", "block"])
def test_large_order_is_a_permutation(kind):
    n = 100_003  # not a multiple of the block length: exercises the short last block
    out = _order(kind, n, block_length=97, window_blocks=3)
    assert np.array_equal(np.sort(out), np.arange(n))


# ----------------------------------------------------------------------------- determinism


@FAST
@given(kind=st.sampled_from(ORDERS), n=sizes, seed=seeds, epoch=epochs, length=block_lengths)
def test_same_arguments_same_order(kind, n, seed, epoch, length):
    first = epoch_order(kind, n, seed=seed, epoch=epoch, block_length=length)
    second = epoch_order(kind, n, seed=seed, epoch=epoch, block_length=length)
    assert np.array_equal(first, second)


@FAST
@given(kind=st.sampled_from(["shuffle", "block"]), n=st.integers(10, 300), seed=seeds,
       epoch=st.integers(0, 10**6), length=st.integers(1, 5))
def test_other_epoch_other_order(kind, n, seed, epoch, length):
    # n >= 10 with at most 5 rows a block leaves >= 2 * 5! * 5! equally likely orders, so an
    # accidental tie is negligible; the point is that the epoch reaches the generator.
    this = epoch_order(kind, n, seed=seed, epoch=epoch, block_length=length)
    other = epoch_order(kind, n, seed=seed, epoch=epoch + 1, block_length=length)
    assert not np.array_equal(this, other)


@pytest.mark.parametrize("kind", ["shuffle", "block"])
def test_other_seed_other_order(kind):
    assert not np.array_equal(_order(kind, 50, seed=1, block_length=2),
                              _order(kind, 50, seed=2, block_length=2))


def test_orders_are_pinned():
    # The order is part of the resume contract (a checkpoint stores seed and epoch, not the
    # order): a change here silently changes every resumed run.
    assert _order("shuffle", 10, seed=0, epoch=0).tolist() == SHUFFLE_10
    block = _order("block", 12, seed=0, epoch=1, block_length=3, window_blocks=2)
    assert block.tolist() == BLOCK_12


SHUFFLE_10 = [1, 4, 8, 7, 3, 2, 0, 5, 6, 9]
# Windows of 2 blocks of 3 rows: positions 0-5 hold blocks {2, 3}, positions 6-11 blocks {0, 1}.
BLOCK_12 = [11, 7, 8, 6, 9, 10, 2, 3, 4, 5, 1, 0]


def test_negative_seed_is_taken_modulo_2_64():
    assert np.array_equal(_order("shuffle", 20, seed=-1), _order("shuffle", 20, seed=2**64 - 1))


def test_numpy_integers_are_accepted():
    out = epoch_order("shuffle", np.int64(20), seed=np.uint32(3), epoch=np.int16(2))
    assert np.array_equal(out, _order("shuffle", 20, seed=3, epoch=2))


# ----------------------------------------------------------------------------- block locality


@FAST
@given(n=st.integers(1, 400), seed=seeds, length=block_lengths, window=windows)
def test_block_batches_touch_few_blocks(n, seed, length, window):
    out = _order("block", n, seed=seed, block_length=length, window_blocks=window)
    blocks = out // length
    # Any run of block_length consecutive positions lies in at most two windows of
    # window_blocks blocks each (plus the short last block when n % block_length != 0).
    bound = 2 * window + (n % length != 0)
    for start in range(0, max(1, n - length + 1), max(1, length // 2)):
        assert len(np.unique(blocks[start:start + length])) <= bound


@FAST
@given(windows_count=st.integers(1, 12), seed=seeds, length=st.integers(2, 20), window=windows)
def test_block_windows_hold_whole_blocks(windows_count, seed, length, window):
    n = windows_count * window * length
    out = _order("block", n, seed=seed, block_length=length, window_blocks=window)
    for chunk in out.reshape(-1, window * length):
        ids, counts = np.unique(chunk // length, return_counts=True)
        assert len(ids) == window and (counts == length).all()


def test_block_order_keeps_batches_local_unlike_shuffle():
    n, length = 20_000, 100
    def mean_blocks(kind: str) -> float:
        out = _order(kind, n, seed=7, block_length=length)
        return float(np.mean([len(np.unique(b // length)) for b in out.reshape(-1, length)]))
    assert mean_blocks("block") <= 8 < mean_blocks("shuffle")


def test_window_of_one_block_keeps_each_block_contiguous():
    out = _order("block", 103, seed=3, block_length=10, window_blocks=1)
    blocks = out // 10
    changes = np.count_nonzero(np.diff(blocks))
    assert changes == len(np.unique(blocks)) - 1  # each block's rows form one run


# ----------------------------------------------------------------------------- sharding


@FAST
@given(kind=st.sampled_from(ORDERS), n=sizes, world=st.integers(1, 9), drop_last=st.booleans(),
       seed=seeds, length=block_lengths)
def test_shards_partition_the_global_order(kind, n, world, drop_last, seed, length):
    full = epoch_order(kind, n, seed=seed, epoch=1, block_length=length)
    shards = [
        epoch_order(kind, n, seed=seed, epoch=1, rank=r, world_size=world, drop_last=drop_last,
                    block_length=length)
        for r in range(world)
    ]
    per = shard_size(n, world, drop_last)
    assert all(len(s) == per and s.dtype == np.int64 for s in shards)
    joined = np.concatenate(shards)
    # Contiguous slices of the global order, padded cyclically from its start.
    assert np.array_equal(joined, np.resize(full, per * world) if n else joined)
    unique, counts = np.unique(joined, return_counts=True)
    if drop_last:
        assert len(unique) == len(joined)  # disjoint
        assert len(joined) >= n - (world - 1)
    else:
        assert np.array_equal(unique, np.arange(n))  # covering
        assert len(joined) - n <= world - 1  # padding repeats at most world - 1 indices
    if n % world == 0:
        assert np.array_equal(np.sort(joined), np.arange(n))  # exactly once


@pytest.mark.parametrize("n, world, drop_last, expected", [
    (10, 3, False, 4), (10, 3, True, 3), (9, 3, True, 3), (9, 3, False, 3), (0, 4, False, 0),
    (2, 4, False, 1), (2, 4, True, 0), (1, 1, False, 1),
])
def test_shard_size_matches_distributed_sampler(n, world, drop_last, expected):
    assert shard_size(n, world, drop_last) == expected
    sampler = torch.utils.data.DistributedSampler(
        range(n), num_replicas=world, rank=0, shuffle=False, drop_last=drop_last
    )
    assert len(sampler) == expected


def test_padding_when_world_exceeds_n():
    shards = [_order("sequential", 2, rank=r, world_size=5) for r in range(5)]
    assert [s.tolist() for s in shards] == [[0], [1], [0], [1], [0]]


# ----------------------------------------------------------------------------- seeds


def test_resolve_seed_prefers_explicit_seed():
    generator = torch.Generator().manual_seed(1)
    assert resolve_seed(1234, generator) == 1234
    assert resolve_seed(np.int64(5), None) == 5


def test_resolve_seed_draws_from_generator_like_random_sampler():
    first = resolve_seed(None, torch.Generator().manual_seed(42))
    again = resolve_seed(None, torch.Generator().manual_seed(42))
    expected = int(torch.empty((), dtype=torch.int64).random_(
        generator=torch.Generator().manual_seed(42)).item())
    assert first == again == expected
    assert 0 <= first < 2**63


def test_resolve_seed_follows_torch_manual_seed():
    state = torch.get_rng_state()
    try:
        torch.manual_seed(3)
        first = resolve_seed(None, None)
        torch.manual_seed(3)
        assert resolve_seed(None, None) == first
        assert resolve_seed(None, None) != first  # the default generator advanced
    finally:
        torch.set_rng_state(state)


def test_resolve_seed_rejects_non_generator():
    with pytest.raises(ArgumentTypeError, match=r"generator must be a torch\.Generator.*int 3"):
        resolve_seed(None, 3)  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match=r"seed must be an int, got float 1\.5"):
        resolve_seed(1.5, None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- validation


def test_check_order():
    assert check_order("block") == "block"
    with pytest.raises(ArgumentError, match=r"order must be one of 'sequential', 'shuffle', "
                                            r"'block', got 'random'"):
        check_order("random")
    with pytest.raises(ValueError):  # ArgumentError is a ValueError
        check_order("Shuffle")
    with pytest.raises(ArgumentTypeError, match=r"order must be one of .*got NoneType None"):
        check_order(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"n": -1}, ArgumentError, r"n must be an int >= 0, got -1"),
    ({"n": 2.0}, ArgumentTypeError, r"n must be an int, got float 2\.0"),
    ({"world_size": 0}, ArgumentError, r"world_size must be an int >= 1, got 0"),
    ({"rank": 2, "world_size": 2}, ArgumentError,
     r"rank must satisfy 0 <= rank < world_size=2, got rank=2"),
    ({"rank": -1}, ArgumentError, r"rank must satisfy 0 <= rank < world_size=1, got rank=-1"),
    ({"block_length": 0}, ArgumentError, r"block_length must be an int >= 1, got 0"),
    ({"window_blocks": 0}, ArgumentError, r"window_blocks must be an int >= 1, got 0"),
    ({"epoch": -1}, ArgumentError, r"epoch must be an int >= 0, got -1"),
    ({"seed": None}, ArgumentTypeError, r"seed must be an int, got NoneType None"),
    ({"seed": True}, ArgumentTypeError, r"seed must be an int, got bool True"),
])
def test_epoch_order_validation(kwargs, error, pattern):
    args = {"n": 10, "seed": 0, "epoch": 0, **kwargs}
    n = args.pop("n")
    with pytest.raises(error, match=pattern):
        epoch_order("shuffle", n, **args)


def test_shard_size_validation():
    with pytest.raises(ArgumentError, match=r"world_size must be an int >= 1, got 0"):
        shard_size(5, 0, False)
    with pytest.raises(ArgumentError, match=r"n must be an int >= 0, got -3"):
        shard_size(-3, 2, True)


# ----------------------------------------------------------------------------- spans, O(1) memory


@FAST
@given(kind=st.sampled_from(ORDERS), n=st.integers(0, 3000), world=st.integers(1, 4),
       drop_last=st.booleans(), length=block_lengths, window=windows, data=st.data())
def test_any_span_equals_the_same_slice_of_the_whole_order(kind, n, world, drop_last, length,
                                                          window, data):
    rank = data.draw(st.integers(0, world - 1))
    args = dict(seed=11, epoch=4, rank=rank, world_size=world, block_length=length,
                drop_last=drop_last, window_blocks=window)
    full = epoch_order(kind, n, **args)
    spans = EpochOrder(kind, n, **args)
    assert len(spans) == len(full)
    start = data.draw(st.integers(0, len(full)))
    stop = data.draw(st.integers(start, len(full)))
    assert np.array_equal(spans[start:stop], full[start:stop])
    assert np.array_equal(np.concatenate([np.empty(0, np.int64), *spans.chunks(7)]), full)


def test_a_billion_samples_cost_no_memory_up_front():
    order = EpochOrder("shuffle", 10**12, seed=1, epoch=0)
    first = order[0:1000]
    assert len(np.unique(first)) == 1000 and first.min() >= 0 and first.max() < 10**12
    # Positions far apart are computed without anything in between.
    assert np.array_equal(order[7 * 10**11:7 * 10**11 + 5],
                          order.take(7 * 10**11, 7 * 10**11 + 5))
    block = EpochOrder("block", 10**12, seed=1, epoch=0, block_length=10**7)
    assert block._block_perm is not None and len(block._block_perm) == 10**5


@pytest.mark.parametrize("size", [1, 2, 3, 5, 16, 17, 1000, 2**20 + 7])
def test_keyed_permutation_is_a_bijection(size):
    keys = np.arange(4, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x = np.arange(min(size, 70_000), dtype=np.uint64)
    out = keyed_permutation(x, np.uint64(size), keys, np.uint64(3))
    assert out.max() < size and len(np.unique(out)) == len(x)
    if size <= 70_000:
        assert np.array_equal(np.sort(out), x)


def _chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("n", [7, 10, 16])
def test_shuffle_is_statistically_uniform(n):
    # Over many seeds, every element lands at every position equally often, and every ordered
    # pair of elements is equally often at positions (0, 1).  Chi-square bounds at p ~ 1e-6 for
    # df = (n - 1)^2 and n(n - 1) - 1; the seeds are fixed, so the test is deterministic.
    trials = 6000
    where = np.zeros((n, n))
    pairs = np.zeros((n, n))
    for seed in range(trials):
        out = epoch_order("shuffle", n, seed=seed, epoch=3)
        where[out, np.arange(n)] += 1
        pairs[out[0], out[1]] += 1
    df = (n - 1) ** 2
    assert _chi_square(where.ravel()) < df + 7 * np.sqrt(2 * df) + 20
    off = pairs[~np.eye(n, dtype=bool)]
    df = len(off) - 1
    assert _chi_square(off) < df + 7 * np.sqrt(2 * df) + 20


def test_shuffle_of_a_large_dataset_has_no_structure():
    n = 1_000_003
    out = EpochOrder("shuffle", n, seed=5, epoch=0)[0:200_000]
    # Consecutive positions land in uniformly spread, uncorrelated places.
    counts = np.bincount(out * 100 // n, minlength=100)
    assert _chi_square(counts) < 99 + 7 * np.sqrt(198)
    steps = np.diff(out.astype(np.float64)) / n
    assert abs(np.corrcoef(out[:-1], out[1:])[0, 1]) < 0.02
    assert abs(np.mean(np.abs(steps)) - 1 / 3) < 0.01  # E|U - V| = 1/3 for independent U, V


@pytest.mark.parametrize("kind", ["sequential", "block"])
@pytest.mark.parametrize("world, rank", [(1, 0), (3, 2)])
def test_windows_name_exactly_the_rows_read_there(kind, world, rank):
    n, length, window = 1003, 10, 4
    order = EpochOrder(kind, n, seed=2, epoch=0, block_length=length, window_blocks=window,
                       rank=rank, world_size=world)
    full = order[0:len(order)]
    by_window: dict = {}
    for position, index in enumerate(full.tolist()):
        by_window.setdefault(order.window_of(position), set()).add(index)
    for w, indices in by_window.items():
        rows = {r for first, count in order.window_rows(w) for r in range(first, first + count)}
        assert indices <= rows and len(rows) <= length * window
    assert order.window_rows(10**6) == [] and order.window_of(len(order)) is None
    assert EpochOrder("shuffle", n, seed=2, epoch=0).window_of(0) is None
