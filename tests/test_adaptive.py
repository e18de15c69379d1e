"""oom_guard and accumulate: nothing lost or repeated under any out-of-memory schedule."""
from __future__ import annotations

import numpy as np
import pytest
import torch
# hypothesis is a test extra: on a machine without it (a bare GPU box) skip, do not error.
pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gpuloader as gl
from gpuloader.adaptive import is_oom_error
from gpuloader.sizing import INITIAL_COOLDOWN, SizeController


def make_dataset(n: int) -> gl.ArrayDataset:
    return gl.ArrayDataset(x=np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32),
                           y=np.arange(n, dtype=np.int64))


def oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class Capacity:
    """A fake device: steps with more than ``limit`` samples run out of memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.ooms = 0

    def step(self, batch) -> None:
        if len(batch["y"]) > self.limit:
            self.ooms += 1
            raise oom()


def trained_indices(loader, step) -> list:
    seen = []
    for batch in loader:
        with loader.oom_guard() as guard:
            step(batch)
        if not guard.failed:
            seen.extend(batch["y"].tolist())
    return seen


@settings(max_examples=40, deadline=None)
@given(schedule=st.sets(st.integers(0, 60), max_size=12),
       order=st.sampled_from(["sequential", "shuffle", "block"]),
       batch_size=st.sampled_from([16, 40, "auto"]))
def test_any_oom_schedule_trains_every_sample_exactly_once(schedule, order, batch_size):
    n = 400
    calls = iter(range(10_000))

    def step(batch):
        if next(calls) in schedule and len(batch["y"]) > 1:
            raise oom()

    with gl.DataLoader(make_dataset(n), batch_size=batch_size, order=order, seed=1,
                       max_batch_size=64) as loader:
        seen = trained_indices(loader, step)
    assert sorted(seen) == list(range(n))


def test_shrinks_at_most_by_half_and_requeues_the_failed_samples():
    device = Capacity(limit=20)
    # 200 samples: fewer than 16 steps at size 16, so no growth attempt happens
    with gl.DataLoader(make_dataset(200), batch_size=64, shuffle=True, seed=0) as loader:
        seen = trained_indices(loader, device.step)
        sizes = loader.stats()["batch_sizes"]
    assert sorted(seen) == list(range(200))
    assert sizes[:3] == [64, 32, 16]
    assert device.ooms == 2


def test_state_dict_does_not_count_rolled_back_batches():
    with gl.DataLoader(make_dataset(100), batch_size=10) as loader:
        it = iter(loader)
        next(it)
        batch = next(it)
        with loader.oom_guard():
            raise oom()
        assert loader.state_dict()["cursor"]["position"] == 10
        assert next(it)["y"].tolist() == batch["y"][:5].tolist()


def test_the_optimizer_gradients_are_zeroed():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gl.DataLoader(make_dataset(64), batch_size=16) as loader:
        batch = next(iter(loader))
        with loader.oom_guard(opt) as guard:
            model(batch["x"]).sum().backward()
            assert model.weight.grad is not None
            raise oom()
    assert guard.failed and model.weight.grad is None


def test_other_exceptions_pass_through_untouched():
    with gl.DataLoader(make_dataset(64), batch_size=16) as loader:
        next(iter(loader))
        with pytest.raises(KeyError, match="not an oom"):
            with loader.oom_guard():
                raise KeyError("not an oom")
        assert loader.batch_size == 16


def test_cpu_allocator_errors_count_as_out_of_memory():
    assert is_oom_error(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"))
    assert is_oom_error(oom())
    assert not is_oom_error(RuntimeError("shape mismatch"))


def test_at_size_one_the_oom_is_re_raised_with_an_explanation():
    with gl.DataLoader(make_dataset(8), batch_size=1) as loader:
        next(iter(loader))
        with pytest.raises(torch.cuda.OutOfMemoryError) as info:
            with loader.oom_guard():
                raise oom()
    assert "cannot retry with a smaller batch" in "\n".join(info.value.__notes__)


def test_size_grows_back_when_memory_frees():
    device = Capacity(limit=8)
    with gl.DataLoader(make_dataset(4000), batch_size=64, shuffle=True, seed=0) as loader:
        for i, batch in enumerate(loader):
            if i == 30:
                device.limit = 1000  # memory freed
            with loader.oom_guard():
                device.step(batch)
        assert loader.batch_size == 64
        assert 64 in loader.stats()["batch_sizes"][1:]


def test_growth_does_not_thrash():
    device = Capacity(limit=40)
    with gl.DataLoader(make_dataset(20_000), batch_size=64, seed=0) as loader:
        seen = trained_indices(loader, device.step)
    assert sorted(seen) == list(range(20_000))
    # one initial failure plus a few bisecting growth attempts, then quiet for ~600 steps
    assert device.ooms <= 5


def test_controller_cooldown_doubles_after_a_failed_growth():
    controller = SizeController(64, floor=1)
    controller.on_oom(64)
    for _ in range(INITIAL_COOLDOWN):
        controller.on_success(32)
    assert controller.current > 32  # grew
    controller.on_oom(controller.current)
    assert controller.cooldown == 2 * INITIAL_COOLDOWN
    assert controller.current == 32  # back to the size that worked


def test_an_oom_never_grows_the_size():
    controller = SizeController(128, floor=1)
    controller.on_oom(128)
    controller.on_oom(64)
    assert controller.current == 32
    controller.on_oom(128)  # a batch formed before the shrinks fails late
    assert controller.current == 32


@pytest.mark.parametrize("num_workers", [0, 2])
def test_generic_path_recovers_from_oom_without_failing_on_stale_sizes(num_workers):
    # torch's workers read batches ahead at the old size, and a rollback's pieces are cut at
    # the size of that moment: all must come at the current size, or each fails once more
    # (and its failure must not grow the size back).
    n = 4000
    device = Capacity(limit=20)
    with gl.DataLoader(OpaqueDataset(n), batch_size=128, num_workers=num_workers) as loader:
        seen = trained_indices(loader, device.step)
    assert sorted(seen) == list(range(n))
    # 128 -> 64 -> 32 -> 16, then a few growth attempts with doubling cooldowns
    assert device.ooms <= 8


@pytest.mark.parametrize("drop_last", [False, True])
def test_accumulate_steps_have_exactly_the_global_batch(drop_last):
    n, global_batch = 1000, 96
    seen = []
    with gl.DataLoader(make_dataset(n), batch_size=40, shuffle=True, seed=2,
                       drop_last=drop_last) as loader:
        sizes = []
        for step in loader.accumulate(global_batch):
            total, weight = 0, 0.0
            for batch, w in step:
                assert len(batch["y"]) <= 40
                total += len(batch["y"])
                weight += w
                seen.extend(batch["y"].tolist())
            sizes.append(total)
            assert weight == pytest.approx(1.0)
    expected = [global_batch] * (n // global_batch) + ([] if drop_last else [n % global_batch])
    assert sizes == expected
    assert len(set(seen)) == len(seen) == sum(expected)


class OpaqueDataset(torch.utils.data.Dataset):
    """Not an array dataset: takes the generic path (torch's sampler and collate)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"y": i}


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_state_after_a_full_accumulate_epoch_points_at_the_next_epoch(drop_last, generic):
    n, global_batch = 100, 32
    ds = OpaqueDataset(n) if generic else make_dataset(n)
    with gl.DataLoader(ds, batch_size=8, shuffle=True, seed=0, drop_last=drop_last) as loader:
        for step in loader.accumulate(global_batch):
            for _ in step:
                pass
        state = loader.state_dict()
    assert state["cursor"] == {"epoch": 1, "position": 0}  # as after a plain loop's epoch
    with gl.DataLoader(ds, batch_size=8, shuffle=True, seed=0, drop_last=drop_last) as resumed:
        resumed.load_state_dict(state)
        steps = [sum(1 for _ in step) for step in resumed.accumulate(global_batch)]
        # epoch 1, not an empty epoch 0
        assert len(steps) == (n // global_batch if drop_last else -(-n // global_batch))


def test_accumulate_oom_with_optimizer_restarts_the_step():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    device = Capacity(limit=30)
    with gl.DataLoader(make_dataset(512), batch_size=64, seed=0) as loader:
        per_step = []
        for step in loader.accumulate(128):
            used, weight = [], 0.0
            for batch, w in step:
                with loader.oom_guard(opt) as guard:
                    device.step(batch)
                    model(batch["x"]).sum().backward()
                if guard.failed:
                    used, weight = [], 0.0  # the step starts over from its first sample
                else:
                    used.extend(batch["y"].tolist())
                    weight += w
            per_step.append(sorted(used))
            assert weight == pytest.approx(1.0)
            opt.zero_grad()
    assert per_step == [list(range(s, s + 128)) for s in range(0, 512, 128)]


def test_accumulate_oom_without_optimizer_resplits_only_the_failed_batch():
    device = Capacity(limit=30)
    with gl.DataLoader(make_dataset(256), batch_size=64, seed=0) as loader:
        for step in loader.accumulate(128):
            used, weight = [], 0.0
            for batch, w in step:
                with loader.oom_guard() as guard:
                    device.step(batch)
                if not guard.failed:
                    used.extend(batch["y"].tolist())
                    weight += w
            assert sorted(used) == list(range(step.start, step.start + 128))
            assert weight == pytest.approx(1.0)


def test_auto_streams_a_dataset_larger_than_the_budget():
    n = 5000
    per_sample = 4 * 4 + 8
    budget = per_sample * 4 * 100  # ring of 4 slots; far less than the dataset's bytes
    with gl.DataLoader(make_dataset(n), batch_size="auto", memory_budget=budget) as loader:
        sizes = [len(b["y"]) for b in loader]
    assert sum(sizes) == n
    assert max(sizes) * per_sample * 4 <= budget


def test_auto_size_is_replanned_from_the_learned_step_cost():
    n, per_sample = 40_000, 4 * 4 + 8
    budget = 1 << 20
    with gl.DataLoader(make_dataset(n), batch_size="auto", memory_budget=budget) as loader:
        planned = loader.batch_size
        ring = per_sample * (loader.prefetch_depth + 2)
        assert planned == (int(budget * 0.8) // ring) // 8 * 8
        # Peak step memory measured on (simulated) guarded steps: 2 KiB per sample.
        loader.cost_model.observe(8, 8 * 2048)
        loader.cost_model.observe(64, 64 * 2048)
        steps = 0
        while steps < 16:
            for batch in loader:
                with loader.oom_guard():
                    steps += 1
                if steps == 16:
                    break
        learned = loader.batch_size
    assert learned == (int(budget * 0.8) // (ring + 2048)) // 8 * 8 < planned
