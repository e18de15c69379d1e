"""Storage backends: each implements the Source protocol of :mod:`gpuloader.sources.base`."""
from gpuloader.sources.arrays import ArraysSource
from gpuloader.sources.base import (FieldSpec, Source, StorageInfo, coalesce_runs, rows_per_block,
                                    sample_nbytes)
from gpuloader.sources.hdf5 import Hdf5Source
from gpuloader.sources.npy import NpySource

__all__ = ["ArraysSource", "FieldSpec", "Hdf5Source", "NpySource", "Source", "StorageInfo",
           "coalesce_runs", "rows_per_block", "sample_nbytes"]
