"""The fast path's invariants: exactly once, determinism, resume, shutdown, clear errors."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
# hypothesis is a test extra: on a machine without it (a bare GPU box) skip, do not error.
pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gpuloader as gl
from gpuloader.errors import ArgumentError, ArgumentTypeError, DeviceError

N = 517  # not a multiple of any batch size used below, so tails are exercised


def make_dataset(n: int = N) -> gl.ArrayDataset:
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    return gl.ArrayDataset(x=x, y=np.arange(n, dtype=np.int64))


def delivered(loader) -> list:
    return [int(i) for batch in loader for i in batch["y"]]


def wide_dataset(n: int = 64) -> gl.ArrayDataset:
    """Rows of 16 KiB: batches of 8 are big enough for reader threads (not read inline)."""
    return gl.ArrayDataset(x=np.zeros((n, 4096), dtype=np.float32), y=np.arange(n))


def reader_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("gpuloader-reader")]


@pytest.mark.parametrize("order", ["sequential", "shuffle", "block"])
@pytest.mark.parametrize("batch_size", [1, 7, 64, N + 10])
def test_every_index_exactly_once_per_epoch(order, batch_size):
    with gl.DataLoader(make_dataset(), batch_size=batch_size, order=order, seed=3) as loader:
        for _ in range(2):
            assert sorted(delivered(loader)) == list(range(N))


def test_rows_match_their_index():
    ds = make_dataset()
    with gl.DataLoader(ds, batch_size=50, shuffle=True, seed=0) as loader:
        for batch in loader:
            expected = torch.from_numpy(np.arange(N * 3, dtype=np.float32).reshape(N, 3))
            assert torch.equal(batch["x"], expected[batch["y"]])


def test_batches_are_sorted_within_a_batch_for_own_orders():
    with gl.DataLoader(make_dataset(), batch_size=32, shuffle=True, seed=1) as loader:
        for batch in loader:
            assert torch.all(batch["y"][1:] > batch["y"][:-1])


def test_drop_last_drops_only_the_short_tail():
    with gl.DataLoader(make_dataset(), batch_size=50, shuffle=True, seed=1,
                       drop_last=True) as loader:
        sizes = [len(b["y"]) for b in loader]
        assert sizes == [50] * (N // 50) and len(loader) == N // 50


def test_same_seed_same_order_different_epochs_differ():
    def epochs(seed):
        with gl.DataLoader(make_dataset(), batch_size=64, shuffle=True, seed=seed) as loader:
            return [delivered(loader) for _ in range(2)]

    a, b = epochs(5), epochs(5)
    assert a == b
    assert a[0] != a[1]
    assert epochs(6)[0] != a[0]


def test_generator_fixes_the_seed():
    orders = []
    for _ in range(2):
        g = torch.Generator().manual_seed(11)
        with gl.DataLoader(make_dataset(), batch_size=64, shuffle=True, generator=g) as loader:
            orders.append(delivered(loader))
    assert orders[0] == orders[1]


def test_set_epoch_selects_the_order():
    with gl.DataLoader(make_dataset(), batch_size=64, shuffle=True, seed=2) as loader:
        first = delivered(loader)
        loader.set_epoch(0)
        assert delivered(loader) == first


def test_positional_batches_are_lists_like_default_collate():
    ds = gl.ArrayDataset(np.arange(10.0), np.arange(10))
    with gl.DataLoader(ds, batch_size=4) as loader:
        batch = next(iter(loader))
    reference = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert isinstance(batch, list) and len(batch) == 2
    for ours, theirs in zip(batch, reference):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


@settings(max_examples=30, deadline=None)
@given(order=st.sampled_from(["sequential", "shuffle", "block"]),
       batch_size=st.integers(1, 80), stop_after=st.integers(0, 20), seed=st.integers(0, 99))
def test_resume_delivers_exactly_the_rest(order, batch_size, stop_after, seed):
    ds = make_dataset(300)
    stop_after = min(stop_after, -(-300 // batch_size) - 1)  # break inside the epoch
    first = []
    with gl.DataLoader(ds, batch_size=batch_size, order=order, seed=seed) as loader:
        for i, batch in enumerate(loader):
            first.extend(batch["y"].tolist())  # a delivered batch counts as consumed
            if i == stop_after:
                break
        state = loader.state_dict()
    assert state["cursor"]["position"] == len(first)
    with gl.DataLoader(ds, batch_size=batch_size, order=order) as resumed:
        resumed.load_state_dict(state)
        rest = delivered(resumed)
    with gl.DataLoader(ds, batch_size=batch_size, order=order, seed=seed) as uninterrupted:
        assert first + rest == delivered(uninterrupted)


def test_state_after_a_full_epoch_points_at_the_next_epoch():
    with gl.DataLoader(make_dataset(), batch_size=64, shuffle=True, seed=0) as loader:
        delivered(loader)
        state = loader.state_dict()
    assert state["cursor"] == {"epoch": 1, "position": 0}


def test_state_does_not_count_read_ahead_batches():
    with gl.DataLoader(make_dataset(), batch_size=10, prefetch_depth=4, seed=0) as loader:
        it = iter(loader)
        next(it)
        next(it)
        assert loader.state_dict()["cursor"]["position"] == 20


def changed(state: dict, part: str, **change: object) -> dict:
    """``state`` with ``state[part]`` updated by ``change`` (the original is left alone)."""
    return dict(state, **{part: dict(state[part], **change)})


def test_load_state_refuses_another_world_size():
    with gl.DataLoader(make_dataset(), batch_size=10) as loader:
        state = changed(loader.state_dict(), "order", world_size=4)
        with pytest.raises(ArgumentError, match="world_size=4"):
            loader.load_state_dict(state)


@pytest.mark.parametrize("part, change, error, match", [
    ("cursor", {"position": -5}, ArgumentError,
     r"state\['cursor'\]\['position'\] must be an int >= 0, got -5"),
    ("cursor", {"position": 3.7}, ArgumentTypeError,
     r"state\['cursor'\]\['position'\] must be an int >= 0, got float 3.7"),
    ("cursor", {"epoch": -1}, ArgumentError,
     r"state\['cursor'\]\['epoch'\] must be an int >= 0, got -1"),
    ("order", {"seed": "abc"}, ArgumentTypeError,
     r"state\['order'\]\['seed'\] must be an int or None, got str 'abc'"),
    ("sizing", {"current": 0}, ArgumentError,
     r"state\['sizing'\]\['current'\] must be an int >= 1, got 0"),
])
def test_load_state_refuses_bad_values_when_loading_not_later(part, change, error, match):
    with gl.DataLoader(make_dataset(), batch_size=10, shuffle=True, seed=0) as loader:
        with pytest.raises(error, match=match):
            loader.load_state_dict(changed(loader.state_dict(), part, **change))
        assert loader.state_dict()["cursor"] == {"epoch": 0, "position": 0}  # nothing changed


@pytest.mark.parametrize("state, match", [
    ({"version": 2, "seed": 0, "epoch": 0, "position": 10, "order": "shuffle",
      "world_size": 1}, r"state has version 2, but this gpuloader reads state version 3 only"),
    ({"version": 4}, r"state has version 4, but this gpuloader reads state version 3 only"),
    ({"cursor": {}}, r"state has version None, but .*state version 3 only"),
    ([1, 2], r"state must be a dict .*version 3.*got \[1, 2\]"),
])
def test_load_state_names_the_version_it_reads(state, match):
    with gl.DataLoader(make_dataset(), batch_size=10) as loader:
        with pytest.raises(ArgumentError, match=match):
            loader.load_state_dict(state)


def test_a_state_that_fails_to_start_is_kept_not_skipped():
    with gl.DataLoader(make_dataset(), batch_size=10, shuffle=True, seed=0) as loader:
        # saved with a larger dataset
        state = changed(loader.state_dict(), "cursor", position=N + 1)
        loader.load_state_dict(state)
        with pytest.raises(ArgumentError, match=f"position {N + 1} is beyond"):
            iter(loader)
        assert loader.state_dict()["cursor"] == {"epoch": 0, "position": N + 1}
        with pytest.raises(ArgumentError, match="is beyond"):
            iter(loader)  # not silently the next epoch


def test_load_state_refuses_a_state_from_before_span_orders():
    # Version 1 states were saved when orders were materialised permutations: their (seed,
    # epoch, position) would resume into a different order, so they are refused by name.
    with gl.DataLoader(make_dataset(), batch_size=10, shuffle=True, seed=0) as loader:
        state = dict(loader.state_dict(), version=1)
        with pytest.raises(ArgumentError, match=r"state has version 1, but this gpuloader reads "
                                                r"state version 3 only .*set_epoch"):
            loader.load_state_dict(state)


def test_load_state_names_missing_keys():
    with gl.DataLoader(make_dataset(), batch_size=10) as loader:
        state = loader.state_dict()
        del state["order"]["world_size"]
        with pytest.raises(ArgumentError, match=r"state\['order'\] is missing 'world_size'"):
            loader.load_state_dict(state)
        del state["cursor"]
        with pytest.raises(ArgumentError, match="state is missing 'cursor'"):
            loader.load_state_dict(state)


def test_close_stops_reader_threads_and_is_idempotent():
    loader = gl.DataLoader(wide_dataset(), batch_size=8, reader_threads=3)
    next(iter(loader))
    assert len(reader_threads()) >= 3
    loader.close()
    loader.close()
    assert reader_threads() == []
    with pytest.raises(RuntimeError, match="closed"):
        iter(loader)


def test_break_then_with_exit_leaves_no_thread():
    with gl.DataLoader(wide_dataset(), batch_size=8) as loader:
        for _ in loader:
            assert reader_threads()
            break
    assert reader_threads() == []


def test_garbage_collection_stops_threads():
    import gc

    loader = gl.DataLoader(wide_dataset(), batch_size=8)
    next(iter(loader))
    assert reader_threads()
    del loader
    gc.collect()
    assert reader_threads() == []


class ExplodingSource:
    """Wraps a source; reading index 13 raises OSError."""

    def __init__(self, inner):
        self.inner = inner
        self.fields = inner.fields
        self.chunk_length = inner.chunk_length

    def __len__(self):
        return len(self.inner)

    def read_into(self, indices, out):
        if 13 in indices:
            raise OSError("disk on fire")
        self.inner.read_into(indices, out)

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("make, where", [(make_dataset, "while reading"),
                                         (wide_dataset, "reader thread")])
def test_reader_errors_reach_the_consumer_with_type_and_indices(make, where):
    ds = gl.ArrayDataset.from_source(ExplodingSource(make().source))
    with gl.DataLoader(ds, batch_size=10) as loader:
        with pytest.raises(OSError, match="disk on fire") as info:
            delivered(loader)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "10, 11, 12, 13" in notes and where in notes


def test_stats_count_what_was_delivered():
    with gl.DataLoader(make_dataset(), batch_size=100) as loader:
        delivered(loader)
        stats = loader.stats()
    assert stats["samples"] == N and stats["batches"] == 6
    assert stats["bytes"] == N * (3 * 4 + 8)
    assert 0.0 <= stats["stall_fraction"] <= 1.0
    assert stats["batch_sizes"] == [100, N % 100]
    for key in ("wait_s", "read_s", "copy_s", "elapsed_s", "samples_per_s", "gb_per_s"):
        assert stats[key] >= 0


def test_auto_batch_size_respects_budget_and_dataset():
    ds = make_dataset()
    per_sample = 3 * 4 + 8
    with gl.DataLoader(ds, batch_size="auto", memory_budget=per_sample * 4 * 100,
                       prefetch_depth=2) as loader:
        # ring of prefetch_depth + 2 = 4 slots; 80% of the budget: 80 samples
        assert loader.batch_size == 80
        assert all(len(b["y"]) <= 80 for b in loader)
    with gl.DataLoader(ds, batch_size="auto") as loader:
        assert loader.batch_size == N  # never more than the dataset


def test_auto_batch_size_is_an_int_property():
    with gl.DataLoader(make_dataset(), batch_size="auto", max_batch_size=16) as loader:
        assert isinstance(loader.batch_size, int) and loader.batch_size == 16
        assert len(loader) == -(-N // 16)


def test_subset_and_tensordataset_take_the_fast_path():
    base = torch.utils.data.TensorDataset(torch.arange(50.0), torch.arange(50))
    subset = torch.utils.data.Subset(base, list(range(49, -1, -2)))
    with gl.DataLoader(subset, batch_size=5) as loader:
        assert loader._view is not None
        ours = [b[1].tolist() for b in loader]
    theirs = [b[1].tolist() for b in torch.utils.data.DataLoader(subset, batch_size=5)]
    assert ours == theirs


@pytest.mark.parametrize("kwargs, error, match", [
    ({"batch_size": 0}, ArgumentError, "batch_size must be a positive int"),
    ({"batch_size": "big"}, ArgumentTypeError, "batch_size must be"),
    ({"order": "random"}, ArgumentError, "order"),
    ({"shuffle": True, "order": "sequential"}, ArgumentError, "contradicts shuffle=True"),
    ({"prefetch_depth": -1}, ArgumentError, r"prefetch_depth must be an int in 0..64 .*, got -1"),
    ({"reader_threads": 0}, ArgumentError, "reader_threads must be a positive int"),
    ({"memory_fraction": 1.5}, ArgumentError, "memory_fraction"),
    ({"memory_budget": -5}, ArgumentError, "memory_budget"),
    ({"min_batch_size": 8, "max_batch_size": 4}, ArgumentError, "max_batch_size"),
    ({"device": "tpu"}, DeviceError, "device must be"),
    ({"prefetch_factor": 2}, ValueError, "prefetch_factor"),
])
def test_bad_arguments_name_the_argument_and_value(kwargs, error, match):
    with pytest.raises(error, match=match):
        gl.DataLoader(make_dataset(), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        gl.DataLoader(make_dataset(), device="cuda:0")


def test_device_auto_falls_back_to_cpu_without_cuda():
    with gl.DataLoader(make_dataset(), batch_size=10, device="auto") as loader:
        batch = next(iter(loader))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert batch["x"].device.type == expected


def test_cpu_batches_are_the_callers_to_keep():
    with gl.DataLoader(make_dataset(), batch_size=10, device="cpu") as loader:
        batches = list(loader)
    assert torch.equal(torch.cat([b["y"] for b in batches]), torch.arange(N))


class ExitingSource(ExplodingSource):
    """Reading index 13 calls sys.exit() (SystemExit ends a thread without a trace)."""

    def read_into(self, indices, out):
        if 13 in indices:
            raise SystemExit(3)
        self.inner.read_into(indices, out)


def test_a_reader_thread_killed_by_system_exit_does_not_hang_the_consumer():
    from gpuloader.readers import ReaderPool, ReadJob
    from gpuloader.stats import LoaderStats

    source = ExitingSource(make_dataset().source)
    pool = ReaderPool(source, 1, LoaderStats())
    indices = np.arange(10, 15, dtype=np.int64)
    out = {name: np.zeros((5, *spec.shape), spec.dtype) for name, spec in source.fields.items()}
    outcome = []

    def consume():
        try:
            pool.result(1)
        except BaseException as exc:  # noqa: B902 - the SystemExit is the point
            outcome.append(exc)

    try:
        pool.submit(ReadJob(1, indices, out))
        while pool._queue:  # the reader thread took it (so the consumer cannot steal it)
            threading.Event().wait(0.01)
        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        consumer.join(10)
        assert not consumer.is_alive(), "the consumer waits forever for the dead thread's job"
    finally:
        pool.close()
    assert isinstance(outcome[0], SystemExit)
    assert "10, 11, 12, 13, 14" in "\n".join(outcome[0].__notes__)


class InterruptOnceSource:
    """Wraps a source: the first read in the consumer (main) thread raises KeyboardInterrupt;
    reads in reader threads wait for ``release`` first."""

    def __init__(self, inner):
        self.inner = inner
        self.fields = inner.fields
        self.release = threading.Event()
        self.interrupted = False

    def __len__(self):
        return len(self.inner)

    def read_into(self, indices, out):
        if threading.current_thread() is threading.main_thread():
            if not self.interrupted:
                self.interrupted = True
                raise KeyboardInterrupt
        else:
            self.release.wait(10)
        self.inner.read_into(indices, out)


def test_an_interrupt_while_the_consumer_reads_a_batch_loses_nothing_and_hangs_nothing():
    # NOTE(work-stealing): the waiting consumer reads queued jobs itself.  A Ctrl-C during such
    # a read must leave the pool consistent: the job is read again on request, and drain()
    # (what close() and the next epoch do) returns.
    from gpuloader.readers import ReaderPool, ReadJob
    from gpuloader.stats import LoaderStats

    source = InterruptOnceSource(make_dataset().source)
    pool = ReaderPool(source, 1, LoaderStats())

    def job(seq, start):
        indices = np.arange(start, start + 5, dtype=np.int64)
        return ReadJob(seq, indices, {name: np.zeros((5, *spec.shape), spec.dtype)
                                      for name, spec in source.fields.items()})

    try:
        pool.submit(job(1, 0))  # the reader thread takes it and waits for release
        while pool._queue:
            threading.Event().wait(0.01)
        pool.submit(job(2, 5))
        with pytest.raises(KeyboardInterrupt):
            pool.result(2)  # the consumer steals job 2 and is interrupted in it
        source.release.set()
        waiter = threading.Thread(target=lambda: (pool.result(2), pool.result(1), pool.drain()),
                                  daemon=True)
        waiter.start()
        waiter.join(10)
        assert not waiter.is_alive(), "the interrupted job was lost: result()/drain() hang"
    finally:
        source.release.set()
        pool.close()


class SlowThreadsSource:
    """Wraps a source: reader threads read slowly, so the waiting consumer steals jobs; its first
    read raises KeyboardInterrupt (Ctrl-C in a notebook)."""

    def __init__(self, inner):
        self.inner = inner
        self.fields = inner.fields
        self.chunk_length = inner.chunk_length
        self.interrupts = 0

    def __len__(self):
        return len(self.inner)

    def read_into(self, indices, out):
        if threading.current_thread() is threading.main_thread():
            if self.interrupts == 0:
                self.interrupts += 1
                raise KeyboardInterrupt
        else:
            threading.Event().wait(0.02)
        self.inner.read_into(indices, out)

    def close(self):
        self.inner.close()


def test_iteration_continued_after_an_interrupt_delivers_every_sample_once():
    ds = gl.ArrayDataset.from_source(SlowThreadsSource(wide_dataset(96).source))
    seen = []
    with gl.DataLoader(ds, batch_size=8, reader_threads=1, prefetch_depth=3) as loader:
        it = iter(loader)
        while True:
            try:
                batch = next(it)
            except KeyboardInterrupt:
                continue  # the user goes on with the same iterator
            except StopIteration:
                break
            seen.extend(batch["y"].tolist())
        assert loader.dataset.source.interrupts == 1
    assert sorted(seen) == list(range(96))


def test_closing_one_loader_leaves_a_shared_dataset_usable(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.arange(400, dtype=np.int64).reshape(100, 4))
    ds = gl.open_dataset(path)
    first = gl.DataLoader(ds, batch_size=10)
    second = gl.DataLoader(ds, batch_size=10)
    it = iter(second)
    next(it)
    first.close()
    rest = torch.cat([b["x"][:, 0] for b in it])
    assert rest.tolist() == list(range(40, 400, 4))
    second.close()


def test_auto_batch_size_on_an_iterable_dataset_is_a_clear_error():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(10))

    with pytest.raises(ArgumentError, match='batch_size="auto" needs a map-style dataset.*Stream'):
        gl.DataLoader(Stream(), batch_size="auto")
