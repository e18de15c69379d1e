"""Resolving the ``device=`` argument of the loader into a torch.device (or None)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from gpuloader.errors import DeviceError, describe

DeviceArg = Union[None, str, int, torch.device]

_ACCEPTED = 'None, "cpu", "auto", "cuda" or "cuda:N" (N < the number of visible GPUs), or a torch.device'


def resolve_device(device: DeviceArg) -> Optional[torch.device]:
    """None stays None (CPU batches, like torch); "auto" is CUDA when present, else the CPU.

    A CUDA device on a machine without CUDA, or an index that does not exist, is a DeviceError.
    """
    if device is None:
        return None
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        target = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device must be {_ACCEPTED}; got {describe(device)}") from None
    if target.type == "cpu":
        return target
    if target.type != "cuda":
        raise DeviceError(f"device must be {_ACCEPTED}; got {describe(device)} "
                          f"(device type {target.type!r} is not supported)")
    if not torch.cuda.is_available():
        raise DeviceError(f"device={describe(device)} asks for CUDA, but CUDA is not available "
                          'on this machine; use device=None or "cpu" (or "auto" to pick CUDA '
                          "only when present)")
    count = torch.cuda.device_count()
    index = target.index if target.index is not None else torch.cuda.current_device()
    if index >= count:
        raise DeviceError(f"device={describe(device)} does not exist: this machine has {count} "
                          f"CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)
