"""Storage backends: each implements the Source protocol of :mod:`gpuloader.sources.base`."""
from gpuloader.sources.base import FieldSpec, Source, coalesce_runs, rows_per_block, sample_nbytes

__all__ = ["FieldSpec", "Source", "coalesce_runs", "rows_per_block", "sample_nbytes"]
