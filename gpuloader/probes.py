"""Free-memory probes: how much memory a device has free, measured without side effects.

Each probe is a small object with ``read()``; the classmethod ``MemoryProbe.detect(device)``
(inherited by every probe) builds the right one for a device, and tests build probes directly
instead of patching torch:

=============  ==================================================================================
CudaProbe      ``torch.cuda.mem_get_info`` plus this process's cached-but-unused allocator memory,
               when CUDA is already initialised here; otherwise NVML (no CUDA context is created).
NvmlProbe      ``nvmlDeviceGetMemoryInfo`` for a CUDA ordinal (``CUDA_VISIBLE_DEVICES`` honoured).
HostProbe      ``psutil.virtual_memory()``, tightened by a container's cgroup memory limit.
FixedProbe     a budget the caller gives (``memory_budget=``).
=============  ==================================================================================

What the loader plans from these figures is in planning.py.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import psutil
import torch

from gpuloader.allocator import allocatable
from gpuloader.checks import cuda_ordinal, int_at_least, parse_device
from gpuloader.errors import MemoryProbeError

__all__ = ["MemoryInfo", "memory_info", "MemoryProbe", "CudaProbe", "NvmlProbe", "HostProbe",
           "FixedProbe", "probe_for", "validate_memory_budget"]

DeviceLike = Union[str, torch.device, int]

_ACCEPTED = 'a device such as "cpu", "cuda", "cuda:0", a torch.device or a CUDA index (int)'


def validate_memory_budget(memory_budget: object) -> Optional[int]:
    """``memory_budget`` as a positive int of bytes, or None (measure free memory instead)."""
    if memory_budget is None:
        return None
    return int_at_least(
        "memory_budget",
        memory_budget,
        1,
        "a positive int of bytes (e.g. 8 << 30 for 8 GiB), or None to measure free memory",
    )


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
        target = parse_device(device, _ACCEPTED,
                              "memory of {type!r} devices cannot be probed (pass memory_budget= "
                              "to size batches from a budget)")
        if target.type == "cpu":
            return HostProbe()
        # Never initialises CUDA to pick the default ordinal: "cuda" is the current device
        # once CUDA runs here, else ordinal 0 (what CUDA would make current).
        current = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
        return CudaProbe(cuda_ordinal(target, device, default=current), init_cuda=init_cuda)


@dataclass(frozen=True)
class FixedProbe(MemoryProbe):
    """A fixed budget: ``free`` bytes (``memory_budget=``) out of ``total`` (default ``free``)."""

    free: int
    total: Optional[int] = None

    def __post_init__(self) -> None:
        free = int_at_least("memory_budget", self.free, 1, "a positive int of bytes")
        total = free if self.total is None else int_at_least(
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
            self, "index", int_at_least("index", self.index, 0, "a CUDA ordinal >= 0")
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

    With CUDA initialised in this process: what the caching allocator can hand out — the device's
    free bytes up to ``set_per_process_memory_fraction``'s cap, plus cached blocks a step could
    really use (NOTE(allocatable) in allocator.py).  Without: NVML, so measuring never creates a
    CUDA context.  When NVML fails too, ``init_cuda=True`` falls back to torch (initialising
    CUDA); otherwise the MemoryProbeError says why and what to do.  ``cuda`` stands in for the
    CUDA calls in tests.
    """

    index: int = 0
    init_cuda: bool = False
    cuda: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "index", int_at_least("index", self.index, 0, "a CUDA ordinal >= 0")
        )

    def _read_torch(self) -> MemoryInfo:
        # NOTE(allocatable) in allocator.py: only what the caching allocator can hand a step.
        free, total = allocatable(self.index, cuda=self.cuda)
        return MemoryInfo(free=free, total=total, source="torch.cuda.mem_get_info+cache")

    def read(self) -> MemoryInfo:
        if (torch.cuda if self.cuda is None else self.cuda).is_initialized():
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
