"""Free-memory probes and the batch sizer behind ``batch_size="auto"``.

Probes measure how much memory a device has free.  Each is a small object with ``read()``; the
classmethod ``MemoryProbe.detect(device)`` (inherited by every probe) builds the right one for a
device, and tests build probes directly instead of patching torch:

=============  ==================================================================================
CudaProbe      ``torch.cuda.mem_get_info`` plus this process's cached-but-unused allocator memory,
               when CUDA is already initialised here; otherwise NVML (no CUDA context is created).
NvmlProbe      ``nvmlDeviceGetMemoryInfo`` for a CUDA ordinal (``CUDA_VISIBLE_DEVICES`` honoured).
HostProbe      ``psutil.virtual_memory()``, tightened by a container's cgroup memory limit.
FixedProbe     a budget the caller gives (``memory_budget=``).
=============  ==================================================================================

The sizer is pure arithmetic (``plan_batch_size``), so the rule is unit-testable without devices;
``CostModel`` learns the step's memory cost from measured peaks.

NOTE(batch-sizing): ``plan_batch_size(free, cfg, learned)`` returns, in this order:

=====  ======================================================================================
1      ``staging = staging_bytes_per_sample * ring_slots`` (the staging ring holds every slot);
       ``step, fixed = learned.per_sample, learned.intercept`` when ``learned`` has a fit,
       else ``sample_bytes, 0``
2      ``size = (floor(free * memory_fraction) - ceil(fixed)) // (staging + ceil(step))``
       (no memory bound when that cost is 0)
3      step cost unknown (``sample_bytes == 0``, no fit) and ``max_batch_size is None``:
       ``size = min(size, unknown_cost_cap // staging)`` (the 1 GiB staging cap)
4      ``size >= 8``: round down to a multiple of 8
5      clamp to ``[min_batch_size, max_batch_size]`` (explicit bounds win over the rounding)
6      ``min(size, dataset_len)``, then at least 1
=====  ======================================================================================

Each step is non-decreasing in ``free``, so the result is too.  Whenever the result is above
``min_batch_size``, ``result * (staging + step) + fixed <= free * memory_fraction``.
``free`` must count the memory the batches may use, including the staging ring's own bytes if
it is already allocated.
"""
from __future__ import annotations

import math
import numbers
import operator
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import psutil
import torch

from gpuloader.errors import (
    ArgumentError,
    ArgumentTypeError,
    DeviceError,
    MemoryProbeError,
    describe,
)

__all__ = [
    "MemoryInfo",
    "memory_info",
    "MemoryProbe",
    "CudaProbe",
    "NvmlProbe",
    "HostProbe",
    "FixedProbe",
    "probe_for",
    "SizerConfig",
    "plan_batch_size",
    "CostModel",
    "validate_memory_fraction",
    "validate_memory_budget",
    "validate_sample_bytes",
    "validate_batch_bounds",
    "validate_sizing",
]

DeviceLike = Union[str, torch.device, int]

#: Staging-ring cap (bytes) while the per-sample step cost is unknown, see NOTE(batch-sizing).
UNKNOWN_COST_CAP = 1 << 30


# --------------------------------------------------------------------------------------------
# argument validation


