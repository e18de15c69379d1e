"""batch_size="auto" on ragged fields: token budgets from memory, per-shape caps, OOM recovery
(NOTE(auto-tokens), NOTE(shape-caps) in tokenplan.py), checked against a simulated allocator."""
from __future__ import annotations

from typing import List

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gpuloader as gl  # noqa: E402
from simulated_memory import SimulatedMemory  # noqa: E402


def ragged(lengths: np.ndarray, dtype=np.int16) -> gl.ArrayDataset:
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    values = (np.arange(int(offsets[-1])) % 97).astype(dtype)
    return gl.ArrayDataset(tokens=gl.Ragged(values, offsets), y=np.arange(len(lengths)))


def lognormal(n: int, median: float, sigma: float, seed: int, longest: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.ceil(rng.lognormal(np.log(median), sigma, n)), 1, longest).astype(np.int64)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), median=st.integers(4, 120), sigma=st.floats(0.1, 1.5),
       token_bytes=st.integers(1, 5000), rooms=st.integers(4, 400),
       fraction=st.floats(0.3, 1.0), multiple=st.sampled_from([1, 8]))
def test_every_planned_batch_fits_the_budget(seed, median, sigma, token_bytes, rooms, fraction,
                                             multiple):
    lengths = lognormal(400, median, sigma, seed, 8 * median)
    ds = ragged(lengths)
    longest = -(-int(lengths.max()) // multiple) * multiple
    # room for ``rooms`` longest samples, step and staging together
    budget = int(rooms * longest * (token_bytes + 64) / fraction)
    loader = gl.DataLoader(ds, batch_size="auto", memory_budget=budget, token_bytes=token_bytes,
                           memory_fraction=fraction, pad_to_multiple_of=multiple, shuffle=True,
                           seed=seed)
    planner = loader._tokens.planner
    tokens = loader.max_tokens
    assert tokens >= longest  # the longest sample fits alone
    assert tokens * token_bytes + planner.ring_bytes() <= budget * fraction
    seen: List[int] = []
    for batch in loader:
        assert batch["tokens"].numel() <= tokens  # padded tokens (B x L) within the plan
        seen.extend(batch["y"].tolist())
    assert sorted(seen) == list(range(len(lengths)))


def test_token_budget_errors_name_the_option():
    ds = ragged(np.array([5, 300, 7]))
    with pytest.raises(ValueError, match=r"memory_budget=100000 bytes cannot hold the longest "
                                         r"sample \(300 padded tokens\)"):
        gl.DataLoader(ds, batch_size="auto", memory_budget=100_000, token_bytes=1000)
    with pytest.raises(TypeError, match="token_bytes must be an int >= 0 .*got float 1.5"):
        gl.DataLoader(ds, batch_size="auto", token_bytes=1.5)
    fixed = gl.ArrayDataset(x=np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="token_bytes=4 sizes .*fixed-size fields.*sample_bytes"):
        gl.DataLoader(fixed, batch_size="auto", token_bytes=4)


def test_without_token_bytes_the_ring_is_capped():
    ds = ragged(lognormal(300, 30, 1.0, 0, 400))
    loader = gl.DataLoader(ds, batch_size="auto", memory_budget=1 << 50)
    # unknown step cost: at most the whole dataset, and the ring stays under its cap
    assert loader.max_tokens <= 300 * 400
    assert loader._tokens.planner.ring_bytes() <= 1 << 30


def run_epoch(loader, sim: SimulatedMemory):
    """One epoch of guarded steps on ``sim``: (samples delivered by steps that ran, step
    indices that ran out of memory, steps)."""
    model = torch.nn.Linear(1, 1)
    seen: List[int] = []
    failed: List[int] = []
    steps = 0
    for batch in loader:
        with loader.oom_guard(model) as guard:
            sim.run(batch["tokens"], batch["tokens_lengths"])
        if guard.failed:
            failed.append(steps)
        else:
            seen.extend(batch["y"].tolist())
        steps += 1
    return seen, failed, steps


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), median=st.integers(8, 100), sigma=st.floats(0.2, 1.5),
       per_token=st.integers(1, 2000), per_token_length=st.integers(0, 100),
       prior=st.floats(0.25, 4.0))
