"""Checks of the harness's arguments (names, counts, durations, the device)."""
from __future__ import annotations

import math
import os
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from gpuloader.devices import resolve_device as _resolve
from gpuloader.errors import ArgumentError, ArgumentTypeError, describe


def check_names(name: str, values: Optional[Sequence[str]], accepted: Sequence[str],
                default: Sequence[str]) -> List[str]:
    """``values`` checked against ``accepted``, duplicates dropped; ``default`` when None.

    ``values`` may also be one comma-separated string (as the command line gives it).
    """
    if values is None:
        return list(default)
    if isinstance(values, str):
        values = [v for v in values.split(",") if v]
    result = []
    for v in values:
        if v not in accepted:
            raise ArgumentError(
                f"{name} must name some of {', '.join(map(repr, accepted))}, got {describe(v)}"
            )
        if v not in result:
            result.append(v)
    if not result:
        raise ArgumentError(f"{name} must name at least one of {', '.join(accepted)}, got none")
    return result


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__} "
                                f"{describe(value)}")
    if value < 1:
        raise ArgumentError(f"{name} must be an int >= 1, got {value}")
    return int(value)


def non_negative(name: str, value: Any) -> float:
    """``value`` as a finite float >= 0 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ArgumentTypeError(f"{name} must be a number, got {describe(value)}")
    if not math.isfinite(value) or value < 0:
        raise ArgumentError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def worker_counts(num_workers: Optional[Union[int, Sequence[int]]]) -> List[int]:
    """The torch worker counts to run, deduped; default ``0`` and ``min(4, CPUs)``."""
    if num_workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return sorted({0, min(4, cpus or 1)})
    workers: List[int] = []
    for w in ([num_workers] if isinstance(num_workers, int) else num_workers):
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 0:
            raise ArgumentError(
                f"num_workers must be ints >= 0 (0: load in the main process), got {w!r}"
            )
        if int(w) not in workers:
            workers.append(int(w))
    return workers


def resolve_device(device: Optional[Union[str, torch.device]]) -> Tuple[torch.device,
                                                                          Optional[str]]:
    """``(torch.device, the argument for gpuloader.DataLoader)``; None means CPU batches.
    A device that is absent, or CUDA without CUDA, is gpuloader's DeviceError."""
    if device is None:
        return torch.device("cpu"), None
    resolved = _resolve(device)
    assert resolved is not None  # only None resolves to None
    return resolved, str(resolved)