def _int_arg(name: str, value: object, accepted: str) -> int:
    """``value`` as a Python int (numpy integers accepted; bool, float and others refused)."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise ArgumentTypeError(
        f"{name} must be {accepted}, got {type(value).__name__} {describe(value)}"
    )


def _int_at_least(name: str, value: object, low: int, accepted: str) -> int:
    number = _int_arg(name, value, accepted)
    if number < low:
        raise ArgumentError(f"{name} must be {accepted}, got {number}")
    return number


def validate_memory_fraction(memory_fraction: object) -> float:
    """``memory_fraction`` as a float in ``(0, 1]``: the share of free memory sizing plans for."""
    accepted = "a number in (0, 1], the share of free memory batches may use"
    if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, numbers.Real):
        raise ArgumentTypeError(
            f"memory_fraction must be {accepted}, got "
            f"{type(memory_fraction).__name__} {describe(memory_fraction)}"
        )
    value = float(memory_fraction)
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise ArgumentError(f"memory_fraction must be {accepted}, got {describe(memory_fraction)}")
    return value


def validate_memory_budget(memory_budget: object) -> Optional[int]:
    """``memory_budget`` as a positive int of bytes, or None (measure free memory instead)."""
    if memory_budget is None:
        return None
    return _int_at_least(
        "memory_budget",
        memory_budget,
        1,
        "a positive int of bytes (e.g. 8 << 30 for 8 GiB), or None to measure free memory",
    )


def validate_sample_bytes(sample_bytes: object) -> int:
    """``sample_bytes`` as an int >= 0: extra bytes one sample costs in the step (0: unknown)."""
    return _int_at_least(
        "sample_bytes",
        sample_bytes,
        0,
        "an int >= 0 of bytes one sample costs in the training step (0 if unknown)",
    )


def validate_batch_bounds(
    min_batch_size: object, max_batch_size: object
) -> Tuple[int, Optional[int]]:
    """``(min_batch_size, max_batch_size)``: positive ints with min <= max; max may be None."""
    low = _int_at_least("min_batch_size", min_batch_size, 1, "a positive int")
    if max_batch_size is None:
        return low, None
    high = _int_at_least("max_batch_size", max_batch_size, 1, "a positive int or None")
    if high < low:
        raise ArgumentError(
            f"max_batch_size must be None or >= min_batch_size={low}, got max_batch_size={high}"
        )
    return low, high


def validate_sizing(
    *,
    memory_fraction: object = 0.8,
    memory_budget: object = None,
    sample_bytes: object = 0,
    min_batch_size: object = 1,
    max_batch_size: object = None,
) -> None:
    """Validate every batch-sizing option of the loader at once (see the ``validate_*`` helpers)."""
    validate_memory_fraction(memory_fraction)
    validate_memory_budget(memory_budget)
    validate_sample_bytes(sample_bytes)
    validate_batch_bounds(min_batch_size, max_batch_size)


# --------------------------------------------------------------------------------------------
# probes


@dataclass(frozen=True)
class MemoryInfo:
    """Memory of one device at one moment: ``free`` and ``total`` in bytes, and where they came
    from (``source``: "torch.cuda.mem_get_info+cache", "nvml", "psutil", "psutil+cgroup",
    "budget")."""

    free: int
    total: int
    source: str

    @property
    def used(self) -> int:
        """``total - free``, in bytes."""
        return self.total - self.free


class MemoryProbe:
    """Base of the probes: ``read()`` measures now; ``detect(device)`` picks a probe."""

    def read(self) -> MemoryInfo:
        """Measure free and total memory now."""
        raise NotImplementedError

    @classmethod
    def detect(
        cls,
        device: DeviceLike = "cuda:0",
        *,
        memory_budget: Optional[int] = None,
        init_cuda: bool = False,
    ) -> "MemoryProbe":
        """The probe for ``device``: FixedProbe with a budget, HostProbe for "cpu", CudaProbe
        for a CUDA device (DeviceError when CUDA is not available or the index is absent)."""
        budget = validate_memory_budget(memory_budget)
        if budget is not None:
            return FixedProbe(budget)
        target = _parse_device(device)
        if target.type == "cpu":
            return HostProbe()
        return CudaProbe(_cuda_index(target, device), init_cuda=init_cuda)


def _parse_device(device: object) -> torch.device:
    accepted = 'a device such as "cpu", "cuda", "cuda:0", a torch.device or a CUDA index (int)'
    if isinstance(device, torch.device):
        target = device
    elif isinstance(device, str):
        try:
            target = torch.device(device)
        except RuntimeError:
            raise DeviceError(f"device must be {accepted}, got {describe(device)}") from None
    elif not isinstance(device, bool) and isinstance(device, int):
        if device < 0:
            raise DeviceError(f"device must be {accepted}, got {device}")
        target = torch.device("cuda", device)
    else:
        raise ArgumentTypeError(
            f"device must be {accepted}, got {type(device).__name__} {describe(device)}"
        )
    if target.type not in ("cpu", "cuda"):
        raise DeviceError(
            f"device must be {accepted}; memory of {target.type!r} devices cannot be probed, "
            f"got {describe(device)} (pass memory_budget= to size batches from a budget)"
        )
    return target


def _cuda_index(target: torch.device, original: object) -> int:
    """CUDA ordinal of ``target``; DeviceError when CUDA is unavailable or the index is absent."""
    if not torch.cuda.is_available():
        shown = describe(original) if str(original) == str(target) else (
            f"{describe(original)} ({target})"
        )
        raise DeviceError(
            f"device {shown}: CUDA is not available in this process "
            f"(torch.cuda.is_available() is False; torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); use device='cpu' for host memory or pass memory_budget="
        )
    count = torch.cuda.device_count()
    if target.index is None:
        return torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    if target.index >= count:
        raise DeviceError(
            f"device {describe(original)} is not present: this process sees {count} CUDA "
            f"device(s), cuda:0 .. cuda:{count - 1}"
        )
    return target.index


@dataclass(frozen=True)
class FixedProbe(MemoryProbe):
    """A fixed budget: ``free`` bytes (``memory_budget=``) out of ``total`` (default ``free``)."""

    free: int
    total: Optional[int] = None

    def __post_init__(self) -> None:
        free = _int_at_least("memory_budget", self.free, 1, "a positive int of bytes")
        total = free if self.total is None else _int_at_least(
            "total", self.total, free, f"an int of bytes >= free={free}, or None"
        )
        object.__setattr__(self, "free", free)
        object.__setattr__(self, "total", total)

    def read(self) -> MemoryInfo:
        return MemoryInfo(free=self.free, total=int(self.total or self.free), source="budget")


def _read_int_file(path: Path) -> Optional[int]:
    """The integer in a cgroup file; None for "max", a missing or unreadable file."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


