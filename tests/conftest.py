"""Shared fixtures: small .npy / raw / HDF5 files built in ``tmp_path``.

``data_files`` returns a :class:`DataFiles` factory; every file it writes lives in the test's
own ``tmp_path``.  ``sample_arrays(n)`` gives a dict of typical fields (multi-dim float32, int64
labels, float16) to write or compare against.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import h5py
import numpy as np
import pytest
import torch

#: An HDF5 dataset spec: an array, or (array, h5py create_dataset keyword arguments).
H5Value = Union[np.ndarray, Tuple[np.ndarray, Dict[str, Any]]]


def sample_arrays(n: int = 50, seed: int = 0) -> Dict[str, np.ndarray]:
    """Fields ``x`` float32 (n, 4, 3), ``y`` int64 (n,), ``w`` float16 (n, 2); deterministic."""
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, 4, 3)).astype(np.float32),
        "y": np.arange(n, dtype=np.int64) * 7 - 3,
        "w": rng.standard_normal((n, 2)).astype(np.float16),
    }


@dataclass
class DataFiles:
    """Writes small data files under ``root`` and returns their paths."""

    root: Path
    _count: int = field(default=0, repr=False)

    def _fresh_dir(self, name: Optional[str]) -> Path:
        self._count += 1
        path = self.root / (name or f"data{self._count}")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def npy(self, name: str, array: np.ndarray, *, folder: Optional[str] = None,
            fortran: bool = False) -> Path:
        """``<root>[/folder]/<name>.npy`` holding ``array`` (column-major if ``fortran``)."""
        where = self.root / folder if folder else self.root
        where.mkdir(parents=True, exist_ok=True)
        path = where / f"{name}.npy"
        np.save(path, np.asfortranarray(array) if fortran else array)
        return path

    def npy_dir(self, arrays: Mapping[str, np.ndarray], name: Optional[str] = None) -> Path:
        """A folder with one ``<field>.npy`` per entry of ``arrays``."""
        folder = self._fresh_dir(name)
        for key, arr in arrays.items():
            np.save(folder / f"{key}.npy", arr)
        return folder

    def raw(self, name: str, array: np.ndarray, suffix: str = ".bin") -> Path:
        """``array``'s bytes (C order, no header) in ``<root>/<name><suffix>``."""
        path = self.root / f"{name}{suffix}"
        np.ascontiguousarray(array).tofile(path)
        return path

    def h5(self, datasets: Mapping[str, H5Value], name: str = "data.h5",
           **file_kwargs: Any) -> Path:
        """An HDF5 file with one dataset per entry (``"grp/z"`` keys create groups).

        A value is an array or ``(array, kwargs)`` with h5py ``create_dataset`` options, e.g.
        ``(x, {"chunks": (8, 4, 3), "compression": "gzip"})``.  An array of ``None`` with
        ``{"shape": ..., "dtype": ..., "chunks": ...}`` creates a dataset never written.
        ``file_kwargs`` go to ``h5py.File`` (e.g. ``userblock_size=512``, ``libver="latest"``).
        """
        path = self.root / name
        with h5py.File(path, "w", **file_kwargs) as h5:
            for key, value in datasets.items():
                array, options = value if isinstance(value, tuple) else (value, {})
                if array is None:
                    h5.create_dataset(key, **options)
                else:
                    h5.create_dataset(key, data=array, **options)
        return path

    def write(self, name: str, data: bytes) -> Path:
        """A file with exactly ``data`` (for corrupt / truncated inputs)."""
        path = self.root / name
        path.write_bytes(data)
        return path


@pytest.fixture
def data_files(tmp_path: Path) -> DataFiles:
    """A :class:`DataFiles` factory writing into this test's ``tmp_path``."""
    return DataFiles(tmp_path)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator, so failures reproduce."""
    return np.random.default_rng(1234)


def fork_available() -> bool:
    """True where multiprocessing's 'fork' start method exists (POSIX)."""
    return os.name == "posix" and hasattr(os, "fork")


@pytest.fixture
def one_compute_thread():
    """Tiny models: torch's intra-op threads would only contend with the reader threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hypothesis_missing() -> bool:
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        return True
    return False


HYPOTHESIS_MISSING = _hypothesis_missing()

if not HYPOTHESIS_MISSING and os.environ.get("CI"):
    # CI runs each property on a fixed series of examples (a run that fails fails again and
    # a landing is never lost to an unlucky draw); local runs keep exploring new examples.
    from hypothesis import settings as _settings

    _settings.register_profile("ci", derandomize=True, database=None)
    _settings.load_profile("ci")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """hypothesis is a test extra (installed in CI): on a machine without it — the bare GPU
    machine benchmarks/gpu_check.sh runs on — a test module that imports it is skipped, not
    an error that ends the run (``pytest -m cuda`` must still collect)."""
    outcome = yield
    report = outcome.get_result()
    if HYPOTHESIS_MISSING and report.failed and "hypothesis" in str(report.longrepr):
        report.outcome = "skipped"
        report.longrepr = (str(collector.path), 0,
                           "Skipped: needs hypothesis (pip install -e .[test])")


#: Standard-library modules copied by ``py_sources``: real Python text, ~60 KB together.
STDLIB_SOURCES = ("textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py")


@pytest.fixture
def py_sources(tmp_path: Path) -> Path:
    """A folder ``tmp_path/src`` holding a few standard-library sources (STDLIB_SOURCES)."""
    import shutil
    import sysconfig

    folder = tmp_path / "src"
    folder.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_SOURCES:
        shutil.copy(stdlib / name, folder / name)
    return folder
