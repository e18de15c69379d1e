"""oom_guard's handling of gradients, memory and peaks, with the recording CUDA stand-in
(tests/cuda_standin.py) as the device's allocator: no GPU needed."""
from __future__ import annotations

import warnings
import weakref

import numpy as np
import pytest
import torch

import gpuloader as gl
from cuda_standin import FakeCuda
from gpuloader.allocator import StepMemory

CUDA0 = torch.device("cuda", 0)


def simulated_oom() -> RuntimeError:
    return RuntimeError("CUDA out of memory (simulated)")


def loader_on(n: int = 32, **kwargs) -> gl.DataLoader:
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    return gl.DataLoader(gl.ArrayDataset(x=x, i=np.arange(n)), **kwargs)


def test_a_model_given_to_the_guard_has_its_partial_gradients_zeroed():
    model = torch.nn.Linear(2, 1)
    with loader_on(batch_size=8) as loader:
        seen = []
        for batch in loader:
            with loader.oom_guard(model) as guard:
                model(batch["x"]).sum().backward()       # gradients accumulate ...
                if len(batch["i"]) == 8:
                    raise simulated_oom()                # ... then backward runs out
            if guard.failed:
                assert all(p.grad is None for p in model.parameters())
            else:
                seen.extend(batch["i"].tolist())
                model.zero_grad()
    assert sorted(seen) == list(range(32))


def test_a_guard_with_nothing_to_zero_warns_once_naming_the_fix():
    with loader_on(batch_size=8) as loader:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for batch in loader:
                with loader.oom_guard():
                    if len(batch["i"]) > 2:
                        raise simulated_oom()
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "loader.oom_guard(optimizer)" in messages[0]
    with pytest.raises(TypeError, match=r"optimizer must be something with zero_grad\(\)"):
        loader.oom_guard(optimizer=3)


class Recorder(StepMemory):
    """StepMemory on the fake device that checks, when the guard frees memory, that the failed
    step's activations are already gone."""

    def __init__(self, fake: FakeCuda, *, learn: bool) -> None:
        super().__init__(CUDA0, learn=learn, cuda=fake)
        self.fake = fake
        self.activations = None
        self.alive_at_release = []

    def release(self) -> None:
        self.alive_at_release.append(self.activations() is not None)
        super().release()


class LoggingOptimizer:
    def __init__(self, fake: FakeCuda) -> None:
        self.fake = fake

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.fake.log.append(("zero_grad",))


def test_a_step_in_a_function_is_freed_before_the_guard_releases_and_replans():
    fake = FakeCuda()
    memory = Recorder(fake, learn=False)

    def step(batch):
        activations = torch.ones(1000)                   # the failed step's working memory
        memory.activations = weakref.ref(activations)
        raise simulated_oom()

    with loader_on(batch_size=8) as loader:
        loader._memory = memory
        batch = next(iter(loader))
        with loader.oom_guard(LoggingOptimizer(fake)) as guard:
            step(batch)
    assert guard.failed and memory.alive_at_release == [False]
    # Gradients are zeroed before the cache is emptied, so the re-plan sees them gone too.
    assert fake.index(("zero_grad",)) < fake.index(("empty_cache",))


def test_fixed_batch_sizes_leave_the_peak_statistics_alone():
    fake = FakeCuda()
    fake.stats = {"allocated_bytes.all.current": 10, "allocated_bytes.all.peak": 99}
    with loader_on(batch_size=8) as loader:
        loader._memory = StepMemory(CUDA0, learn=False, cuda=fake)
        for _ in loader:
            with loader.oom_guard():
                pass
        assert not fake.entries("reset_peak") and fake.stats["allocated_bytes.all.peak"] == 99
        assert loader.stats()["max_memory_allocated"] == 99


def test_auto_learns_step_peaks_and_keeps_the_users_running_peak():
    fake = FakeCuda()
    fake.stats = {"allocated_bytes.all.current": 10, "allocated_bytes.all.peak": 99}
    with loader_on(30, batch_size="auto", max_batch_size=8, memory_budget=1 << 20) as loader:
        loader._memory = StepMemory(CUDA0, learn=True, cuda=fake)
        for batch in loader:
            with loader.oom_guard():
                fake.stats["allocated_bytes.all.peak"] = 10 + 5 * len(batch["i"])
        assert len(fake.entries("reset_peak")) == 4
        assert loader.stats()["max_memory_allocated"] == 99   # the user's peak survives
        assert loader.cost_model.per_sample == pytest.approx(5)  # sizes 8 and the tail's 6
