"""Issue 15's loader defects: one consumer per iterator, all-or-nothing load_state_dict, the
arguments torch leaves unchecked, nested tensors, torch's iterator attributes, which path."""
from __future__ import annotations

import threading
from typing import Any, List

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import gpuloader as gl
from gpuloader.errors import ArgumentError, ArgumentTypeError
from gpuloader.stats import SIZE_HISTORY


def _tensors(n: int = 20) -> TensorDataset:
    return TensorDataset(torch.arange(2 * n, dtype=torch.float32).reshape(n, 2),
                         torch.arange(n))


class _Gate:
    """Blocks the first call inside ``next()`` until released (events, no sleeps)."""

    def __init__(self) -> None:
        self.entered, self.release, self.first = threading.Event(), threading.Event(), True

    def wait_once(self) -> None:
        if self.first:
            self.first = False
            self.entered.set()
            self.release.wait(30)


class _GatedDataset(Dataset):
    def __init__(self, gate: _Gate) -> None:
        self.gate = gate

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        self.gate.wait_once()
        return i


def _gated_loader(path: str, gate: _Gate) -> gl.DataLoader:
    if path == "generic":
        return gl.DataLoader(_GatedDataset(gate), batch_size=2)

    def collate(samples: List[Any]) -> Any:  # the fast path runs it inside next()
        gate.wait_once()
        return torch.utils.data.default_collate(samples)

    return gl.DataLoader(_tensors(8), batch_size=2, collate_fn=collate)


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_one_iterator_from_two_threads_is_a_value_error(path: str) -> None:
    gate = _Gate()
    loader = _gated_loader(path, gate)
    assert loader.stats()["path"] == path
    iterator = iter(loader)
    first: List[Any] = []
    other = threading.Thread(target=lambda: first.append(next(iterator)))
    other.start()
    assert gate.entered.wait(30)
    with pytest.raises(ValueError, match="generator already executing"):
        next(iterator)
    gate.release.set()
    other.join(30)
    rest = list(iterator)
    labels = [b[1] if path == "fast" else b for b in first + rest]  # fast: [x, y] batches
    delivered = [int(i) for batch in labels for i in batch]
    assert sorted(delivered) == list(range(8))  # exactly once: the refused call took nothing
    loader.close()