@dataclass(frozen=True)
class HostProbe(MemoryProbe):
    """Host RAM: ``psutil.virtual_memory()`` available / total, tightened by the cgroup memory
    limit when the process runs in a limited container (cgroup v2 ``memory.max``, or v1
    ``memory/memory.limit_in_bytes``, under ``cgroup_root``).

    In a cgroup, free is ``limit - (usage - inactive_file)``: page cache the kernel can drop (the
    memory-mapped dataset) does not count as used.
    """

    cgroup_root: Optional[Path] = Path("/sys/fs/cgroup")

    def _cgroup(self) -> Optional[Tuple[int, int]]:
        """``(limit, working_set)`` in bytes, or None without a memory limit."""
        if self.cgroup_root is None:
            return None
        root = Path(self.cgroup_root)
        limit = _read_int_file(root / "memory.max")
        if limit is not None:  # cgroup v2
            usage = _read_int_file(root / "memory.current") or 0
            inactive = _read_stat(root / "memory.stat", "inactive_file")
        else:  # cgroup v1; "unlimited" reads as a huge number
            v1 = root / "memory"
            limit = _read_int_file(v1 / "memory.limit_in_bytes")
            if limit is None:
                return None
            usage = _read_int_file(v1 / "memory.usage_in_bytes") or 0
            inactive = _read_stat(v1 / "memory.stat", "total_inactive_file")
        return limit, max(0, usage - inactive)

    def read(self) -> MemoryInfo:
        vm = psutil.virtual_memory()
        free, total = int(vm.available), int(vm.total)
        cgroup = self._cgroup()
        if cgroup is None or cgroup[0] >= total:
            return MemoryInfo(free=free, total=total, source="psutil")
        limit, working_set = cgroup
        return MemoryInfo(
            free=min(free, max(0, limit - working_set)), total=limit, source="psutil+cgroup"
        )


# NVML is initialised at most once per process and never shut down (other libraries in the
# process may share it).  A failure is remembered so every later read fails fast with the reason.
_NVML_LOCK = threading.Lock()
_NVML_STATE: Dict[str, Any] = {"ready": False, "error": None}


def _nvml() -> Any:
    """The initialised ``pynvml`` module; MemoryProbeError with the reason otherwise."""
    with _NVML_LOCK:
        if not _NVML_STATE["ready"] and _NVML_STATE["error"] is None:
            try:
                import pynvml

                pynvml.nvmlInit()
            except ImportError as exc:
                _NVML_STATE["error"] = f"pynvml is not installed ({exc})"
            except Exception as exc:  # pynvml.NVMLError and its many subclasses, OSError
                _NVML_STATE["error"] = f"{type(exc).__name__}: {exc}"
            else:
                _NVML_STATE["ready"] = True
        if _NVML_STATE["error"] is not None:
            raise MemoryProbeError(f"NVML is unavailable: {_NVML_STATE['error']}")
    import pynvml

    return pynvml


