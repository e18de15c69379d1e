"""Compressed HDF5 chunks are decompressed once per epoch (sources/chunks.py)."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

import gpuloader as gl
from gpuloader.sources.chunks import ChunkedReader


def write(path, compression, shuffle, n=1000, chunk=16):
    x = np.arange(n * 6, dtype=np.float32).reshape(n, 6) % 97
    with h5py.File(path, "w") as h5:
        h5.create_dataset("x", data=x, chunks=(chunk, 6), compression=compression,
                          shuffle=shuffle)
        h5.create_dataset("y", data=np.arange(n, dtype=">i8"), chunks=(chunk,),
                          compression=compression, shuffle=shuffle)
    return x


def readers(ds):
    opened = ds.source._handles.get(ds.source._open)
    return opened.readers


@pytest.mark.parametrize("order", ["block", "sequential", "shuffle"])
@pytest.mark.parametrize("compression, shuffle", [("gzip", False), ("gzip", True),
                                                  ("lzf", False)])
def test_every_row_once_and_equal_to_h5py(tmp_path, order, compression, shuffle):
    x = write(tmp_path / "d.h5", compression, shuffle)
    ds = gl.open_dataset(tmp_path / "d.h5")
    assert all(isinstance(r, ChunkedReader) for r in readers(ds).values())
    with gl.DataLoader(ds, batch_size=100, order=order, seed=3, reader_threads=2) as loader:
        batches = list(loader)
    ds.close()
    y = np.concatenate([b["y"].numpy() for b in batches])
    assert np.array_equal(np.sort(y), np.arange(1000))
    np.testing.assert_array_equal(np.concatenate([b["x"].numpy() for b in batches]), x[y])


@pytest.mark.parametrize("order", ["block", "sequential"])
def test_block_and_sequential_epochs_decompress_each_chunk_once(tmp_path, order):
    write(tmp_path / "d.h5", "gzip", True, n=4000, chunk=16)  # 250 chunks per field
    ds = gl.open_dataset(tmp_path / "d.h5")
    with gl.DataLoader(ds, batch_size=100, order=order, seed=1, reader_threads=3) as loader:
        for epoch in range(2):
            for _ in loader:
                pass
            counts = {name: r.cache.decoded for name, r in readers(ds).items()}
            # Each chunk at least once (every row is read), and never twice in an epoch; the
            # second epoch may find chunks still cached from the first.
            if epoch == 0:
                assert counts == {"x": 250, "y": 250}
            else:
                assert all(250 <= c <= 500 for c in counts.values())
    ds.close()
