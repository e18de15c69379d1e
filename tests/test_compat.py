"""Drop-in compatibility: the same scenarios through torch's DataLoader and gpuloader's.

Every comparison builds both loaders from the same arguments (made fresh for each, so stateful
samplers and generators start equal), resets torch's global RNG before each, and asserts the
batches are identical: container types, keys, tensor dtypes, shapes and values, strings.

gpuloader's fast path (ArrayDataset, TensorDataset, Subset of either) must give torch's batches
exactly for sequential orders, explicit samplers and batch samplers; only its own shuffled
orders differ from torch's RandomSampler permutation (they are seeded and checked separately).
"""
from __future__ import annotations

import collections
import gc
import math
import multiprocessing
import os
import runpy
import subprocess
import sys
import textwrap
import traceback
import typing
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import h5py
import numpy as np
import pytest
import torch
import torch.utils.data as tud

import gpuloader as gl

N = 23  # a prime: every batch size below leaves a short tail
WORKERS = [0, 2]
HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------ comparing batches
def assert_same(ours: Any, theirs: Any, where: str = "batches") -> None:
    """Exact structural equality: same types all the way down, same tensors bit for bit."""
    assert type(ours) is type(theirs), \
        f"{where}: gpuloader gave {type(ours).__name__}, torch gave {type(theirs).__name__}"
    if isinstance(theirs, torch.Tensor):
        assert ours.dtype == theirs.dtype, f"{where}: dtype {ours.dtype} != {theirs.dtype}"
        assert ours.shape == theirs.shape, f"{where}: shape {ours.shape} != {theirs.shape}"
        assert ours.device == theirs.device, f"{where}: device {ours.device} != {theirs.device}"
        assert ours.requires_grad == theirs.requires_grad, f"{where}: requires_grad differs"
        assert torch.equal(ours, theirs), f"{where}: values differ\n{ours}\n{theirs}"
    elif isinstance(theirs, np.ndarray):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, where
        assert np.array_equal(ours, theirs), f"{where}: values differ"
    elif isinstance(theirs, collections.abc.Mapping):
        assert list(ours) == list(theirs), f"{where}: keys {list(ours)} != {list(theirs)}"
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), f"{where}: length {len(ours)} != {len(theirs)}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


def run_epochs(cls: type, dataset: Any, kwargs: Dict[str, Any], epochs: int = 1,
               seed: int = 0) -> List[List[Any]]:
    """All batches of ``epochs`` epochs of ``cls(dataset, **kwargs)``, after torch.manual_seed."""
    torch.manual_seed(seed)
    loader = cls(dataset, **kwargs)
    try:
        return [list(loader) for _ in range(epochs)]
    finally:
        if isinstance(loader, gl.DataLoader):
            loader.close()


def compare(dataset: Any, make: Callable[[], Dict[str, Any]] = dict, *, epochs: int = 1,
            reference: Any = None, seed: int = 0,
            extras: Optional[Dict[str, Any]] = None) -> List[List[Any]]:
    """Assert gpuloader gives torch's batches; ``make()`` builds fresh kwargs for each loader.

    ``reference`` is the dataset torch's loader reads (default: the same ``dataset``);
    ``extras`` are gpuloader-only keyword arguments.
    """
    theirs = run_epochs(tud.DataLoader, dataset if reference is None else reference, make(),
                        epochs, seed)
    ours = run_epochs(gl.DataLoader, dataset, dict(make(), **(extras or {})), epochs, seed)
    assert_same(ours, theirs)
    return ours


