"""CUDA paths: device staging ring, batch lifetime, poison, real out-of-memory recovery.

Run on a GPU machine (benchmarks/gpu_check.sh); skipped without CUDA.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gpuloader as gl
from gpuloader import buffers

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

N = 2000


def make_dataset(n: int = N, width: int = 64) -> gl.ArrayDataset:
    x = np.arange(n * width, dtype=np.float32).reshape(n, width)
    return gl.ArrayDataset(x=x, y=np.arange(n, dtype=np.int64))


def _busy_step(x: torch.Tensor) -> torch.Tensor:
    """Queue GPU work that reads ``x`` late: a spin first, so a copy racing the step would
    overwrite ``x`` before it is read.  No host sync."""
    torch.cuda._sleep(int(2e6))
    return x.clone()


def test_device_batches_hold_the_right_rows_exactly_once():
    # GPU clones of every batch, compared once at the end: a per-batch .tolist() would
    # synchronise and hide a copy racing the step.
    ds = make_dataset()
    full = torch.from_numpy(np.arange(N * 64, dtype=np.float32).reshape(N, 64)).cuda()
    xs, ys = [], []
    with gl.DataLoader(ds, batch_size=128, shuffle=True, seed=0, device="cuda") as loader:
        for batch in loader:
            xs.append(_busy_step(batch["x"]))
            ys.append(_busy_step(batch["y"]))
    x, y = torch.cat(xs), torch.cat(ys)
    assert torch.equal(x, full[y])
    assert torch.equal(torch.sort(y).values.cpu(), torch.arange(N))


class _Rows(torch.utils.data.Dataset):
    """No array view: the generic path (torch's sampler, collate), copied on a side stream."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"x": torch.from_numpy(self.x[i]), "i": i}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_generic_path_device_batches_are_right_without_host_syncs(num_workers):
    x = np.arange(N * 64, dtype=np.float32).reshape(N, 64)
    full = torch.from_numpy(x).cuda()
    xs, ids = [], []
    with gl.DataLoader(_Rows(x), batch_size=100, shuffle=True, seed=1, device="cuda",
                       num_workers=num_workers) as loader:
        for batch in loader:
            assert batch["x"].is_cuda
            xs.append(_busy_step(batch["x"]))
            ids.append(_busy_step(batch["i"]))
    got, i = torch.cat(xs), torch.cat(ids)
    assert torch.equal(got, full[i])
    assert torch.equal(torch.sort(i).values.cpu(), torch.arange(N))


def test_steady_state_allocates_nothing_on_the_device():
    ds = make_dataset()
    with gl.DataLoader(ds, batch_size=100, device="cuda", prefetch_depth=2) as loader:
        it = iter(loader)
        for _ in range(4):  # warm-up: staging ring allocated
            next(it)
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        for _ in range(10):
            next(it)
        torch.cuda.synchronize()
        after = torch.cuda.memory_stats()["allocation.all.allocated"]
    assert after == before


def test_device_batch_stays_valid_for_prefetch_depth_plus_one_draws():
    depth = 2
    with gl.DataLoader(make_dataset(), batch_size=50, device="cuda",
                       prefetch_depth=depth) as loader:
        it = iter(loader)
        first = next(it)
        expected = first["y"].clone()
        for _ in range(depth + 1):
            next(it)
        torch.cuda.synchronize()
        assert torch.equal(first["y"], expected)


def test_work_queued_on_an_epochs_last_batch_is_not_overwritten_by_the_next_epoch():
    # NOTE(slot-lifetime): the copy stream must wait for the consumer stream before rewriting
    # a slot, also when the slot's batch was one of the previous epoch's last ones.
    depth, size, n = 1, 50, 200
    with gl.DataLoader(make_dataset(n), batch_size=size, device="cuda",
                       prefetch_depth=depth) as loader:
        last = list(loader)[-1]
        torch.cuda._sleep(int(2e8))  # ~0.1 s of GPU time queued on the consumer stream ...
        snapshot = last["y"].clone()  # ... before this read of the batch
        it = iter(loader)
        for _ in range(depth + 1):  # the next epoch's copies reach the batch's slot
            next(it)
        torch.cuda.synchronize()
        assert torch.equal(snapshot.cpu(), torch.arange(n - size, n))


def test_poison_reveals_use_after_recycle(monkeypatch):
    monkeypatch.setattr(buffers, "POISON", True)
    depth = 1
    with gl.DataLoader(make_dataset(), batch_size=50, device="cuda",
                       prefetch_depth=depth) as loader:
        it = iter(loader)
        first = next(it)
        for _ in range(depth + 3):  # well past the lifetime: the slot was recycled
            next(it)
        torch.cuda.synchronize()
        assert not torch.equal(first["y"], torch.arange(50, device="cuda"))


def test_reuse_buffers_false_gives_caller_owned_batches():
    with gl.DataLoader(make_dataset(), batch_size=100, device="cuda",
                       reuse_buffers=False) as loader:
        batches = list(loader)
    torch.cuda.synchronize()
    assert torch.equal(torch.cat([b["y"] for b in batches]).cpu(), torch.arange(N))


def test_memory_info_reports_the_device():
    info = gl.memory_info("cuda:0")
    assert 0 < info.free <= info.total


def _wide_step(x: torch.Tensor) -> None:
    """A step whose activations take 2 MiB per sample.  A function, so a failed step's
    activations die with its frame (README: run steps in a function)."""
    activations = x.repeat(1, 512)
    activations.sum()


def test_real_out_of_memory_is_survived_with_nothing_lost():
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    width = 1024
    n = 4096
    ds = gl.ArrayDataset(x=np.ones((n, width), dtype=np.float32), y=np.arange(n))
    # Allow this process ~1 GiB; a step allocates 2 MiB x batch of activations, so batches of
    # 1024 (2 GiB) fail and the loader must shrink to survive.
    torch.cuda.set_per_process_memory_fraction(min(1.0, (1 << 30) / total), 0)
    try:
        seen = []  # GPU clones of the delivered labels, compared once at the end
        with gl.DataLoader(ds, batch_size=1024, device="cuda", seed=0, shuffle=True) as loader:
            for batch in loader:
                with loader.oom_guard() as guard:
                    _wide_step(batch["x"])
                if not guard.failed:
                    seen.append(batch["y"].clone())
            assert loader.stats()["oom_count"] >= 1
            assert loader.batch_size < 1024
        assert torch.equal(torch.sort(torch.cat(seen)).values.cpu(), torch.arange(n))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


def test_learned_step_cost_ignores_memory_the_first_step_keeps():
    # Adam's state (2 x 4 MiB here) is created inside the first guarded step and kept: it is
    # not a per-sample cost.  Sizes 64 then 60 (the epoch's tail): counting it would put
    # ~8 MiB / 4 = 2 MiB on each sample, next to a true cost of a few KiB.
    width = 1024
    ds = gl.ArrayDataset(x=np.ones((124, width), dtype=np.float32), y=np.arange(124))
    model = torch.nn.Linear(width, width).cuda()
    opt = torch.optim.Adam(model.parameters())
    # The cost is learned under batch_size="auto" only (fixed sizes leave torch's peak alone).
    with gl.DataLoader(ds, batch_size="auto", max_batch_size=64, device="cuda") as loader:
        for batch in loader:
            with loader.oom_guard(opt):
                model(batch["x"]).square().mean().backward()
                opt.step()
                opt.zero_grad()
        assert loader.cost_model.has_fit
        assert loader.cost_model.per_sample < 1 << 20  # half what the kept state would add


def test_batches_used_on_another_stream_after_record_stream_are_right():
    # NOTE(stream-rule): the side stream waits for the batch's copy, and the slot is rewritten
    # only after the work queued on both streams.  GPU clones, compared at the end.
    side = torch.cuda.Stream()
    xs, ys = [], []
    full = torch.from_numpy(np.arange(N * 64, dtype=np.float32).reshape(N, 64)).cuda()
    with gl.DataLoader(make_dataset(), batch_size=64, shuffle=True, seed=2, device="cuda",
                       prefetch_depth=1) as loader:
        for batch in loader:
            loader.record_stream(batch, side)
            with torch.cuda.stream(side):
                xs.append(_busy_step(batch["x"]))
                ys.append(_busy_step(batch["y"]))
    torch.cuda.current_stream().wait_stream(side)
    x, y = torch.cat(xs), torch.cat(ys)
    assert torch.equal(x, full[y])
    assert torch.equal(torch.sort(y).values.cpu(), torch.arange(N))


def test_a_fixed_batch_size_guard_leaves_the_peak_statistics_alone():
    big = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    del big
    peak = torch.cuda.max_memory_allocated()
    with gl.DataLoader(make_dataset(), batch_size=100, device="cuda") as loader:
        for batch in loader:
            with loader.oom_guard():
                batch["x"].sum()
    assert torch.cuda.max_memory_allocated() >= peak


def test_auto_keeps_the_users_peak_in_stats():
    big = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    del big
    peak = torch.cuda.max_memory_allocated()
    with gl.DataLoader(make_dataset(), batch_size="auto", max_batch_size=256,
                       device="cuda") as loader:
        for batch in loader:
            with loader.oom_guard():
                batch["x"].sum()
        assert loader.stats()["max_memory_allocated"] >= peak


def test_free_memory_respects_the_process_memory_fraction():
    torch.cuda.init()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(0.1, 0)
    try:
        info = gl.memory_info("cuda:0")
        assert info.free <= 0.1 * total
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
