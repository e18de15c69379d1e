"""The argument checks and small conversions every library module shares, each written once.

Messages follow one pattern (NOTE(clear-errors) in DESIGN.md): the argument's name, what is
accepted, and the value received — ``"prefetch_depth must be an int >= 0, got -1"``; a value of
the wrong type also names its type — ``"seed must be an int, got float 1.5"``.
"""
from __future__ import annotations

import functools
import operator
from typing import Iterable, Optional

import numpy as np
import torch

from gpuloader.errors import ArgumentError, ArgumentTypeError, DeviceError, describe

#: Accepted values of ``order=`` (see NOTE(epoch-order) in order.py).
ORDERS = ("sequential", "shuffle", "block")


def as_int(name: str, value: object, accepted: str = "an int") -> int:
    """``value`` as a Python int: numpy integers accepted; bool, float and others refused with
    an ArgumentTypeError naming ``name``, ``accepted`` and the value's type."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise ArgumentTypeError(f"{name} must be {accepted}, got {type(value).__name__} "
                            f"{describe(value)}")


def int_at_least(name: str, value: object, low: int, accepted: Optional[str] = None) -> int:
    """``value`` as an int ``>= low`` (see :func:`as_int`); ArgumentError below ``low``.
    Both messages say ``accepted``; without it, "an int" for a wrong type and "an int >= low"
    for a value below ``low``."""
    number = as_int(name, value, accepted or "an int")
    if number < low:
        raise ArgumentError(f"{name} must be {accepted or f'an int >= {low}'}, got {number}")
    return number


def index_vector(indices: object) -> "tuple[np.ndarray, bool]":
    """``(array, ok)``: ``ok`` when ``indices`` is a 1-D sequence of integers (or empty), and
    the array is then int64; otherwise it is ``np.asarray(indices)`` as given, for the message
    of the error the caller raises (naming its own argument)."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        return idx, False
    return idx.astype(np.int64, copy=False), True


def check_order(order: object) -> str:
    """``order`` if it is one of :data:`ORDERS`; ArgumentError / ArgumentTypeError otherwise."""
    accepted = f"one of {', '.join(map(repr, ORDERS))}"
    if not isinstance(order, str):
        raise ArgumentTypeError(f"order must be {accepted}, got {type(order).__name__} "
                                f"{describe(order)}")
    if order not in ORDERS:
        raise ArgumentError(f"order must be {accepted}, got {describe(order)}")
    return order


@functools.lru_cache(maxsize=None)
def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype with the same bytes as numpy ``dtype`` (cached: called per batch).

    TypeError / ValueError when torch has no such dtype (strings, objects, ...).
    """
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def parse_device(device: object, accepted: str,
                 other_types: str = "device type {type!r} is not supported") -> torch.device:
    """``device`` (a str, a torch.device, or an int CUDA ordinal) as a torch.device of type
    "cpu" or "cuda".  Says nothing about whether that device exists (see :func:`cuda_ordinal`).

    DeviceError for text torch cannot parse, a negative ordinal or another device type (the
    message then ends with ``other_types``, formatted with that ``type``); ArgumentTypeError for
    any other type.  ``accepted`` describes what the caller takes.
    """
    if isinstance(device, torch.device):
        target = device
    elif isinstance(device, str):
        try:
            target = torch.device(device)
        except RuntimeError:
            raise DeviceError(f"device must be {accepted}, got {describe(device)}") from None
    elif isinstance(device, (int, np.integer)) and not isinstance(device, bool):
        if device < 0:
            raise DeviceError(f"device must be {accepted}, got {device}")
        target = torch.device("cuda", int(device))
    else:
        raise ArgumentTypeError(f"device must be {accepted}, got {type(device).__name__} "
                                f"{describe(device)}")
    if target.type not in ("cpu", "cuda"):
        raise DeviceError(f"device must be {accepted}, got {describe(device)}: "
                          + other_types.format(type=target.type))
    return target


def cuda_ordinal(target: torch.device, original: object, *,
                 default: Optional[int] = None) -> int:
    """The CUDA ordinal ``target`` names; when it names none, ``default`` (None: the current
    CUDA device, which initialises CUDA).

    DeviceError when CUDA is not available or the ordinal is not present; ``original`` is the
    argument as the caller gave it, for the message.
    """
    if not torch.cuda.is_available():
        raise DeviceError(f"device={describe(original)} asks for CUDA, but the device {target} "
                          f"cannot be used: CUDA is not available in this process (torch "
                          f"{torch.__version__}, built for CUDA {torch.version.cuda}); use "
                          "device=None or 'cpu' (or 'auto' to pick CUDA only when present), or "
                          "pass memory_budget= to size batches from a budget")
    count = torch.cuda.device_count()
    index = target.index
    if index is None:
        index = torch.cuda.current_device() if default is None else default
    if index >= count:
        raise DeviceError(f"device={describe(original)} does not exist: this process sees "
                          f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return index


#: Batches the fast path may read ahead; each holds a whole batch in host (and device) memory.
MAX_PREFETCH_DEPTH = 64


def check_loader_options(*, num_workers: object, prefetch_depth: object,
                         reuse_buffers: object) -> None:
    """The DataLoader options torch leaves unchecked or gpuloader adds (issue 15's list):
    a float ``num_workers``, a ring of ``prefetch_depth`` batches that no memory holds, a
    ``reuse_buffers`` that is not a bool."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)):
        raise ArgumentTypeError(f"num_workers option should be an int >= 0; got "
                                f"{describe(num_workers)}; use num_workers=0 to disable "
                                "multiprocessing")
    if isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, (int, np.integer)):
        raise ArgumentTypeError(f"prefetch_depth must be an int in 0..{MAX_PREFETCH_DEPTH}, got "
                                f"{describe(prefetch_depth)}")
    if not 0 <= prefetch_depth <= MAX_PREFETCH_DEPTH:
        raise ArgumentError(f"prefetch_depth must be an int in 0..{MAX_PREFETCH_DEPTH} (batches "
                            f"read ahead, each held in memory), got {prefetch_depth}")
    if not isinstance(reuse_buffers, (bool, np.bool_)):
        raise ArgumentTypeError(f"reuse_buffers must be True or False, got "
                                f"{describe(reuse_buffers)}")


def index_array(values: Iterable[object], what: str) -> np.ndarray:
    """Sample indices from a user's sampler or batch as int64; TypeError naming ``what`` for
    anything but integers (torch fails on them too; truncating 1.7 to 1 would be silent)."""
    out = []
    for value in values:
        try:
            out.append(operator.index(value))  # type: ignore[arg-type]
        except TypeError:
            raise ArgumentTypeError(f"{what} yielded {describe(value)}; samplers must yield "
                                    "int dataset indices") from None
    return np.asarray(out, dtype=np.int64)