def test_assert_same_is_strict():
    with pytest.raises(AssertionError):
        assert_same([torch.tensor([1])], (torch.tensor([1]),))
    with pytest.raises(AssertionError):
        assert_same(torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(AssertionError):
        assert_same({"a": 1, "b": 2}, {"b": 2, "a": 1})
    with pytest.raises(AssertionError):
        assert_same(["a"], ["b"])
    with pytest.raises(AssertionError):
        assert_same(torch.ones(2, 1), torch.ones(2))


# ------------------------------------------------------------------------ datasets
Point = collections.namedtuple("Point", "x y")


class Boom(Exception):
    """Raised by a dataset on purpose."""


def make_sample(kind: str, i: int) -> Any:
    if kind == "dict":
        return {"x": torch.full((2,), float(i)), "label": i, "name": f"s{i}"}
    if kind == "nested":
        return {"a": {"b": torch.tensor([i, -i]), "c": {"d": i / 2}}, "meta": {"id": str(i)}}
    if kind == "namedtuple":
        return Point(x=torch.tensor(i, dtype=torch.int16), y=np.float64(i) * 1.5)
    if kind == "string":
        return f"item-{i}"
    if kind == "number":
        return (i, i * 0.25, i % 2 == 0)
    if kind == "numpy":
        return np.arange(3, dtype=np.int16) + i, np.float32(i), np.array(i, dtype=np.uint8)
    if kind == "mixed":
        return [torch.ones(2, 2) * i, f"m{i}", b"raw", {"k": (i, "v")}]
    raise ValueError(kind)


KINDS = ["dict", "nested", "namedtuple", "string", "number", "numpy", "mixed"]


class MapDataset(tud.Dataset):
    """A map-style dataset of python/numpy/torch samples: the generic path."""

    def __init__(self, kind: str = "dict", n: int = N) -> None:
        self.kind, self.n = kind, n
        self.offset = 0  # set per worker by worker_init_fn in one test

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range")
        if self.kind == "worker":
            info = tud.get_worker_info()
            return {"i": i, "offset": self.offset, "worker": -1 if info is None else info.id}
        if self.kind == "pid":
            return {"i": i, "pid": os.getpid()}
        if self.kind == "fail":
            if i == 7:
                raise Boom(f"sample {i} is broken")
            return i
        if self.kind == "keyfail":
            if i == 5:
                raise KeyError(f"no key for {i}")
            return i
        return make_sample(self.kind, i)


class Stream(tud.IterableDataset):
    """An iterable dataset that shards itself over workers with get_worker_info()."""

    def __init__(self, n: int = N, shard: bool = True) -> None:
        self.n, self.shard = n, shard

    def __iter__(self):
        info = tud.get_worker_info()
        first, step = (0, 1) if info is None or not self.shard else (info.id, info.num_workers)
        for i in range(first, self.n, step):
            yield {"i": i, "worker": -1 if info is None else info.id, "sq": torch.tensor(i * i)}


class SizedStream(Stream):
    def __len__(self) -> int:
        return self.n


def arrays(n: int = N) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((n, 3)).astype(np.float32),
        "y": np.arange(n, dtype=np.int64),
        "m": rng.integers(0, 2, (n, 2)).astype(bool),
        "h": rng.standard_normal(n).astype(np.float16),
        "u": rng.integers(0, 255, (n, 4, 2)).astype(np.uint8),
        "d": rng.standard_normal(n),
    }


def tensor_dataset(n: int = N) -> tud.TensorDataset:
    return tud.TensorDataset(*(torch.from_numpy(a) for a in arrays(n).values()))


class DictTensors(tud.Dataset):
    """What a named ArrayDataset's samples are, written the plain torch way."""

    def __init__(self, columns: Dict[str, np.ndarray]) -> None:
        self.columns = {k: torch.from_numpy(v) for k, v in columns.items()}

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def collate_summary(samples: List[Any]) -> Dict[str, Any]:
    """A user collate_fn: keeps the raw first sample and counts."""
    return {"n": len(samples), "first": samples[0], "all": tud.default_collate(samples)}


def identity(samples: List[Any]) -> List[Any]:
    return samples


def init_worker(worker_id: int) -> None:
    info = tud.get_worker_info()
    assert info is not None and info.id == worker_id
    info.dataset.offset = 1000 * (worker_id + 1)


def check_in_worker(worker_id: int) -> None:
    assert tud.get_worker_info() is not None


# ------------------------------------------------------------------------ the generic path
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
@pytest.mark.parametrize("drop_last", [False, True])
def test_map_style_samples_collate_like_torch(kind, batch_size, drop_last):
    compare(MapDataset(kind), lambda: dict(batch_size=batch_size, drop_last=drop_last))


