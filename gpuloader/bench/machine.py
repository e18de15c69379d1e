"""What machine a benchmark ran on."""
from __future__ import annotations

import os
import platform
from typing import Any, Dict, Optional

import numpy as np
import torch


def machine_info() -> Dict[str, Any]:
    """CPU, RAM, library versions and GPU of this machine (JSON-ready)."""
    import psutil

    ram = psutil.virtual_memory().total
    cuda = torch.cuda.is_available()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else None),
        "cpu_model": _cpu_model(),
        "ram_bytes": ram,
        "ram_gb": round(ram / 2**30, 1),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "h5py": _h5py_version(),
        "gpuloader": _gpuloader_version(),
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
    }


def _h5py_version() -> Optional[str]:
    try:
        import h5py
    except ImportError:
        return None
    return h5py.__version__


def _gpuloader_version() -> Optional[str]:
    """The installed distribution's version; from a checkout, ``gpuloader.__version__``."""
    from importlib.metadata import version

    try:
        return version("gpuloader")
    except Exception:  # noqa: BLE001 - PackageNotFoundError: running from a checkout
        import gpuloader

        return getattr(gpuloader, "__version__", None)


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
