"""gpuloader: feed PyTorch training from .npy / HDF5 data larger than the GPU.

Public API (see README.md): ``DataLoader``, ``ArrayDataset``, ``Ragged``, ``open_dataset``,
``memory_info``/``MemoryInfo``, and the error classes.  ``gpuloader.bench``, ``gpuloader.config``
and ``gpuloader.train`` are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from gpuloader.dataset import ArrayDataset, Ragged, open_dataset
from gpuloader.errors import (ConfigError, DeviceError, FieldNotFoundError, GpuLoaderError,
                              SourceError, SourceNotFoundError)
from gpuloader.loader import DataLoader
from gpuloader.probes import MemoryInfo, memory_info

__version__ = "0.1.0"

__all__ = [
    "ArrayDataset",
    "ConfigError",
    "DataLoader",
    "DeviceError",
    "FieldNotFoundError",
    "GpuLoaderError",
    "MemoryInfo",
    "Ragged",
    "SourceError",
    "SourceNotFoundError",
    "__version__",
    "memory_info",
    "open_dataset",
]

_LAZY = ("bench", "cli", "config", "convert", "demo", "models", "train")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"gpuloader.{name}")
    raise AttributeError(f"module 'gpuloader' has no attribute {name!r}")