@pytest.mark.parametrize("kind", ["dict", "nested", "namedtuple", "string", "numpy"])
def test_map_style_with_workers(kind):
    compare(MapDataset(kind), lambda: dict(batch_size=3, num_workers=2))


def test_defaults_are_sequential_batches_of_one():
    ours = compare(MapDataset("number"))
    assert len(ours[0]) == N


@pytest.mark.parametrize("num_workers", WORKERS)
def test_batch_size_none_returns_samples(num_workers):
    compare(MapDataset("nested"), lambda: dict(batch_size=None, num_workers=num_workers))
    compare(tensor_dataset(), lambda: dict(batch_size=None, num_workers=num_workers))


@pytest.mark.parametrize("num_workers", WORKERS)
def test_shuffle_with_same_generator_seed_matches_torch(num_workers):
    compare(MapDataset("dict"), lambda: dict(
        batch_size=4, shuffle=True, num_workers=num_workers,
        generator=torch.Generator().manual_seed(5)), epochs=2)


def test_shuffle_with_global_seed_matches_torch():
    compare(MapDataset("dict"), lambda: dict(batch_size=4, shuffle=True), epochs=2, seed=11)


# ------------------------------------------------------------------------ the fast path
def fast_datasets() -> Dict[str, Any]:
    cols = arrays()
    positional = gl.ArrayDataset(*cols.values())
    return {"tensor": tensor_dataset(), "array": positional}


@pytest.mark.parametrize("which", ["tensor", "array"])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
@pytest.mark.parametrize("drop_last", [False, True])
def test_fast_path_equals_torch_on_tensordataset(which, batch_size, drop_last):
    ds = fast_datasets()[which]
    loader = gl.DataLoader(ds, batch_size=batch_size)
    assert loader._view is not None, "expected the fast path"
    loader.close()
    compare(ds, lambda: dict(batch_size=batch_size, drop_last=drop_last),
            reference=tensor_dataset(), epochs=2)


@pytest.mark.parametrize("num_workers", WORKERS)
def test_fast_path_with_num_workers_gives_torchs_batches(num_workers):
    compare(fast_datasets()["array"], lambda: dict(batch_size=5, num_workers=num_workers),
            reference=tensor_dataset())


@pytest.mark.parametrize("batch_size", [1, 4])
def test_named_array_dataset_batches_are_dicts_like_torch(batch_size):
    cols = arrays()
    named = gl.ArrayDataset(**cols)
    compare(named, lambda: dict(batch_size=batch_size), reference=DictTensors(cols))
    compare(named, lambda: dict(batch_size=batch_size))  # torch on the ArrayDataset itself


@pytest.mark.parametrize("indices", [[4, 2, 9, 9, 0, -1, 13], list(range(N - 1, -1, -3))])
@pytest.mark.parametrize("which", ["tensor", "array"])
def test_subset_equals_torch(which, indices):
    ds = tud.Subset(fast_datasets()[which], indices)
    nested = tud.Subset(ds, list(range(len(indices) - 1, -1, -1)))
    for subset in (ds, nested):
        reference = tud.Subset(tensor_dataset(), indices)
        if subset is nested:
            reference = tud.Subset(reference, nested.indices)
        compare(subset, lambda: dict(batch_size=3), reference=reference)


def test_tensors_the_fast_path_cannot_read_fall_back_to_torch():
    half = torch.arange(10, dtype=torch.bfloat16).reshape(10, 1)
    grad = torch.arange(10.0).requires_grad_()
    for ds in (tud.TensorDataset(half, torch.arange(10)), tud.TensorDataset(grad)):
        compare(ds, lambda: dict(batch_size=4))


class Doubled(tud.TensorDataset):
    """A TensorDataset subclass that changes its samples: must not take the fast path."""

    def __getitem__(self, i):
        return tuple(t[i] * 2 for t in self.tensors)


def test_overridden_getitem_is_honoured():
    ds = Doubled(torch.arange(10.0), torch.arange(10))
    compare(ds, lambda: dict(batch_size=4))
    compare(tud.Subset(ds, [3, 1, 2]), lambda: dict(batch_size=2))