def _text(value: Union[str, bytes]) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _visible_devices() -> Optional[list]:
    """``CUDA_VISIBLE_DEVICES`` as a list of physical ints / UUID prefixes; None when unset.

    Like CUDA, parsing stops at the first entry that is neither.
    """
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries: list = []
    for token in (part.strip() for part in value.split(",")):
        if token.isdigit():
            entries.append(int(token))
        elif token.startswith(("GPU-", "MIG-")):
            entries.append(token)
        else:
            break
    return entries


@dataclass(frozen=True)
class NvmlProbe(MemoryProbe):
    """GPU memory through NVML, without a CUDA context.  ``index`` is the CUDA ordinal (as in
    "cuda:<index>"); ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs) maps it to the NVML device.
    NVML enumerates in PCI bus order, so on machines mixing GPU models set
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` for the ordinals to agree.  MIG instances are refused
    (NVML's device memory would be the whole GPU's).  Every failure is a MemoryProbeError
    naming the reason.  ``library`` stands in for the initialised ``pynvml`` module (tests pass
    a fake)."""

    index: int = 0
    library: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "index", _int_at_least("index", self.index, 0, "a CUDA ordinal >= 0")
        )

    def _handle(self, nvml: Any) -> Any:
        visible = _visible_devices()
        if visible is None:
            return nvml.nvmlDeviceGetHandleByIndex(self.index)
        if self.index >= len(visible):
            raise MemoryProbeError(
                f"cuda:{self.index} is not visible: CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r} lists {len(visible)} device(s)"
            )
        entry = visible[self.index]
        if isinstance(entry, int):
            return nvml.nvmlDeviceGetHandleByIndex(entry)
        if entry.startswith("MIG-"):
            raise MemoryProbeError(
                f"cuda:{self.index} is the MIG instance {entry}; NVML reports the whole GPU's "
                f"memory"
            )
        for physical in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(physical)
            if _text(nvml.nvmlDeviceGetUUID(handle)).startswith(entry):
                return handle
        raise MemoryProbeError(f"no GPU has the UUID {entry!r} named in CUDA_VISIBLE_DEVICES")

    def read(self) -> MemoryInfo:
        nvml = _nvml() if self.library is None else self.library
        try:
            handle = self._handle(nvml)
            try:
                current, _pending = nvml.nvmlDeviceGetMigMode(handle)
            except nvml.NVMLError:  # not a MIG-capable GPU
                current = 0
            if current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
                raise MemoryProbeError(
                    f"cuda:{self.index} is a GPU in MIG mode; NVML reports the whole GPU's memory"
                )
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
        except nvml.NVMLError as exc:
            raise MemoryProbeError(
                f"NVML could not read the memory of cuda:{self.index}: {type(exc).__name__}: {exc}"
            ) from exc
        return MemoryInfo(free=int(info.free), total=int(info.total), source="nvml")


@dataclass(frozen=True)
class CudaProbe(MemoryProbe):
    """Free memory of CUDA device ``index`` as this process can use it.

    With CUDA initialised in this process: ``torch.cuda.mem_get_info`` free plus the caching
    allocator's reserved-but-unallocated bytes (ours to reuse).  Without: NVML, so measuring never
    creates a CUDA context.  When NVML fails too, ``init_cuda=True`` falls back to torch
    (initialising CUDA); otherwise the MemoryProbeError says why and what to do.
    """

    index: int = 0
    init_cuda: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "index", _int_at_least("index", self.index, 0, "a CUDA ordinal >= 0")
        )

    def _read_torch(self) -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(self.index)
        cached = torch.cuda.memory_reserved(self.index) - torch.cuda.memory_allocated(self.index)
        return MemoryInfo(
            free=int(free) + max(0, int(cached)),
            total=int(total),
            source="torch.cuda.mem_get_info+cache",
        )

    def read(self) -> MemoryInfo:
        if torch.cuda.is_initialized():
            return self._read_torch()
        try:
            return NvmlProbe(self.index).read()
        except MemoryProbeError as exc:
            reason = str(exc)
        if not self.init_cuda:
            raise MemoryProbeError(
                f"cannot measure free memory of cuda:{self.index} without creating a CUDA "
                f"context ({reason}); initialise CUDA first (e.g. torch.cuda.init()), allow it "
                f"with init_cuda=True, or pass memory_budget="
            )
        if not torch.cuda.is_available():
            raise MemoryProbeError(
                f"cannot measure free memory of cuda:{self.index}: CUDA is not available "
                f"({reason}); pass memory_budget= or use device='cpu'"
            )
        return self._read_torch()


