"""Tests of gpuloader.probes and gpuloader.planning: probes, the batch sizer
(NOTE(batch-sizing)) and CostModel."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
# hypothesis is a test extra: on a machine without it (a bare GPU box) skip, do not error.
pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gpuloader.errors import (
    ArgumentError,
    ArgumentTypeError,
    DeviceError,
    GpuLoaderError,
    MemoryProbeError,
)
from gpuloader.planning import (
    UNKNOWN_COST_CAP,
    CostModel,
    SizerConfig,
    SizingOptions,
    plan_batch_size,
    validate_batch_bounds,
    validate_memory_fraction,
    validate_sample_bytes,
)
from gpuloader.probes import (
    CudaProbe,
    FixedProbe,
    HostProbe,
    MemoryInfo,
    MemoryProbe,
    NvmlProbe,
    memory_info,
    probe_for,
    validate_memory_budget,
)

FAST = settings(max_examples=80, deadline=None)
GiB = 1 << 30
MiB = 1 << 20

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")


def config(**kw: object) -> SizerConfig:
    base: dict = dict(staging_bytes_per_sample=1000, ring_slots=3, dataset_len=10**9)
    base.update(kw)
    return SizerConfig(**base)


@st.composite
def configs(draw: st.DrawFn) -> SizerConfig:
    low = draw(st.integers(1, 64))
    high = draw(st.one_of(st.none(), st.integers(low, 100_000)))
    return SizerConfig(
        staging_bytes_per_sample=draw(st.integers(0, 10 * MiB)),
        ring_slots=draw(st.integers(1, 6)),
        dataset_len=draw(st.integers(0, 10**7)),
        memory_fraction=draw(st.floats(0.01, 1.0)),
        sample_bytes=draw(st.one_of(st.just(0), st.integers(0, 50 * MiB))),
        min_batch_size=low,
        max_batch_size=high,
        unknown_cost_cap=draw(st.sampled_from([GiB, 64 * MiB, 1])),
    )


@st.composite
def cost_models(draw: st.DrawFn) -> CostModel | None:
    if draw(st.booleans()):
        return None
    model = CostModel()
    for size in draw(st.lists(st.integers(1, 4096), min_size=0, max_size=5)):
        model.observe(size, draw(st.integers(0, 80 * GiB)))
    return model


free_sizes = st.integers(min_value=0, max_value=1 << 42)


# ----------------------------------------------------------------------------- plan_batch_size


@FAST
@given(cfg=configs(), learned=cost_models(), free=free_sizes)
def test_budget_respected(cfg, learned, free):
    size = plan_batch_size(free, cfg, learned)
    assert 1 <= size <= max(1, cfg.dataset_len)
    if cfg.max_batch_size is not None:
        assert size <= cfg.max_batch_size
    if size > cfg.min_batch_size:
        fit = learned.fit if learned is not None else None
        step, fixed = (math.ceil(fit[0]), math.ceil(fit[1])) if fit else (cfg.sample_bytes, 0)
        cost = cfg.staging_bytes_per_sample * cfg.ring_slots + step
        assert size * cost + fixed <= free * cfg.memory_fraction


@FAST
@given(cfg=configs(), learned=cost_models(), a=free_sizes, b=free_sizes)
def test_monotonic_in_free_memory(cfg, learned, a, b):
    low, high = sorted((a, b))
    assert plan_batch_size(low, cfg, learned) <= plan_batch_size(high, cfg, learned)


@FAST
@given(cfg=configs(), free=free_sizes)
def test_rounded_to_multiple_of_8_unless_a_bound_decides(cfg, free):
    size = plan_batch_size(free, cfg)
    bounds = {cfg.min_batch_size, cfg.max_batch_size, cfg.dataset_len, 1}
    assert size < 8 or size % 8 == 0 or size in bounds


def test_plain_arithmetic():
    cfg = config(staging_bytes_per_sample=1000, ring_slots=3, sample_bytes=7000)  # 10 kB each
    assert plan_batch_size(1_000_000, cfg) == 80  # 0.8 MB / 10 kB
    assert plan_batch_size(1_030_000, cfg) == 80  # 82 rounds down to 80
    assert plan_batch_size(90_000, cfg) == 7  # below 8: not rounded
    assert plan_batch_size(0, cfg) == 1
    assert plan_batch_size(-5, cfg) == 1  # negative free counts as 0


def test_bounds():
    cfg = config(sample_bytes=7000, min_batch_size=10, max_batch_size=100)
    assert plan_batch_size(0, cfg) == 10  # min wins over memory
    assert plan_batch_size(10 * GiB, cfg) == 100  # max wins, even though not a multiple of 8
    assert plan_batch_size(110_000, config(sample_bytes=7000, min_batch_size=10)) == 10
    assert plan_batch_size(10 * GiB, config(sample_bytes=7000, dataset_len=50)) == 50
    assert plan_batch_size(10 * GiB, config(sample_bytes=7000, dataset_len=0)) == 1
    assert plan_batch_size(0, config(min_batch_size=64, dataset_len=20)) == 20


def test_unknown_step_cost_caps_staging_ring_at_1_gib():
    cfg = config(staging_bytes_per_sample=4096, ring_slots=4)
    size = plan_batch_size(1 << 40, cfg)
    assert size == (GiB // (4096 * 4)) // 8 * 8
    assert size * 4096 * 4 <= GiB == UNKNOWN_COST_CAP


def test_cap_lifted_by_max_batch_size_or_known_cost():
    huge = 1 << 40
    assert plan_batch_size(huge, config(staging_bytes_per_sample=4096, ring_slots=4,
                                        max_batch_size=1_000_000)) == 1_000_000
    assert plan_batch_size(huge, config(staging_bytes_per_sample=4096, ring_slots=4,
                                        sample_bytes=1)) > GiB // (4096 * 4)
    learned = CostModel()
    learned.observe(8, 8 * 100 + 50)
    learned.observe(16, 16 * 100 + 50)
    assert plan_batch_size(huge, config(staging_bytes_per_sample=4096, ring_slots=4),
                           learned) > GiB // (4096 * 4)


def test_learned_fit_replaces_sample_bytes_and_reserves_intercept():
    learned = CostModel()
    learned.observe(10, 10 * 9000 + 200_000)
    learned.observe(20, 20 * 9000 + 200_000)
    cfg = config(staging_bytes_per_sample=1000, ring_slots=1, sample_bytes=123_456)
    # (floor(1.25e6 * 0.8) - 200_000) // (1000 + 9000) = 80
    assert plan_batch_size(1_250_000, cfg, learned) == 80
    assert plan_batch_size(1_250_000, cfg, CostModel()) == 8  # no fit: 1e6 // 124_456


def test_zero_cost_is_unbounded_but_respects_bounds():
    assert plan_batch_size(0, config(staging_bytes_per_sample=0, dataset_len=77)) == 77
    assert plan_batch_size(0, config(staging_bytes_per_sample=0, max_batch_size=5)) == 5


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"memory_fraction": 0}, ArgumentError, r"memory_fraction must be a number in \(0, 1\]"),
    ({"memory_fraction": "0.5"}, ArgumentTypeError, r"memory_fraction .* got str '0\.5'"),
    ({"ring_slots": 0}, ArgumentError, r"ring_slots must be a positive int, got 0"),
    ({"staging_bytes_per_sample": -1}, ArgumentError, r"staging_bytes_per_sample .* got -1"),
    ({"dataset_len": 1.0}, ArgumentTypeError, r"dataset_len must be an int >= 0, got float"),
    ({"min_batch_size": 9, "max_batch_size": 8}, ArgumentError,
     r"max_batch_size must be None or >= min_batch_size=9, got max_batch_size=8"),
    ({"unknown_cost_cap": 0}, ArgumentError, r"unknown_cost_cap must be a positive int"),
])
def test_sizer_config_validation(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        config(**kwargs)


def test_sizer_config_is_frozen_and_normalised():
    cfg = config(ring_slots=np.int64(2), memory_fraction=np.float32(0.5))
    assert type(cfg.ring_slots) is int and cfg.memory_fraction == 0.5
    with pytest.raises(AttributeError):
        cfg.ring_slots = 3  # type: ignore[misc]


def test_plan_rejects_non_int_free():
    with pytest.raises(ArgumentTypeError, match=r"free_bytes must be an int of bytes, got float"):
        plan_batch_size(1.5, config())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- CostModel


def test_cost_model_recovers_a_line():
    model = CostModel()
    assert not model.has_fit and model.per_sample is None and model.intercept is None
    model.observe(32, 3 * MiB + 32 * 4096)
    model.observe(32, 3 * MiB + 32 * 4096)  # one distinct size is not enough
    assert not model.has_fit and model.predict_max_batch(GiB) is None
    for size in (64, 128, 200):
        model.observe(size, 3 * MiB + size * 4096)
    assert model.per_sample == pytest.approx(4096)
    assert model.intercept == pytest.approx(3 * MiB)
    assert model.intercept + model.per_sample * 1000 == pytest.approx(3 * MiB + 1000 * 4096)
    # floor((floor(100 MiB * 0.5) - 3 MiB) / 4096) = 12032
    assert model.predict_max_batch(100 * MiB, 0.5) == 12032
    assert model.predict_max_batch(MiB, 0.5) == 0


def test_cost_model_line_bounds_every_observation():
    rng = np.random.default_rng(0)
    model = CostModel()
    sizes = rng.integers(1, 512, size=40)
    for size in sizes:
        model.observe(int(size), int(5000 + 300 * size + rng.integers(0, 2000)))
    assert model.per_sample == pytest.approx(300, rel=0.05)
    for size in sizes:
        # never under the noise-free line
        assert model.intercept + model.per_sample * int(size) >= 5000 + 300 * size


def test_cost_model_clamps_and_bounds():
    model = CostModel(max_points=3)
    model.observe(10, 5000)
    model.observe(20, 1000)  # peak falls with size: slope clamps to 0
    assert model.per_sample == 0.0 and model.intercept == 5000
    assert model.predict_max_batch(GiB) is None  # memory sets no bound
    for size in (30, 40, 50):
        model.observe(size, size * 10)
    assert model.per_sample == pytest.approx(10) and model.intercept == pytest.approx(0)
    model.reset()
    assert not model.has_fit


def test_cost_model_forgets_a_transient():
    # Issue 16 item 9: one transient (cudnn autotuning a new shape) must not lower every later
    # plan.  Steady sizes, each step peaking at 2 MiB + 64 KiB per sample (1% noise) ...
    rng = np.random.default_rng(3)

    def steady(model: CostModel, rounds: int) -> None:
        for _ in range(rounds):
            for size in (64, 96, 128, 192, 256):
                model.observe(size, int((2 * MiB + size * 64 * 1024) * rng.uniform(1, 1.01)))

    calm, spiked = CostModel(), CostModel()
    steady(calm, 4)
    steady(spiked, 4)
    spiked.observe(200, 2 * MiB + 200 * 64 * 1024 + 500 * MiB)  # ... but one at a new size
    assert spiked.predict_max_batch(GiB) < calm.predict_max_batch(GiB) * 0.9  # careful at first
    steady(calm, 100)
    steady(spiked, 100)  # 500 steps later: the transient's excess has decayed
    assert spiked.predict_max_batch(GiB) >= calm.predict_max_batch(GiB) * 0.99
    # A size that runs again is judged by its recent peaks, not its worst one.
    spiked.observe(128, 2 * MiB + 128 * 64 * 1024 + 500 * MiB)
    for _ in range(9):
        spiked.observe(128, 2 * MiB + 128 * 64 * 1024)
    assert spiked.predict_max_batch(GiB) >= calm.predict_max_batch(GiB) * 0.99


def test_cost_model_plans_conservatively_from_nearly_equal_sizes():
    # Steady state (256) and an epoch's tail (250): the fixed part cannot be told from the
    # per-sample part; a line through two noisy points could plan any batch.
    rng = np.random.default_rng(4)
    model = CostModel()
    truth = 512 * MiB, 4 * MiB  # intercept, per sample
    for size in (256, 250) * 5:
        model.observe(size, int((truth[0] + size * truth[1]) * rng.uniform(1, 1.01)))
    largest = (64 * GiB - truth[0]) // truth[1]
    assert 0.5 * largest < model.predict_max_batch(64 * GiB, 1.0) <= largest


def test_cost_model_validation():
    model = CostModel()
    with pytest.raises(ArgumentError, match=r"batch_size must be a positive int, got 0"):
        model.observe(0, 10)
    with pytest.raises(ArgumentError, match=r"peak_bytes must be an int >= 0 of bytes, got -1"):
        model.observe(4, -1)
    with pytest.raises(ArgumentError, match=r"max_points must be an int >= 2, got 1"):
        CostModel(max_points=1)


# ----------------------------------------------------------------------------- validation


def test_validators_accept():
    assert validate_memory_fraction(1) == 1.0
    assert validate_memory_fraction(np.float64(0.25)) == 0.25
    assert validate_memory_budget(None) is None
    assert validate_memory_budget(np.int64(8 * GiB)) == 8 * GiB
    assert validate_sample_bytes(0) == 0
    assert validate_batch_bounds(2, None) == (2, None)
    assert validate_batch_bounds(2, 2) == (2, 2)
    assert SizingOptions(memory_fraction=0.5, sample_bytes=10, min_batch_size=1,
                         max_batch_size=np.int64(64)) == SizingOptions(0.5, 10, 1, 64)


@pytest.mark.parametrize("call, error, pattern", [
    (lambda: validate_memory_fraction(1.5), ArgumentError,
     r"memory_fraction must be a number in \(0, 1\].*got 1\.5"),
    (lambda: validate_memory_fraction(float("nan")), ArgumentError, r"got nan"),
    (lambda: validate_memory_fraction(True), ArgumentTypeError, r"got bool True"),
    (lambda: validate_memory_budget(0), ArgumentError,
     r"memory_budget must be a positive int of bytes .*or None.*got 0"),
    (lambda: validate_memory_budget(8e9), ArgumentTypeError,
     r"memory_budget must be a positive int .* got float 8000000000\.0"),
    (lambda: validate_sample_bytes(-2), ArgumentError, r"sample_bytes must be an int >= 0.*got -2"),
    (lambda: validate_batch_bounds(0, None), ArgumentError,
     r"min_batch_size must be a positive int, got 0"),
    (lambda: validate_batch_bounds(1, "big"), ArgumentTypeError,
     r"max_batch_size must be a positive int or None, got str 'big'"),
    (lambda: SizingOptions(sample_bytes=-1), ArgumentError, r"sample_bytes"),
])
def test_validators_reject(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_errors_are_catchable_as_builtins():
    with pytest.raises(ValueError):
        validate_memory_fraction(2.0)
    with pytest.raises(TypeError):
        validate_memory_budget("1GB")


# ----------------------------------------------------------------------------- probes


def test_fixed_probe():
    assert FixedProbe(GiB).read() == MemoryInfo(free=GiB, total=GiB, source="budget")
    info = FixedProbe(GiB, total=4 * GiB).read()
    assert (info.free, info.total, info.used) == (GiB, 4 * GiB, 3 * GiB)
    with pytest.raises(ArgumentError, match=r"memory_budget must be a positive int .*got 0"):
        FixedProbe(0)
    with pytest.raises(ArgumentError, match=r"total must be an int of bytes >= free=10"):
        FixedProbe(10, total=5)


def test_host_probe_is_sane():
    info = HostProbe().read()
    assert info.source in ("psutil", "psutil+cgroup")
    assert 0 < info.free <= info.total
    assert memory_info("cpu").source == info.source
    assert memory_info(torch.device("cpu")).total == info.total


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_host_probe_honours_cgroup_v2_limit(tmp_path):
    _write(tmp_path / "memory.max", f"{64 * MiB}\n")
    _write(tmp_path / "memory.current", f"{32 * MiB}\n")
    _write(tmp_path / "memory.stat", f"anon 1\ninactive_file {16 * MiB}\nactive_file 3\n")
    info = HostProbe(cgroup_root=tmp_path).read()
    # Reclaimable page cache (inactive_file) is not in use: working set 16 MiB, 48 MiB free.
    assert info == MemoryInfo(free=48 * MiB, total=64 * MiB, source="psutil+cgroup")
    assert HostProbe(cgroup_root=None).read().source == "psutil"


def test_host_probe_honours_cgroup_v1_limit_and_ignores_unlimited(tmp_path):
    _write(tmp_path / "memory" / "memory.limit_in_bytes", f"{64 * MiB}\n")
    _write(tmp_path / "memory" / "memory.usage_in_bytes", f"{16 * MiB}\n")
    _write(tmp_path / "memory" / "memory.stat", "inactive_file 9\ntotal_inactive_file 0\n")
    info = HostProbe(cgroup_root=tmp_path).read()
    assert info == MemoryInfo(free=48 * MiB, total=64 * MiB, source="psutil+cgroup")
    _write(tmp_path / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    assert HostProbe(cgroup_root=tmp_path).read().source == "psutil"
    (tmp_path / "memory.max").write_text("max\n")  # v2 without a limit
    assert HostProbe(cgroup_root=tmp_path).read().source == "psutil"


def test_detect_and_probe_for():
    assert MemoryProbe.detect("cpu") == HostProbe()
    assert HostProbe.detect("cuda:0", memory_budget=GiB) == FixedProbe(GiB)
    assert probe_for(torch.device("cpu"), None) == HostProbe()
    assert probe_for(torch.device("cuda", 0), 5 * GiB) == FixedProbe(5 * GiB)
    with pytest.raises(ArgumentError, match=r"memory_budget must be a positive int"):
        probe_for(torch.device("cpu"), -1)


@pytest.mark.parametrize("device, error, pattern", [
    ("mps", DeviceError, r"memory of 'mps' devices cannot be probed"),
    ("gpu7", DeviceError, r"device must be a device such as \"cpu\".*got 'gpu7'"),
    (-1, DeviceError, r"got -1"),
    (1.0, ArgumentTypeError, r"got float 1\.0"),
])
def test_memory_info_rejects_bad_devices(device, error, pattern):
    with pytest.raises(error, match=pattern):
        memory_info(device)


@needs_no_cuda
@pytest.mark.parametrize("device", ["cuda:0", "cuda", 0, torch.device("cuda", 0)])
def test_memory_info_cuda_without_cuda(device):
    with pytest.raises(DeviceError, match=r"device .*cuda.*CUDA is not available") as caught:
        memory_info(device)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, GpuLoaderError)
    with pytest.raises(DeviceError, match=r"CUDA is not available"):
        probe_for(torch.device("cuda", 0), None)


def test_nvml_probe_fails_with_a_reason():
    # Without a GPU (or NVML) the library cannot start; with one, ordinal 10000 does not exist.
    with pytest.raises(MemoryProbeError, match=r"NVML|not visible"):
        NvmlProbe(10_000).read()
    with pytest.raises(ArgumentError, match=r"index must be a CUDA ordinal >= 0, got -1"):
        NvmlProbe(-1)


class FakeNvml:
    """Just enough of pynvml for NvmlProbe: physical GPUs with UUIDs and memory."""

    class NVMLError(Exception):
        pass

    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self, gpus: list) -> None:
        self.gpus = gpus  # (uuid, free, total, mig_enabled)

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.gpus):
            raise self.NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return self.gpus[handle][0].encode()  # older pynvml returns bytes

    def nvmlDeviceGetMigMode(self, handle: int) -> list:
        return [int(self.gpus[handle][3]), 0]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> object:
        _, free, total, _ = self.gpus[handle]
        return type("Memory", (), {"free": free, "total": total, "used": total - free})()


FAKE_GPUS = [("GPU-aaaa-0000", 10, 100, False), ("GPU-bbbb-1111", 20, 200, False),
             ("GPU-cccc-2222", 30, 300, True)]


@pytest.mark.parametrize("visible, index, expected", [
    (None, 1, 20), ("1,0", 0, 20), ("0, 1", 1, 20), ("GPU-bbbb", 0, 20), ("GPU-aaaa-0000", 0, 10),
])
def test_nvml_probe_maps_cuda_ordinals(monkeypatch, visible, index, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    info = NvmlProbe(index, library=FakeNvml(FAKE_GPUS)).read()
    assert info == MemoryInfo(free=expected, total=expected * 10, source="nvml")


@pytest.mark.parametrize("visible, index, pattern", [
    ("1", 1, r"cuda:1 is not visible: CUDA_VISIBLE_DEVICES='1' lists 1 device"),
    ("2", 0, r"cuda:0 is a GPU in MIG mode"),
    ("MIG-1234", 0, r"cuda:0 is the MIG instance MIG-1234"),
    ("GPU-ffff", 0, r"no GPU has the UUID 'GPU-ffff'"),
    ("7", 0, r"NVML could not read the memory of cuda:0: NVMLError: Invalid Argument"),
    ("", 0, r"cuda:0 is not visible"),
])
def test_nvml_probe_refusals(monkeypatch, visible, index, pattern):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(MemoryProbeError, match=pattern):
        NvmlProbe(index, library=FakeNvml(FAKE_GPUS)).read()


@needs_no_cuda
def test_cuda_probe_without_cuda_says_what_to_do():
    with pytest.raises(MemoryProbeError, match=r"without creating a CUDA context.*memory_budget="):
        CudaProbe(0).read()
    with pytest.raises(MemoryProbeError, match=r"CUDA is not available.*memory_budget="):
        CudaProbe(0, init_cuda=True).read()
    assert not torch.cuda.is_initialized()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_probe_on_a_gpu():
    info = memory_info("cuda:0", init_cuda=True)
    assert 0 < info.free <= info.total
    torch.cuda.init()
    probe = CudaProbe(0)
    before = probe.read()
    assert before.source == "torch.cuda.mem_get_info+cache"
    block = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda:0")
    del block  # cached by the allocator: still ours, so still counted as free
    after = probe.read()
    assert abs(after.free - before.free) < 32 * MiB