def test_empty_dataset_gives_no_batches():
    compare(tud.TensorDataset(torch.empty(0, 3)), lambda: dict(batch_size=4))
    assert len(gl.DataLoader(tud.TensorDataset(torch.empty(0, 3)), batch_size=4)) == 0


# ------------------------------------------------------------------------ samplers
def sampler_factories(n: int) -> Dict[str, Callable[[Any], Any]]:
    return {
        "list-with-repeats": lambda ds: [5, 3, 3, 0, n - 1, 1, 8],
        "sequential": lambda ds: tud.SequentialSampler(ds),
        "random-global-rng": lambda ds: tud.RandomSampler(ds),
        "random-replacement": lambda ds: tud.RandomSampler(
            ds, replacement=True, num_samples=11, generator=torch.Generator().manual_seed(7)),
        "subset-random": lambda ds: tud.SubsetRandomSampler(
            [1, 4, 6, 10, 12], generator=torch.Generator().manual_seed(3)),
        "weighted": lambda ds: tud.WeightedRandomSampler([1.0] * (n - 3) + [9.0] * 3, 12),
    }


@pytest.mark.parametrize("name", list(sampler_factories(N)))
@pytest.mark.parametrize("path", ["fast", "generic"])
def test_custom_sampler(name, path):
    ds = tensor_dataset() if path == "fast" else MapDataset("dict")
    factory = sampler_factories(N)[name]
    compare(ds, lambda: dict(batch_size=3, sampler=factory(ds)), epochs=2)


def test_sampler_and_loader_share_a_generator():
    ds = tensor_dataset()

    def make():
        g = torch.Generator().manual_seed(1)
        return dict(batch_size=4, sampler=tud.RandomSampler(ds, generator=g), generator=g)

    compare(ds, make, epochs=3)


def batch_sampler_factories() -> Dict[str, Callable[[Any], Any]]:
    return {
        "lists": lambda ds: [[0, 1, 2], [5, 4], [9, 8, 7, 6], [3], [22, 22]],
        "batch-sampler-random": lambda ds: tud.BatchSampler(tud.RandomSampler(ds), 4, True),
        "batch-sampler-seq": lambda ds: tud.BatchSampler(tud.SequentialSampler(ds), 5, False),
    }


@pytest.mark.parametrize("name", list(batch_sampler_factories()))
@pytest.mark.parametrize("path", ["fast", "generic"])
def test_custom_batch_sampler(name, path):
    ds = tensor_dataset() if path == "fast" else MapDataset("dict")
    factory = batch_sampler_factories()[name]
    ours = compare(ds, lambda: dict(batch_sampler=factory(ds)), epochs=2)
    loader = gl.DataLoader(ds, batch_sampler=factory(ds))
    assert loader.batch_size is None and loader.drop_last is False
    assert len(loader) == len(tud.DataLoader(ds, batch_sampler=factory(ds)))
    assert len(ours[0]) == len(loader)
    loader.close()


def test_out_of_range_sampler_index_raises_index_error_on_both_paths():
    for ds in (tensor_dataset(), MapDataset("dict")):
        for cls in (tud.DataLoader, gl.DataLoader):
            with pytest.raises(IndexError):
                list(cls(ds, sampler=[0, N + 5], batch_size=2))


# ------------------------------------------------------------------------ collate_fn
@pytest.mark.parametrize("collate", [collate_summary, identity])
@pytest.mark.parametrize("num_workers", WORKERS)
def test_user_collate_fn_on_every_path(collate, num_workers):
    cols = arrays()
    kw = lambda: dict(batch_size=4, collate_fn=collate, num_workers=num_workers)  # noqa: E731
    compare(tensor_dataset(), kw)
    compare(gl.ArrayDataset(*cols.values()), kw, reference=tensor_dataset())
    compare(gl.ArrayDataset(**cols), kw, reference=DictTensors(cols))
    compare(MapDataset("nested"), kw)


# ------------------------------------------------------------------------ IterableDataset
@pytest.mark.parametrize("num_workers", WORKERS)
@pytest.mark.parametrize("batch_size, drop_last",
                         [(1, False), (3, False), (3, True), (None, False)])