# caps grown without a step at that size once failed again and again, late in the epoch
@example(seed=8, median=8, sigma=1.25, per_token=2, per_token_length=0, prior=0.5)
def test_simulated_ooms_on_long_shapes_stop_early(seed, median, sigma, per_token,
                                                  per_token_length, prior):
    """An allocator whose cost grows with B*L**2, a token_bytes guess off either way: every
    sample exactly once, and the out-of-memory errors are few and early."""
    n = 2000
    lengths = lognormal(n, median, sigma, seed, 8 * median)
    longest = int(lengths.max())
    token_bytes = max(1, int((per_token + per_token_length * median) * prior))
    budget = int(2 * longest * (token_bytes + 64) / 0.8)  # about 16 median samples a batch
    loader = gl.DataLoader(ragged(lengths), batch_size="auto", memory_budget=budget,
                           token_bytes=token_bytes, shuffle=True, seed=seed)
    limit = max(loader._tokens.planner.step_budget(),
                longest * (per_token + per_token_length * longest))  # one sample always fits
    sim = SimulatedMemory(limit=limit, per_token=per_token, per_token_length=per_token_length)
    seen, failed, steps = run_epoch(loader, sim)
    assert sorted(seen) == list(range(n))
    assert len(failed) <= 8, failed
    # a shape first seen late may fail once; what failed before does not fail again
    assert len([s for s in failed if s >= steps // 2]) <= 1, (failed, steps)
    seen, failed, steps = run_epoch(loader, sim)  # the next epoch keeps what was learned
    assert sorted(seen) == list(range(n))
    assert len(failed) <= 1, failed


def test_a_failed_shape_shrinks_and_grows_back():
    # 100 samples of 64 tokens in one planned batch; the allocator fits 40 at that length
    ds = ragged(np.full(2000, 64))
    loader = gl.DataLoader(ds, batch_size="auto", memory_budget=10_000_000, token_bytes=1000,
                           shuffle=True, seed=0, pad_to_multiple_of=8)
    sizes = []
    sim = SimulatedMemory(limit=40 * 64 * 1000, per_token=1000)
    model = torch.nn.Linear(1, 1)
    seen: List[int] = []
    for batch in loader:
        with loader.oom_guard(model) as guard:
            sim.run(batch["tokens"], batch["tokens_lengths"])
        if not guard.failed:
            seen.extend(batch["y"].tolist())
            sizes.append(len(batch["y"]))
    assert sorted(seen) == list(range(2000))
    assert loader.max_tokens >= 100 * 64  # the budget plans 100+ samples; the shape caps them
    assert sizes[0] <= 40  # the retry of the failed batch is smaller (halved until it fits)
    assert max(sizes[len(sizes) // 2:]) > sizes[0]  # grown back by bisection towards the failure
    assert all(size <= 40 for size in sizes) and sim.ooms <= 6


def test_quadratic_cost_gives_long_buckets_fewer_tokens():
    """Recorded (B, L, peak) history of a step whose cost has an L**2 term: the planner caps
    long batches below the token count short ones get, and each batch's predicted peak fits."""
    lengths = np.array([16] * 600 + [256] * 600)
    loader = gl.DataLoader(ragged(lengths), batch_size="auto", memory_budget=560_000,
                           token_bytes=100, shuffle=True, seed=1)
    planner = loader._tokens.planner
    sim = SimulatedMemory(limit=1 << 62, fixed=1000, per_token=100, per_token_length=2)
    for batch, length in [(64, 16), (32, 16), (8, 256), (4, 256), (16, 64), (2, 256)]:
        planner.cost_model.observe(batch, length, sim.step(batch, length))
    planner.refresh()
    budget = planner.step_budget()
    tokens = {16: [], 256: []}
    for batch in loader:
        b, length = batch["tokens"].shape
        tokens[length].append(b * length)
        assert sim.base_peak(b, length) <= budget
    assert max(tokens[256]) < 0.5 * max(tokens[16])
    assert max(tokens[256]) >= 0.9 * 256 * sim.max_batch(256, budget=budget)


def test_resume_after_ooms_delivers_the_same_batches():
    lengths = lognormal(800, 30, 1.0, 3, 400)
    make = lambda: gl.DataLoader(ragged(lengths), batch_size="auto",  # noqa: E731
                                 memory_budget=20_000_000, token_bytes=500, shuffle=True, seed=4)
    sim = SimulatedMemory(limit=3_000_000, per_token=100, per_token_length=10)
    model = torch.nn.Linear(1, 1)
    first = make()
    it = iter(first)
    done = 0
    while done < 20:
        batch = next(it)
        with first.oom_guard(model) as guard:
            sim.run(batch["tokens"], batch["tokens_lengths"])
        done += not guard.failed
    assert sim.ooms > 0
    state = first.state_dict()
    rest = [b["y"].tolist() for b in it]
    second = make()
    second.load_state_dict(state)
    assert [b["y"].tolist() for b in second] == rest


def test_accumulate_global_tokens_weights_by_tokens_and_survives_ooms():
    """Steps of at most N real tokens (one planned batch may exceed it alone), weights the
    token shares of each step, a per-token mean loss exact, every sample once under OOMs."""
    lengths = lognormal(1500, 40, 1.0, 5, 400)
    loader = gl.DataLoader(ragged(lengths), batch_size="auto", memory_budget=4_000_000,
                           token_bytes=200, shuffle=True, seed=2)
    sim = SimulatedMemory(limit=loader._tokens.planner.step_budget() // 3, per_token=100,
                          per_token_length=2)
    model = torch.nn.Linear(1, 1)
    order, ends = loader._tokens.plan_epoch(loader._order, 0)
    planned = [sorted(order[a:b].tolist()) for a, b in zip(np.r_[0, ends[:-1]], ends)]
    seen: List[int] = []
    steps = 0
    for step in loader.accumulate(global_tokens=5000):
        kept = []
        for batch, weight in step:
            with loader.oom_guard(model) as guard:
                sim.run(batch["tokens"], batch["tokens_lengths"])
            if guard.failed:
                kept = []  # the whole step starts over (its gradients were zeroed)
                continue
            kept.append((batch["y"].tolist(), batch["tokens_lengths"], weight))
        ys = [y for part, _, _ in kept for y in part]
        step_tokens = int(lengths[ys].sum())
        # over N only when one planned batch alone holds more
        assert step_tokens <= 5000 or sorted(ys) in planned, step_tokens
        assert sum(w for *_, w in kept) == pytest.approx(1.0)
        for _, lens, weight in kept:
            assert weight == pytest.approx(int(lens.sum()) / step_tokens)
        # per-token mean of a loss that is the token's value: sum(weight * micro mean) exact
        values = {y: float(y % 7) for y in ys}
        exact = sum(values[y] * lengths[y] for y in ys) / step_tokens
        micro = sum(w * sum(values[y] * lengths[y] for y in part) / int(lens.sum())
                    for part, lens, w in kept)
        assert micro == pytest.approx(exact)
        seen.extend(ys)
        steps += 1
    assert sim.ooms > 0 and steps > 5
    assert sorted(seen) == list(range(len(lengths)))
    with pytest.raises(ValueError, match="exactly one of global_batch_size .* and "
                                         "global_tokens"):
        next(loader.accumulate(8, global_tokens=100))
    fixed = gl.DataLoader(gl.ArrayDataset(x=np.zeros((8, 2), np.float32)), batch_size=4)
    with pytest.raises(ValueError, match=r"accumulate\(global_tokens=100\) needs a token budget"):
        next(fixed.accumulate(global_tokens=100))


def test_learned_costs_plan_each_length_near_its_own_limit():
    """Peaks reported as on CUDA (the recording stand-in) teach the planner the step's
    ``a + b*B*L + c*B*L**2``; after a first epoch with out-of-memory errors from a low
    ``token_bytes``, every length bucket -- the short one too, whose tokens cost a third of
    the median's -- gets batches near the most samples that fit at its length."""
    from cuda_standin import FakeCuda
    from gpuloader.allocator import StepMemory

    rng = np.random.default_rng(0)
    lengths = rng.permutation(np.repeat([16, 64, 256], [2500, 3000, 900]))
    loader = gl.DataLoader(ragged(lengths), batch_size="auto", memory_budget=8_000_000,
                           token_bytes=100, shuffle=True, seed=1)
    fake = FakeCuda()
    fake.stats = {"allocated_bytes.all.current": 0, "allocated_bytes.all.peak": 0}
    loader._memory = StepMemory(torch.device("cuda", 0), learn=True, cuda=fake)
    budget = loader._tokens.planner.step_budget()
    sim = SimulatedMemory(limit=budget, fixed=10_000, per_token=100, per_token_length=10)
    model = torch.nn.Linear(1, 1)
    for epoch in range(2):
        loader.set_epoch(epoch)
        most = {16: 0, 64: 0, 256: 0}
        seen: List[int] = []
        for batch in loader:
            with loader.oom_guard(model) as guard:
                fake.stats["allocated_bytes.all.peak"] = sim.run(batch["tokens"],
                                                                 batch["tokens_lengths"])
            if not guard.failed:
                b, length = batch["tokens"].shape
                most[length] = max(most[length], b)
                seen.extend(batch["y"].tolist())
        assert sorted(seen) == list(range(len(lengths)))
    assert sim.ooms >= 1
    for length, b in most.items():
        assert 0.9 * sim.max_batch(length) <= b <= sim.max_batch(length), (length, most)
    assert loader.max_tokens >= 0.9 * 16 * sim.max_batch(16)
    assert loader.max_tokens <= loader._tokens.planner.capacity  # the ring was sized for it
