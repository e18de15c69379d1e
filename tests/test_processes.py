"""Reader processes for h5py-bound sources (compressed HDF5 with num_workers > 0)."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import numpy as np
import pytest

import gpuloader as gl
from gpuloader.processes import ProcessReaderPool, needs_processes

N = 1500


@pytest.fixture
def gzip_file(data_files):
    x = np.arange(N * 64, dtype=np.float32).reshape(N, 64)
    return data_files.h5({"x": (x, {"chunks": (100, 64), "compression": "gzip"}),
                          "y": (np.arange(N), {"chunks": (100,), "compression": "gzip"})})


def reader_processes() -> list:
    return [p for p in mp.active_children() if p.name.startswith("gpuloader-reader-proc")]


def test_only_h5py_bound_sources_need_processes(gzip_file, data_files):
    assert needs_processes(gl.open_dataset(gzip_file).source)
    plain = data_files.h5({"x": np.zeros((10, 4), np.float32)}, name="plain.h5")
    assert not needs_processes(gl.open_dataset(plain).source)


@pytest.mark.parametrize("order", ["sequential", "shuffle", "block"])
def test_processes_deliver_every_row_exactly_once(gzip_file, order):
    ds = gl.open_dataset(gzip_file)
    expected = np.arange(N * 64, dtype=np.float32).reshape(N, 64)
    with gl.DataLoader(ds, batch_size=256, order=order, seed=1, num_workers=2) as loader:
        seen = []
        for batch in loader:
            assert isinstance(loader._fast.pool, ProcessReaderPool)
            np.testing.assert_array_equal(batch["x"].numpy(), expected[batch["y"].numpy()])
            seen.extend(batch["y"].tolist())
    assert sorted(seen) == list(range(N))


def test_processes_exit_on_close_and_after_break(gzip_file):
    loader = gl.DataLoader(gl.open_dataset(gzip_file), batch_size=256, num_workers=2)
    for _ in loader:
        break
    assert len(reader_processes()) == 2
    loader.close()
    assert reader_processes() == []


def test_oom_rollback_with_processes_loses_nothing(gzip_file):
    import torch

    seen, calls = [], 0
    with gl.DataLoader(gl.open_dataset(gzip_file), batch_size=256, shuffle=True, seed=0,
                       num_workers=2) as loader:
        for batch in loader:
            calls += 1
            with loader.oom_guard() as guard:
                if calls in (2, 3):
                    raise torch.cuda.OutOfMemoryError("simulated")
            if not guard.failed:
                seen.extend(batch["y"].tolist())
    assert sorted(seen) == list(range(N))


class BrokenSource:
    """A picklable source whose reads raise OSError (as a corrupt chunk would)."""

    def __init__(self, inner):
        self.inner = inner
        self.fields = inner.fields
        self.chunk_length = inner.chunk_length
        self.storage = inner.storage

    def __len__(self):
        return len(self.inner)

    def read_into(self, indices, out):
        raise OSError(f"corrupt chunk near row {int(indices[0])}")

    def close(self):
        self.inner.close()


def test_errors_in_processes_reach_the_consumer_with_type_and_indices(gzip_file):
    ds = gl.ArrayDataset.from_source(BrokenSource(gl.open_dataset(gzip_file).source))
    with gl.DataLoader(ds, batch_size=256, num_workers=2) as loader:
        with pytest.raises(OSError, match="corrupt chunk near row 0") as info:
            next(iter(loader))
    assert "reader process" in "\n".join(info.value.__notes__)
    assert reader_processes() == []


def job_buffers(source, rows: int) -> dict:
    return {name: np.zeros((rows, *spec.shape), spec.dtype) for name, spec in
            source.fields.items()}


def test_done_means_the_rows_are_in_the_jobs_buffers(gzip_file):
    # The CUDA fast path starts the device copy out of a job's (pinned) buffers as soon as
    # done(seq) is True, before result(seq): the rows must be there by then, not still in the
    # pool's shared-memory slot.
    from gpuloader.readers import ReadJob
    from gpuloader.stats import LoaderStats

    source = gl.open_dataset(gzip_file).source
    pool = ProcessReaderPool(source, source.fields, 300, 3, 1, LoaderStats())
    try:
        indices = np.arange(100, 300, dtype=np.int64)
        out = job_buffers(source, len(indices))
        pool.submit(ReadJob(1, indices, out))
        deadline = time.monotonic() + 30
        while not pool.done(1):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        np.testing.assert_array_equal(out["y"], indices)  # before result()
        assert pool.result(1).out is out
        np.testing.assert_array_equal(out["y"], indices)
    finally:
        pool.close()


def shared_memory_mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum("/dev/shm/" in line for line in maps)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_close_releases_shared_memory_and_fds_while_the_loader_lives(gzip_file):
    ds = gl.open_dataset(gzip_file)
    mappings, fds = shared_memory_mappings(), open_fds()
    loader = gl.DataLoader(ds, batch_size=256, num_workers=2)
    for _ in loader:
        pass
    pool = loader._fast.pool
    assert isinstance(pool, ProcessReaderPool)
    assert shared_memory_mappings() > mappings
    loader.close()
    assert shared_memory_mappings() == mappings
    assert open_fds() <= fds
    assert not pool.alive


class StuckSource(BrokenSource):
    """A picklable source whose reads hang (a dead network mount) after noting their pid."""

    def __init__(self, inner, pidfile):
        super().__init__(inner)
        self.pidfile = str(pidfile)

    def read_into(self, indices, out):
        with open(self.pidfile, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)


def test_a_killed_reader_process_is_reported_and_drain_does_not_hang(gzip_file, tmp_path):
    from gpuloader.readers import ReadJob
    from gpuloader.stats import LoaderStats

    source = StuckSource(gl.open_dataset(gzip_file).source, tmp_path / "pid")
    pool = ProcessReaderPool(source, source.fields, 8, 3, 2, LoaderStats())
    try:
        pool.submit(ReadJob(1, np.arange(4, dtype=np.int64), job_buffers(source, 4)))
        deadline = time.monotonic() + 30
        while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(int((tmp_path / "pid").read_text()), signal.SIGKILL)  # the OOM killer, say
        with pytest.raises(RuntimeError, match="exited unexpectedly"):
            pool.result(1)
        # What loader.close() does on the way out of that error: it must return.
        drainer = threading.Thread(target=pool.drain, daemon=True)
        drainer.start()
        drainer.join(10)
        assert not drainer.is_alive(), "drain() waits forever for the dead worker's job"
    finally:
        pool.close()
    assert reader_processes() == []


def test_next_epoch_starts_fresh_reader_processes_after_one_was_killed(gzip_file):
    """As torch does: the epoch a worker died in fails clearly; the next one starts fresh
    workers and delivers every row once (NOTE(pool-renewal))."""
    expected = np.arange(N * 64, dtype=np.float32).reshape(N, 64)
    with gl.DataLoader(gl.open_dataset(gzip_file), batch_size=256, num_workers=1,
                       shuffle=True, seed=3) as loader:
        with pytest.raises(RuntimeError, match="exited unexpectedly"):
            for i, _ in enumerate(loader):
                if i == 0:
                    (proc,) = reader_processes()
                    proc.kill()
                    proc.join()
        for epoch in range(2):
            seen = []
            for batch in loader:
                np.testing.assert_array_equal(batch["x"].numpy(), expected[batch["y"].numpy()])
                seen.extend(batch["y"].tolist())
            assert sorted(seen) == list(range(N)), epoch
        assert len(reader_processes()) == 1
    assert reader_processes() == []


def _epoch_check(loader, expected) -> str:
    """'' when one epoch delivers every row once with x matching y, else what went wrong."""
    seen = []
    for batch in loader:
        ys = batch["y"].numpy()
        if not np.array_equal(batch["x"].numpy(), expected[ys]):
            return f"x does not match y for rows {ys[:5]}"
        seen.extend(ys.tolist())
    if sorted(seen) != list(range(len(expected))):
        return f"{len(seen)} rows delivered, {len(set(seen))} distinct, for {len(expected)}"
    return ""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_clear_error_and_never_touches_the_parents_readers(
        gzip_file, tmp_path):
    """The child tries the loader it inherited while the parent keeps iterating: the child
    gets a clear error, the parent's epochs stay exact (NOTE(pool-renewal))."""
    expected = np.arange(N * 64, dtype=np.float32).reshape(N, 64)
    report = tmp_path / "child.txt"
    with gl.DataLoader(gl.open_dataset(gzip_file), batch_size=256, num_workers=2,
                       shuffle=True, seed=4) as loader:
        assert _epoch_check(loader, expected) == ""  # the parent's workers are running
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            try:
                outcome = []
                for _ in range(2):
                    try:
                        outcome.append(_epoch_check(loader, expected))
                    except RuntimeError as exc:
                        outcome.append(str(exc))
                loader.close()
                report.write_text(repr(outcome))
            except BaseException as exc:  # report anything to the parent
                report.write_text(f"{type(exc).__name__}: {exc}")
            finally:
                os._exit(0)
        parent = [_epoch_check(loader, expected) for _ in range(3)]
        os.waitpid(pid, 0)
        assert parent == ["", "", ""]
        child = eval(report.read_text())  # noqa: S307 - our own repr of a list of strings
        assert len(child) == 2 and all("was forked from it" in text for text in child), child
        assert len(reader_processes()) == 2  # the parent's own, still serving
        assert _epoch_check(loader, expected) == ""