def test_iterable_dataset(num_workers, batch_size, drop_last):
    ours = compare(Stream(), lambda: dict(batch_size=batch_size, drop_last=drop_last,
                                          num_workers=num_workers), epochs=2)
    if num_workers and batch_size is not None:  # sharded by get_worker_info(), no repeats
        seen = sorted(int(i) for batch in ours[0] for i in batch["i"])
        assert len(seen) == len(set(seen))
        assert {int(w) for batch in ours[0] for w in batch["worker"]} == {0, 1}


def test_iterable_dataset_without_sharding_repeats_per_worker_like_torch():
    compare(Stream(n=5, shard=False), lambda: dict(batch_size=2, num_workers=2))


@pytest.mark.parametrize("batch_size, drop_last",
                         [(None, False), (1, False), (4, False), (4, True)])
def test_len_of_sized_iterable_dataset(batch_size, drop_last):
    kw = dict(batch_size=batch_size, drop_last=drop_last)
    assert len(gl.DataLoader(SizedStream(), **kw)) == len(tud.DataLoader(SizedStream(), **kw))


# ------------------------------------------------------------------------ len()
LEN_CASES = [
    dict(), dict(batch_size=4), dict(batch_size=4, drop_last=True), dict(batch_size=None),
    dict(batch_size=5, shuffle=True), dict(batch_size=7, drop_last=True, shuffle=True),
    dict(batch_size=2, sampler=[1, 2, 3]), dict(batch_sampler=[[0, 1], [2], [3, 4, 5]]),
    dict(batch_size=N + 4), dict(batch_size=N + 4, drop_last=True),
]


@pytest.mark.parametrize("kwargs", LEN_CASES, ids=[str(k) for k in LEN_CASES])
def test_len(kwargs):
    for ds in (tensor_dataset(), MapDataset("dict"), gl.ArrayDataset(**arrays())):
        expected = len(tud.DataLoader(ds, **kwargs))
        with gl.DataLoader(ds, **kwargs) as loader:
            assert len(loader) == expected
            assert len(list(loader)) == expected


def test_len_of_unsized_iterable_dataset_is_torch_error():
    with pytest.raises(TypeError):
        len(tud.DataLoader(Stream()))
    with pytest.raises(TypeError):
        len(gl.DataLoader(Stream()))


def test_attributes_match_torch():
    for ds in (tensor_dataset(), MapDataset("dict")):
        for kwargs in (dict(batch_size=4, drop_last=True), dict(batch_size=None),
                       dict(batch_sampler=[[0, 1]]), dict(num_workers=2, prefetch_factor=3)):
            theirs, ours = tud.DataLoader(ds, **kwargs), gl.DataLoader(ds, **kwargs)
            for name in ("batch_size", "drop_last", "num_workers", "prefetch_factor",
                         "pin_memory", "timeout", "persistent_workers", "in_order",
                         "dataset", "generator", "worker_init_fn"):
                assert getattr(ours, name) == getattr(theirs, name), name
            assert ours.collate_fn is theirs.collate_fn
            ours.close()


# ------------------------------------------------------------------------ errors
def bad_argument_cases():
    ds = tensor_dataset()
    return {
        "num_workers=-1": (ds, dict(num_workers=-1)),
        "timeout=-1": (ds, dict(timeout=-1)),
        "prefetch_factor without workers": (ds, dict(prefetch_factor=2)),
        "negative prefetch_factor": (ds, dict(num_workers=2, prefetch_factor=-1)),
        "persistent_workers without workers": (ds, dict(persistent_workers=True)),
        "shuffle with sampler": (ds, dict(shuffle=True, sampler=[0, 1])),
        "batch_sampler with batch_size": (ds, dict(batch_sampler=[[0]], batch_size=2)),
        "batch_sampler with shuffle": (ds, dict(batch_sampler=[[0]], shuffle=True)),
        "batch_sampler with sampler": (ds, dict(batch_sampler=[[0]], sampler=[0])),
        "batch_sampler with drop_last": (ds, dict(batch_sampler=[[0]], drop_last=True)),
        "batch_size=None with drop_last": (ds, dict(batch_size=None, drop_last=True)),
        "batch_size=0": (ds, dict(batch_size=0)),
        "batch_size=-3": (ds, dict(batch_size=-3)),
        "batch_size=str": (ds, dict(batch_size="big")),
        "batch_size=float": (ds, dict(batch_size=2.0)),
        "batch_size=True": (ds, dict(batch_size=True)),
        "bad start method": (ds, dict(num_workers=2, multiprocessing_context="nope")),
        "context without workers": (ds, dict(multiprocessing_context="fork")),
        "bad context type": (ds, dict(num_workers=2, multiprocessing_context=3)),
        "iterable with shuffle": (Stream(), dict(shuffle=True)),
        "iterable with sampler": (Stream(), dict(sampler=[0])),
        "iterable with batch_sampler": (Stream(), dict(batch_sampler=[[0]])),
    }


