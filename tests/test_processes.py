"""Reader processes for h5py-bound sources (compressed HDF5 with num_workers > 0)."""
from __future__ import annotations

import multiprocessing as mp

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
            assert isinstance(loader._pool, ProcessReaderPool)
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
