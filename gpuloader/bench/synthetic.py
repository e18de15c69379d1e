"""Synthetic data to benchmark on when no ``--data`` is given."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from gpuloader.bench.checks import positive_int
from gpuloader.errors import ArgumentError, describe


def make_synthetic(directory: Union[str, os.PathLike], *, size_mb: float = 256,
                   sample_floats: int = 1024, fmt: str = "npy", chunk_rows: Optional[int] = 64,
                   seed: int = 0) -> Path:
    """Write a synthetic dataset of about ``size_mb`` MB (1e6 bytes) under ``directory``.

    Fields: ``x`` float32 ``(sample_floats,)`` and ``y`` int64 (the sample index).  ``fmt="npy"``
    writes ``x.npy`` and ``y.npy`` and returns the folder; ``fmt="h5"`` writes ``data.h5`` (chunks
    of ``chunk_rows`` rows, or contiguous when None) and returns the file.
    """
    if fmt not in ("npy", "h5"):
        raise ArgumentError(f"fmt must be 'npy' or 'h5', got {describe(fmt)}")
    floats = positive_int("sample_floats", sample_floats)
    n = max(1, int(size_mb * 1e6) // (4 * floats))
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if fmt == "npy":
        x = np.lib.format.open_memmap(root / "x.npy", mode="w+", dtype=np.float32,
                                      shape=(n, floats))
        _fill_random(x, rng)
        x.flush()
        del x
        np.save(root / "y.npy", np.arange(n, dtype=np.int64))
        return root
    import h5py

    path = root / "data.h5"
    chunks = (min(chunk_rows, n), floats) if chunk_rows else None
    with h5py.File(path, "w") as f:
        x = f.create_dataset("x", shape=(n, floats), dtype=np.float32, chunks=chunks)
        _fill_random(x, rng)
        f.create_dataset("y", data=np.arange(n, dtype=np.int64),
                         chunks=(min(chunk_rows, n),) if chunk_rows else None)
    return path


def _fill_random(x: Any, rng: np.random.Generator) -> None:
    """Fill the ``(n, floats)`` float32 array-like ``x`` with uniform values, 32 MB at a time."""
    n, floats = x.shape
    step = max(1, (32 << 20) // (4 * floats))
    for start in range(0, n, step):
        stop = min(n, start + step)
        x[start:stop] = rng.random((stop - start, floats), dtype=np.float32)