def raised(fn: Callable[[], Any]) -> BaseException:
    with pytest.raises(Exception) as info:
        fn()
    return info.value


@pytest.mark.parametrize("case", list(bad_argument_cases()))
@pytest.mark.parametrize("path", ["fast", "generic"])
def test_bad_arguments_raise_torchs_error(case, path):
    ds, kwargs = bad_argument_cases()[case]
    if path == "generic" and not isinstance(ds, tud.IterableDataset):
        ds = MapDataset("dict")
    theirs = raised(lambda: tud.DataLoader(ds, **kwargs))
    ours = raised(lambda: gl.DataLoader(ds, **kwargs))
    assert isinstance(ours, type(theirs)), f"{type(ours)} is not a {type(theirs)}"
    assert str(theirs) in str(ours)


@pytest.mark.parametrize("attr, value", [("batch_size", 3), ("sampler", [0]), ("drop_last", True),
                                         ("dataset", None), ("batch_sampler", None),
                                         ("persistent_workers", True)])
def test_setting_attributes_after_init_is_refused_like_torch(attr, value):
    for ds in (tensor_dataset(), MapDataset("dict")):
        theirs = raised(lambda: setattr(tud.DataLoader(ds), attr, value))
        ours = raised(lambda: setattr(gl.DataLoader(ds), attr, value))
        assert type(ours) is type(theirs) and str(ours) == str(theirs)


@pytest.mark.parametrize("num_workers", WORKERS)
@pytest.mark.parametrize("kind, error, text", [("fail", Boom, "sample 7 is broken"),
                                               ("keyfail", KeyError, "no key for 5")])
def test_dataset_exceptions_keep_type_and_message(num_workers, kind, error, text):
    for cls in (tud.DataLoader, gl.DataLoader):
        loader = cls(MapDataset(kind), batch_size=2, num_workers=num_workers)
        with pytest.raises(error) as info:
            list(loader)
        assert text in str(info.value)
        # The traceback holds the iterator (and its workers), with torch too; clearing its
        # frames frees it at once (left to the cycle collector, torch's shutdown takes ~10 s).
        traceback.clear_frames(info.value.__traceback__)
        del info, loader
        assert multiprocessing.active_children() == []


# ------------------------------------------------------------------------ workers
def test_worker_init_fn_runs_in_each_worker():
    ours = compare(MapDataset("worker"), lambda: dict(batch_size=3, num_workers=2,
                                                      worker_init_fn=init_worker))
    offsets = {int(o) for batch in ours[0] for o in batch["offset"]}
    assert offsets == {1000, 2000}


def test_worker_init_fn_on_an_array_dataset_runs_torchs_workers():
    cols = arrays()
    ds = gl.ArrayDataset(**cols)
    compare(ds, lambda: dict(batch_size=4, num_workers=2, worker_init_fn=check_in_worker),
            reference=DictTensors(cols))


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_persistent_workers_over_two_epochs(path):
    ds = tensor_dataset() if path == "fast" else MapDataset("pid")
    kw = lambda: dict(batch_size=4, num_workers=2, persistent_workers=True)  # noqa: E731
    if path == "fast":
        compare(ds, kw, epochs=2)
        return
    theirs = run_epochs(tud.DataLoader, ds, kw(), epochs=2)
    with gl.DataLoader(ds, **kw()) as loader:
        ours = [list(loader) for _ in range(2)]
        assert len(multiprocessing.active_children()) == 2  # alive between epochs
    assert multiprocessing.active_children() == []
    assert_same([[b["i"] for b in e] for e in ours], [[b["i"] for b in e] for e in theirs])
    pids = [{int(p) for b in epoch for p in b["pid"]} for epoch in ours]
    assert pids[0] == pids[1] and len(pids[0]) == 2 and os.getpid() not in pids[0]