def probe_for(
    device: torch.device, memory_budget: Optional[int], *, init_cuda: bool = True
) -> MemoryProbe:
    """The probe the loader sizes batches with: FixedProbe for a budget, else the device's probe.

    ``init_cuda`` defaults to True here: a loader feeding a CUDA device initialises CUDA anyway.
    """
    return MemoryProbe.detect(device, memory_budget=memory_budget, init_cuda=init_cuda)


def memory_info(device: DeviceLike = "cuda:0", *, init_cuda: bool = False) -> MemoryInfo:
    """Free and total memory of ``device`` now (bytes).

    ``device``: "cpu" (host RAM), "cuda", "cuda:N", a torch.device, or a CUDA index.  Never creates
    a CUDA context unless ``init_cuda=True`` (see CudaProbe).  DeviceError when the device is not
    present; MemoryProbeError when it cannot be measured.
    """
    return MemoryProbe.detect(device, init_cuda=init_cuda).read()


# --------------------------------------------------------------------------------------------
# batch sizer


@dataclass(frozen=True)
class SizerConfig:
    """Inputs of ``plan_batch_size`` that do not change between plans (see NOTE(batch-sizing)).

    Bytes throughout.  ``staging_bytes_per_sample``: one sample over all fields;
    ``ring_slots``: how many batch-sized staging slots exist at once.
    Pass fields by keyword.
    """

    staging_bytes_per_sample: int
    ring_slots: int
    dataset_len: int
    memory_fraction: float = 0.8
    sample_bytes: int = 0
    min_batch_size: int = 1
    max_batch_size: Optional[int] = None
    unknown_cost_cap: int = UNKNOWN_COST_CAP

    def __post_init__(self) -> None:
        values = {
            "staging_bytes_per_sample": _int_at_least(
                "staging_bytes_per_sample", self.staging_bytes_per_sample, 0, "an int >= 0"
            ),
            "ring_slots": _int_at_least("ring_slots", self.ring_slots, 1, "a positive int"),
            "dataset_len": _int_at_least("dataset_len", self.dataset_len, 0, "an int >= 0"),
            "memory_fraction": validate_memory_fraction(self.memory_fraction),
            "sample_bytes": validate_sample_bytes(self.sample_bytes),
            "unknown_cost_cap": _int_at_least(
                "unknown_cost_cap", self.unknown_cost_cap, 1, "a positive int of bytes"
            ),
        }
        values["min_batch_size"], values["max_batch_size"] = validate_batch_bounds(
            self.min_batch_size, self.max_batch_size
        )
        for name, value in values.items():
            object.__setattr__(self, name, value)


