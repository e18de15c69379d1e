"""Resolving the ``device=`` argument of the loader into a torch.device (or None)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from gpuloader.checks import cuda_ordinal, parse_device

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
    target = parse_device(device, _ACCEPTED)
    if target.type == "cpu":
        return target
    return torch.device("cuda", cuda_ordinal(target, device))