def test_get_worker_info_is_none_in_the_main_process():
    compare(MapDataset("worker"), lambda: dict(batch_size=5))


def test_h5py_file_opened_in_parent_works_with_forked_workers(tmp_path):
    cols = arrays()
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=cols["x"], chunks=(4, 3))
        f.create_dataset("y", data=cols["y"])
    with h5py.File(path, "r") as f:  # opened in the parent, before the workers fork
        named = gl.ArrayDataset(x=f["x"], y=f["y"])
        positional = gl.ArrayDataset(f["x"], f["y"])
        reference = DictTensors({"x": cols["x"], "y": cols["y"]})
        tensors = tud.TensorDataset(torch.from_numpy(cols["x"]), torch.from_numpy(cols["y"]))
        fork = dict(num_workers=2, multiprocessing_context="fork")
        compare(named, lambda: dict(batch_size=5, **fork), reference=reference)
        compare(positional, lambda: dict(batch_size=5, **fork), reference=tensors)
        # worker_init_fn sends the dataset through torch's worker processes
        compare(named, lambda: dict(batch_size=5, worker_init_fn=check_in_worker, **fork),
                reference=reference)
        # torch's own loader over the ArrayDataset, in forked workers
        assert_same(run_epochs(tud.DataLoader, named, dict(batch_size=5, **fork)),
                    run_epochs(tud.DataLoader, reference, dict(batch_size=5)))
    assert multiprocessing.active_children() == []


# ------------------------------------------------------------------------ shutdown
@pytest.mark.parametrize("persistent", [False, True])
def test_workers_exit_after_break_and_del(persistent):
    loader = gl.DataLoader(MapDataset("dict"), batch_size=2, num_workers=2,
                           persistent_workers=persistent)
    for _ in loader:
        assert len(multiprocessing.active_children()) == 2
        break
    # As with torch: the dropped iterator takes its workers along, unless they persist.
    assert len(multiprocessing.active_children()) == (2 if persistent else 0)
    del loader  # no gc.collect(): the loader must not sit in a reference cycle
    assert multiprocessing.active_children() == []


def test_workers_exit_on_close_mid_epoch():
    loader = gl.DataLoader(MapDataset("dict"), batch_size=2, num_workers=2,
                           persistent_workers=True)
    it = iter(loader)
    next(it)
    assert len(multiprocessing.active_children()) == 2
    loader.close()
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("path", ["fast", "generic", "generic-own-order"])
def test_loader_is_freed_without_the_cycle_collector(path):
    ds = tensor_dataset() if path == "fast" else MapDataset("dict")
    extra = dict(seed=1, shuffle=True) if path == "generic-own-order" else {}
    gc.collect()
    gc.disable()
    try:
        loader = gl.DataLoader(ds, batch_size=4, **extra)
        next(iter(loader))
        ref = weakref.ref(loader)
        del loader
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_next_iter_of_a_temporary_loader(path):
    ds = tensor_dataset() if path == "fast" else MapDataset("dict")
    theirs = next(iter(tud.DataLoader(ds, batch_size=4, num_workers=2)))
    assert_same(next(iter(gl.DataLoader(ds, batch_size=4, num_workers=2))), theirs)
    gc.collect()
    assert multiprocessing.active_children() == []


def test_state_dict_after_break_still_counts_the_delivered_batches():
    with gl.DataLoader(MapDataset("dict"), batch_size=2) as loader:
        for i, _ in enumerate(loader):
            if i == 2:
                break
        assert loader.state_dict()["cursor"]["position"] == 6


def test_workers_exit_at_interpreter_exit():
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        sys.path.insert(0, {str(HERE.parent)!r})
        import gpuloader as gl
        from test_compat import MapDataset
        loader = gl.DataLoader(MapDataset("dict"), batch_size=2, num_workers=2,
                               persistent_workers=True)
        it = iter(loader)
        next(it)
        print("iterating")
        # exit with the workers alive and the iterator unfinished
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "iterating" in done.stdout