def plan_batch_size(
    free_bytes: int, cfg: SizerConfig, learned: Optional["CostModel"] = None
) -> int:
    """Batch size for ``free_bytes`` of free memory, following NOTE(batch-sizing).

    Negative ``free_bytes`` counts as 0.  ``learned`` replaces ``cfg.sample_bytes`` once it has a
    fit.
    """
    free = max(0, _int_arg("free_bytes", free_bytes, "an int of bytes"))
    staging = cfg.staging_bytes_per_sample * cfg.ring_slots
    fit = learned.fit if learned is not None else None
    fitted = fit is not None
    if fit is not None:
        step, fixed = math.ceil(fit[0]), math.ceil(fit[1])
    else:
        step, fixed = cfg.sample_bytes, 0
    cost = staging + step
    if cost > 0:
        size = max(0, math.floor(free * cfg.memory_fraction) - fixed) // cost
    elif fixed > free * cfg.memory_fraction:  # even the fixed part does not fit
        size = 0
    else:  # nothing scales with the batch: memory sets no bound
        size = sys.maxsize
    if not fitted and cfg.sample_bytes == 0 and cfg.max_batch_size is None and staging > 0:
        size = min(size, cfg.unknown_cost_cap // staging)
    if size >= 8:
        size -= size % 8
    size = max(size, cfg.min_batch_size)
    if cfg.max_batch_size is not None:
        size = min(size, cfg.max_batch_size)
    return max(1, min(size, cfg.dataset_len))


class CostModel:
    """Online linear model of a training step's peak memory versus batch size.

    ``observe(batch_size, peak_bytes)`` records a measured peak (bytes the step needed beyond what
    was allocated before it).  The largest peak per batch size is kept, for the ``max_points``
    most recently seen sizes (bounded memory).  Once two distinct sizes are known:
    ``per_sample`` is the least-squares slope (clamped >= 0) and ``intercept`` is chosen so the
    line lies on or above every kept observation — an under-estimate costs an OOM, an
    over-estimate only a slightly smaller batch.  Not thread-safe; the loader owns one.
    """

    def __init__(self, *, max_points: int = 64) -> None:
        self._max_points = _int_at_least("max_points", max_points, 2, "an int >= 2")
        self._peaks: Dict[int, int] = {}
        self._fit: Optional[Tuple[float, float]] = None

    def __repr__(self) -> str:
        return (
            f"CostModel(points={len(self._peaks)}, per_sample={self.per_sample}, "
            f"intercept={self.intercept})"
        )

    def observe(self, batch_size: int, peak_bytes: int) -> None:
        """Record that a step on ``batch_size`` samples peaked at ``peak_bytes`` bytes."""
        size = _int_at_least("batch_size", batch_size, 1, "a positive int")
        peak = _int_at_least("peak_bytes", peak_bytes, 0, "an int >= 0 of bytes")
        previous = self._peaks.pop(size, None)
        self._peaks[size] = peak if previous is None else max(previous, peak)
        while len(self._peaks) > self._max_points:
            del self._peaks[next(iter(self._peaks))]
        self._fit = self._solve()

    def reset(self) -> None:
        """Forget every observation (e.g. after the model or optimizer changed)."""
        self._peaks.clear()
        self._fit = None

    def _solve(self) -> Optional[Tuple[float, float]]:
        if len(self._peaks) < 2:
            return None
        xs = list(self._peaks)
        ys = [float(self._peaks[x]) for x in xs]
        mean_x = sum(xs) / len(xs)
        mean_y = sum(ys) / len(ys)
        sxx = sum((x - mean_x) ** 2 for x in xs)
        sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
        slope = max(0.0, sxy / sxx)
        intercept = max(y - slope * x for x, y in zip(xs, ys))
        return slope, max(0.0, intercept)

    @property
    def fit(self) -> Optional[Tuple[float, float]]:
        """``(per_sample, intercept)`` in bytes, or None before two distinct sizes are seen."""
        return self._fit

    @property
    def has_fit(self) -> bool:
        """True once two distinct batch sizes have been observed."""
        return self._fit is not None

    @property
    def per_sample(self) -> Optional[float]:
        """Bytes each extra sample adds to the step's peak; None before a fit."""
        return None if self._fit is None else self._fit[0]

    @property
    def intercept(self) -> Optional[float]:
        """Bytes the step needs whatever the batch size; None before a fit."""
        return None if self._fit is None else self._fit[1]

    def predict(self, batch_size: int) -> Optional[float]:
        """Predicted peak bytes of a step on ``batch_size`` samples; None before a fit."""
        if self._fit is None:
            return None
        size = _int_at_least("batch_size", batch_size, 1, "a positive int")
        return self._fit[1] + self._fit[0] * size

    def predict_max_batch(self, free_bytes: int, fraction: float = 0.8) -> Optional[int]:
        """Largest batch whose predicted step peak fits ``free_bytes * fraction`` (may be 0).

        None before a fit, and when the peak does not grow with the batch (memory sets no bound).
        """
        share = validate_memory_fraction(fraction)
        free = max(0, _int_arg("free_bytes", free_bytes, "an int of bytes"))
        if self._fit is None or self._fit[0] <= 0.0:
            return None
        slope, intercept = self._fit
        room = math.floor(free * share) - math.ceil(intercept)
        return max(0, math.floor(room / slope))
