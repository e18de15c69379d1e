"""The caching allocator's view (gpuloader/allocator.py) with the recording CUDA stand-in."""
from __future__ import annotations

import torch

from cuda_standin import FakeCuda
from gpuloader.allocator import StepMemory, allocatable

MB = 1 << 20
GB = 1 << 30
CUDA0 = torch.device("cuda", 0)


def segment(total, allocated=0, *, stream=0, kind="large", pool=(0, 0), free_blocks=()):
    blocks = [{"size": allocated, "state": "active_allocated"}] if allocated else []
    blocks += [{"size": b, "state": "inactive"} for b in free_blocks]
    return {"device": 0, "total_size": total, "allocated_size": allocated,
            "active_size": allocated, "stream": stream, "segment_type": kind,
            "segment_pool_id": pool, "blocks": blocks}


def test_only_memory_the_allocator_can_hand_the_step_counts_as_free():
    fake = FakeCuda()
    fake.free_total = (10 * GB, 80 * GB)
    fake.segments = [
        segment(4 * GB),                                       # wholly free: all of it
        segment(2 * GB, 1 * GB, free_blocks=[600 * MB, 424 * MB]),  # fragments: the largest
        segment(2 * MB, kind="small"),                         # small pool: < 1 MB allocations
        segment(1 * GB, stream=1001),                          # cached on the copy stream
        segment(3 * GB, pool=(1, 7)),                          # a CUDA graph's private pool
    ]
    reserved = sum(s["total_size"] for s in fake.segments)
    allocated = 1 * GB
    fake.stats = {"reserved_bytes.all.current": reserved,
                  "allocated_bytes.all.current": allocated}
    free, total = allocatable(0, cuda=fake)
    assert free == 10 * GB + 4 * GB + 600 * MB
    # What the old probe reported: device free plus every cached byte.
    assert free < 10 * GB + reserved - allocated
    assert total == 80 * GB


def test_the_process_memory_fraction_caps_what_can_still_be_reserved():
    fake = FakeCuda()
    fake.free_total = (70 * GB, 80 * GB)
    fake.fraction = 0.25                      # 20 GB for this process
    fake.segments = [segment(12 * GB, 8 * GB, free_blocks=[4 * GB])]
    fake.stats = {"reserved_bytes.all.current": 12 * GB,
                  "allocated_bytes.all.current": 8 * GB}
    free, total = allocatable(0, cuda=fake)
    assert (free, total) == (8 * GB + 4 * GB, 20 * GB)


def test_the_peak_is_reset_only_when_learning_and_the_users_peak_survives():
    fake = FakeCuda()
    fake.stats = {"allocated_bytes.all.current": 1 * GB, "allocated_bytes.all.peak": 9 * GB}
    fixed = StepMemory(CUDA0, learn=False, cuda=fake)
    fixed.begin()
    assert fixed.step_peak() is None and not fake.entries("reset_peak")
    assert fake.stats["allocated_bytes.all.peak"] == 9 * GB   # a fixed batch size: untouched

    auto = StepMemory(CUDA0, learn=True, cuda=fake)
    auto.begin()                                               # resets torch's peak to 1 GB
    fake.stats["allocated_bytes.all.peak"] = 3 * GB            # the step peaked at 3 GB
    assert auto.step_peak() == 2 * GB
    assert auto.max_memory_allocated() == 9 * GB               # what the user would have seen
    auto.begin()
    fake.stats["allocated_bytes.all.peak"] = 12 * GB
    auto.step_peak()
    assert auto.max_memory_allocated() == 12 * GB


def test_memory_a_step_keeps_is_not_its_cost():
    fake = FakeCuda()
    fake.stats = {"allocated_bytes.all.current": 1 * GB, "allocated_bytes.all.peak": 1 * GB}
    meter = StepMemory(CUDA0, learn=True, cuda=fake)
    meter.begin()
    fake.stats.update({"allocated_bytes.all.current": 2 * GB,   # optimizer state made and kept
                       "allocated_bytes.all.peak": 5 * GB})
    assert meter.step_peak() == 3 * GB


def test_the_cuda_probe_reports_what_the_allocator_can_hand_out():
    from gpuloader.probes import CudaProbe

    fake = FakeCuda()
    fake.free_total = (70 * GB, 80 * GB)
    fake.fraction = 0.5
    fake.segments = [segment(30 * GB, 20 * GB, free_blocks=[6 * GB, 4 * GB])]
    fake.stats = {"reserved_bytes.all.current": 30 * GB,
                  "allocated_bytes.all.current": 20 * GB}
    info = CudaProbe(0, cuda=fake).read()
    # 40 GB cap - 30 GB reserved may still grow, plus the largest cached fragment; the old
    # figure was 70 GB + 10 GB cached.
    assert (info.free, info.total) == (10 * GB + 6 * GB, 40 * GB)


def test_step_peaks_and_allocatable_memory_plan_with_the_shape_cost_model():
    # The measuring side (this module) and the shape-aware model (costmodel.py) plug together:
    # peaks from StepMemory train it, allocatable() is the budget it plans in.
    from gpuloader.costmodel import ShapeCostModel

    fake = FakeCuda()
    fake.stats = {"allocated_bytes.all.current": 1 * GB, "allocated_bytes.all.peak": 1 * GB}
    meter = StepMemory(CUDA0, learn=True, cuda=fake)
    model = ShapeCostModel()
    for batch in (64, 128, 96, 128, 64):
        meter.begin()
        fake.stats["allocated_bytes.all.peak"] = 1 * GB + batch * 4 * MB  # 4 MB per sample
        model.observe(batch, 1, meter.step_peak())
    fake.free_total = (6 * GB, 80 * GB)
    fake.segments = [segment(2 * GB)]
    fake.stats["reserved_bytes.all.current"] = 3 * GB
    free, _ = allocatable(0, cuda=fake)
    assert free == 8 * GB
    assert model.max_batch(1, free) == 8 * GB // (4 * MB)