# ------------------------------------------------------------------------ seeds and RNG
def shuffled(ds: Any, **kwargs: Any) -> List[List[int]]:
    with gl.DataLoader(ds, batch_size=5, shuffle=True, **kwargs) as loader:
        return [[int(i) for b in loader for i in b[1]] for _ in range(2)]


def test_fast_path_shuffle_is_reproducible_per_seed():
    ds = tensor_dataset()
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert shuffled(ds, generator=g(5)) == shuffled(ds, generator=g(5))
    assert shuffled(ds, generator=g(5)) != shuffled(ds, generator=g(6))
    assert shuffled(ds, seed=3) == shuffled(ds, seed=3) != shuffled(ds, seed=4)
    torch.manual_seed(9)
    first = shuffled(ds)
    torch.manual_seed(9)
    assert shuffled(ds) == first
    assert sorted(first[0]) == list(range(N)) and first[0] != first[1]


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("kwargs", [
    dict(batch_size=4), dict(batch_size=4, sampler=[3, 1]), dict(batch_sampler=[[2, 0]]),
    dict(batch_size=4, num_workers=2, persistent_workers=True)],
    ids=["seq", "sampler", "batch-sampler", "persistent"])
def test_global_rng_is_consumed_like_torch(path, kwargs):
    """A drop-in must not shift the random numbers the rest of a script sees."""
    ds = tensor_dataset() if path == "fast" else MapDataset("dict")
    draws = []
    for cls in (tud.DataLoader, gl.DataLoader):
        torch.manual_seed(0)
        loader = cls(ds, **kwargs)
        after_init = torch.rand(1)
        list(loader)
        list(loader)
        draws.append((after_init, torch.rand(1)))
    assert_same(draws[1], draws[0])


# ------------------------------------------------------------------------ typing and class
def test_isinstance_and_generic_subscript():
    loader = gl.DataLoader(tensor_dataset())
    assert isinstance(loader, tud.DataLoader)
    assert issubclass(gl.DataLoader, tud.DataLoader)
    alias = gl.DataLoader[int]
    assert typing.get_origin(alias) is gl.DataLoader and typing.get_args(alias) == (int,)
    typed = gl.DataLoader[Dict[str, torch.Tensor]](MapDataset("dict"), batch_size=2)
    assert isinstance(typed, gl.DataLoader)
    loader.close()
    typed.close()


def test_torch_signature_is_a_prefix_of_ours():
    import inspect

    theirs = inspect.signature(tud.DataLoader.__init__).parameters
    ours = inspect.signature(gl.DataLoader.__init__).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    for name, param in theirs.items():
        assert ours[name].kind == param.kind, name
        assert ours[name].default == param.default, name
    extras = list(ours)[len(theirs):]
    assert extras and all(ours[n].kind is inspect.Parameter.KEYWORD_ONLY for n in extras)


def test_extras_at_their_defaults_change_nothing():
    cols = arrays()
    defaults = dict(device=None, prefetch_depth=2, reader_threads=None, memory_fraction=0.8,
                    memory_budget=None, sample_bytes=0, min_batch_size=1, max_batch_size=None,
                    distributed=False, reuse_buffers=True)
    for ds, ref in ((gl.ArrayDataset(**cols), DictTensors(cols)),
                    (MapDataset("nested"), None)):
        compare(ds, lambda: dict(batch_size=3), reference=ref, extras=defaults)


@pytest.mark.filterwarnings("ignore:.*pin_memory")
def test_pin_memory_without_an_accelerator_changes_nothing():
    compare(tensor_dataset(), lambda: dict(batch_size=3, pin_memory=True))
    compare(MapDataset("dict"), lambda: dict(batch_size=3, pin_memory=True))


# ------------------------------------------------------------------------ an unchanged script
def test_torch_training_script_runs_unchanged():
    script = HERE / "torch_style_training.py"
    assert "from gpuloader import DataLoader" in script.read_text()
    losses = runpy.run_path(str(script))["main"]()
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.5 * losses[0]