def test_load_state_dict_checks_everything_before_changing_anything() -> None:
    with gl.DataLoader(_tensors(), batch_size=4, shuffle=True, seed=1) as loader:
        iterator = iter(loader)
        next(iterator)
        before = loader.state_dict()
        other = gl.DataLoader(_tensors(), batch_size=4, shuffle=True, seed=1)
        for _ in range(3):
            next(iter(other))
        bad = other.state_dict()
        bad["sizing"] = {"current": "x", "cooldown": 16}
        with pytest.raises((ValueError, TypeError), match="current"):
            loader.load_state_dict(bad)
        assert loader.state_dict() == before
        bad["sizing"] = {"current": 4, "cooldown": -3}
        with pytest.raises(ValueError, match="cooldown"):
            loader.load_state_dict(bad)
        assert loader.state_dict() == before
        other.close()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(reuse_buffers="no"), TypeError, r"reuse_buffers must be True or False, got 'no'"),
    (dict(num_workers=1.5), TypeError, r"num_workers option should be an int >= 0; got 1.5"),
    (dict(prefetch_depth=10 ** 9), ValueError, r"prefetch_depth must be an int in 0..64"),
])
def test_options_torch_leaves_unchecked(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        gl.DataLoader(_tensors(), batch_size=2, **kwargs)


def test_a_sampler_yielding_floats_is_refused_not_truncated() -> None:
    loader = gl.DataLoader(_tensors(), batch_size=2, sampler=[0, 1.7, 2, 3])
    with pytest.raises(ArgumentTypeError, match=r"sampler yielded 1.7; samplers must yield int"):
        list(loader)


def test_an_empty_batch_from_a_batch_sampler_is_refused_not_skipped() -> None:
    loader = gl.DataLoader(_tensors(), batch_sampler=[[0, 1], [], [2]])
    with pytest.raises(ArgumentError, match=r"batch_sampler yielded an empty batch \(batch 1"):
        list(loader)


def test_a_memory_budget_too_small_for_one_sample_is_an_error() -> None:
    ds = gl.ArrayDataset(x=torch.zeros(100, 64))
    with pytest.raises(ArgumentError, match=r"memory_budget=10 bytes cannot hold "
                                            r"min_batch_size=1 sample\(s\)"):
        gl.DataLoader(ds, batch_size="auto", memory_budget=10)


class _Nested(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.nested.nested_tensor([torch.ones(i + 1), torch.zeros(2)])


def test_nested_tensor_samples_on_the_generic_path_work_as_in_torch() -> None:
    ours = list(gl.DataLoader(_Nested(), batch_size=None))
    theirs = list(torch.utils.data.DataLoader(_Nested(), batch_size=None))
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        assert all(torch.equal(x, y) for x, y in zip(a.unbind(), b.unbind()))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_iterators_expose_torchs_worker_attributes(num_workers: int) -> None:
    it = iter(gl.DataLoader(list(range(8)), batch_size=2, num_workers=num_workers))
    assert len(it._workers) == num_workers and it._pin_memory_thread is None
    fast = iter(gl.DataLoader(_tensors(), batch_size=2, num_workers=num_workers))
    assert fast._workers == [] and fast._pin_memory_thread is None
    del it, fast


def test_which_path_shows_in_stats_and_repr() -> None:
    fast = gl.DataLoader(_tensors(), batch_size=4)
    generic = gl.DataLoader(list(range(10)), batch_size=4)
    assert fast.stats()["path"] == "fast" and generic.stats()["path"] == "generic"
    assert "path='fast'" in repr(fast) and "path='generic'" in repr(generic)


def test_batch_size_history_stays_bounded_over_many_epochs() -> None:
    with gl.DataLoader(_tensors(10), batch_size=3) as loader:  # sizes 3, 3, 3, 1 per epoch
        for _ in range(300):
            for _ in loader:
                pass
        sizes = loader.stats()["batch_sizes"]
    assert len(sizes) <= SIZE_HISTORY and sizes[-2:] == [3, 1]
    assert np.sum(sizes) > 0


def test_auto_reports_a_batch_of_the_whole_dataset() -> None:
    """NOTE(auto-whole-dataset): on a CPU, auto alone makes one batch of a small dataset."""
    ds = gl.ArrayDataset(x=torch.zeros(100, 4), y=torch.zeros(100))
    with pytest.warns(UserWarning, match=r'batch_size="auto" chose 100: every sample'):
        gl.DataLoader(ds, batch_size="auto")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gl.DataLoader(ds, batch_size="auto", max_batch_size=16)  # bounded: nothing to say


# -- defect 1: Ctrl-C on the fast path ---------------------------------------------------------

ROWS = 600


def _wide() -> gl.ArrayDataset:
    """Batches of 64 rows of 1 KiB: above the inline size, so reader threads read ahead."""
    return gl.ArrayDataset(x=np.arange(ROWS * 256, dtype=np.float32).reshape(ROWS, 256),
                           y=np.arange(ROWS))


def _interrupted_epoch(loader: gl.DataLoader, at_submit: int) -> tuple:
    """Iterate one epoch with a KeyboardInterrupt raised by the ``at_submit``-th read-ahead
    submission (where Ctrl-C lands in ``__next__``); returns (labels before it, state, iterator)."""
    iterator = iter(loader)
    pool = iterator.res.pool
    real, calls = pool.submit, [0]

    def submit(job: Any) -> None:
        calls[0] += 1
        if calls[0] == at_submit:
            raise KeyboardInterrupt
        real(job)

    pool.submit = submit
    seen: List[int] = []
    with pytest.raises(KeyboardInterrupt):
        for batch in iterator:
            seen.extend(batch["y"].tolist())
    return seen, loader.state_dict(), iterator


@pytest.mark.parametrize("at_submit", [1, 2, 3, 4, 6, 9])
def test_ctrl_c_during_read_ahead_loses_no_batch(at_submit: int) -> None:
    """NOTE(atomic-delivery): after the interrupt, the same iterator -- or a resume from
    state_dict() -- delivers exactly the samples not yet delivered."""
    with gl.DataLoader(_wide(), batch_size=64, shuffle=True, seed=3) as loader:
        seen, state, iterator = _interrupted_epoch(loader, at_submit)
        rest = [i for batch in iterator for i in batch["y"].tolist()]
        assert sorted(seen + rest) == list(range(ROWS))
    with gl.DataLoader(_wide(), batch_size=64, shuffle=True, seed=3) as resumed:
        resumed.load_state_dict(state)
        rest = [i for batch in resumed for i in batch["y"].tolist()]
    assert sorted(seen + rest) == list(range(ROWS))
