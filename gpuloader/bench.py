"""Benchmark harness: gpuloader against torch's DataLoader and the raw storage ceiling.

Used by ``gpuloader bench`` (see :func:`add_arguments` / :func:`main`), by the scripts in
``benchmarks/``, and directly from Python::

    import gpuloader as gl
    from gpuloader.bench import compare, write_report

    records = compare(gl.open_dataset("train.h5"), batch_size=256, seconds=2)
    write_report(records, "bench_out")       # results.json, results.md, throughput.png

Cases (the ``loaders`` names):

==============  ===============================================================================
gpuloader       ``gpuloader.DataLoader`` in each requested order (fast path for an ArrayDataset,
                generic path for any other map-style Dataset).
torch           ``torch.utils.data.DataLoader`` on a plain per-sample Dataset (``__getitem__``
                only, ``default_collate``) wrapping the same memmap / HDF5 datasets, once per
                ``num_workers`` value.  For a Dataset that is not an ArrayDataset: that Dataset
                with any ``__getitems__`` hidden.
torch-batched   ``torch.utils.data.DataLoader`` on the Dataset itself, so torch calls its batched
                ``__getitems__`` hook (an ArrayDataset's, or the user's), once per ``num_workers``.
raw             the storage ceiling, single-threaded: ``array[sorted_batch_indices]`` per batch
                for memory-mapped / in-RAM arrays (in each order); for HDF5 the sequential
                ``read_direct`` of consecutive rows into a preallocated buffer.
raw-seq         a sequential copy of consecutive rows into a preallocated buffer (any storage).
h2d             CUDA only: ``copy_(non_blocking=True)`` of a pinned host batch into a
                preallocated device batch: the transfer ceiling.
==============  ===============================================================================

NOTE(bench-fairness): every case of one :func:`compare` call consumes the same number of samples
(``samples``; by default the number the slowest case reads in about ``seconds``, found by a short
calibration run of every case), after the same number of warm-up batches, in whole batches of
``batch_size`` (``drop_last`` everywhere).  The torch and raw cases read the indices of the order
``epoch_order(order, n, seed=seed, epoch=e)`` (the permutation gpuloader's own ``order="shuffle"``
draws with the same seed); the torch cases use the shuffle order when it was requested.  Repeats
are interleaved (repeat 1 of every case, then repeat 2, ...) so slow drifts of machine load hit all
cases alike, and the median repeat is reported.  Each case stops after ``max(3 * seconds, 10)``
seconds whatever it has read and is then marked ``truncated``.

Throughput is samples (and bytes of the delivered batches) over the wall time of the measured
window.  The stall fraction is the share of that window the consumer spent waiting for the next
batch (the time inside ``next()``), the same definition as ``loader.stats()["stall_fraction"]``.
On CUDA the consumer synchronizes its stream when it draws a batch, so time waiting for the copy
counts as stall.  ``compute_ms`` adds a synthetic training step in the consumer after every batch
(not to ``h2d``): on CUDA a loop of matmuls calibrated to take that long, then a synchronize; on
the CPU the consumer sleeps, since a GPU step leaves the CPU and the GIL free
(``compute_kind="spin"`` busy-waits, ``"matmul"`` multiplies on the CPU; see :func:`make_step`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from gpuloader.errors import ArgumentError, ArgumentTypeError, GpuLoaderError, describe
from gpuloader.order import ORDERS, check_order, epoch_order

__all__ = [
    "LOADERS",
    "DEFAULT_LOADERS",
    "RECORD_KEYS",
    "RawField",
    "compare",
    "write_report",
    "build_record",
    "add_ratios",
    "open_case",
    "measure",
    "make_step",
    "Case",
    "Measurement",
    "machine_info",
    "make_synthetic",
    "raw_fields_from_path",
    "add_arguments",
    "main",
]

#: Every case name ``loaders=`` accepts (see the module docstring).
LOADERS: Tuple[str, ...] = ("gpuloader", "torch", "torch-batched", "raw", "raw-seq", "h2d")
#: Cases run when ``loaders`` is None (``h2d`` only when the device is CUDA).
DEFAULT_LOADERS: Tuple[str, ...] = ("gpuloader", "torch", "torch-batched", "raw", "h2d")
#: Keys every record returned by :func:`compare` has (values may be None where they do not apply).
RECORD_KEYS: Tuple[str, ...] = (
    "case", "loader", "order", "batch_size", "num_workers", "device", "compute_ms",
    "samples", "batches", "elapsed_s", "samples_per_s", "gb_per_s", "stall_fraction",
    "ratio_to_ceiling", "ratio_to_torch", "ceiling_case", "torch_case", "repeats", "runs",
    "truncated", "dataset", "machine",
)

_WARMUP_BATCHES = 3
_CALIBRATION_FRACTION = 0.25   # calibration window per case, as a share of ``seconds``
_MAX_EPOCHS_OF_SAMPLES = 50    # the common sample budget never exceeds this many epochs
_MIN_MEASURED_BATCHES = 4
_PLOT_HINT = "pip install gpuloader[plot]"


# --------------------------------------------------------------------------------------------
# Where the bytes are: the baselines read storage directly, bypassing gpuloader.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RawField:
    """Where one field's samples live, for the cases that bypass gpuloader.

    ``kind`` is ``"npy"`` (a ``.npy`` file, memory-mapped), ``"bin"`` (raw binary with ``dtype``,
    ``shape`` and ``offset``), ``"h5"`` (dataset ``key`` of the HDF5 file ``path``) or
    ``"array"`` (an in-RAM array given as ``array``).  :meth:`open` returns an array-like that
    supports ``a[i]``, ``a[sorted_int_array]`` and ``a[start:stop]`` (and ``read_direct`` for
    HDF5).  Handles are opened lazily per process, so the object may cross a fork or a pickle.
    """

    kind: str
    path: Optional[str] = None
    key: Optional[str] = None
    dtype: Optional[str] = None
    shape: Optional[Tuple[int, ...]] = None     # full shape, samples first ("bin" only)
    offset: int = 0
    array: Any = field(default=None, compare=False, repr=False)

    def open(self) -> Any:
        """The array-like for this process (cached per process id; see :func:`close_raw`)."""
        cache_key = (os.getpid(), self.kind, self.path, self.key, id(self.array))
        handle = _RAW_HANDLES.get(cache_key)
        if handle is not None:
            return handle[0]
        if self.kind == "array":
            opened: Any = self.array
            closer: Optional[Callable[[], None]] = None
        elif self.kind == "npy":
            opened = np.load(self.path, mmap_mode="r")
            closer = None
        elif self.kind == "bin":
            opened = np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r",
                               offset=self.offset, shape=self.shape)
            closer = None
        elif self.kind == "h5":
            import h5py

            h5file = h5py.File(self.path, "r")
            opened = h5file[self.key]
            closer = h5file.close
        else:
            raise ArgumentError(
                f"RawField.kind must be one of 'npy', 'bin', 'h5', 'array', got {self.kind!r}"
            )
        _RAW_HANDLES[cache_key] = (opened, closer)
        return opened


_RAW_HANDLES: Dict[tuple, Tuple[Any, Optional[Callable[[], None]]]] = {}


def close_raw() -> None:
    """Close every raw handle this process opened (HDF5 files; memmaps are just dropped)."""
    pid = os.getpid()
    for cache_key in [k for k in _RAW_HANDLES if k[0] == pid]:
        _, closer = _RAW_HANDLES.pop(cache_key)
        if closer is not None:
            closer()


def raw_fields_from_path(path: Union[str, os.PathLike], fields: Optional[Sequence[str]] = None,
                         *, dtype: Optional[str] = None,
                         shape: Optional[Sequence[int]] = None) -> Dict[str, RawField]:
    """The raw fields behind ``open_dataset(path, fields, dtype=dtype, shape=shape)``.

    Follows the same naming rules: a folder gives one field per ``*.npy`` (named by its stem), a
    ``.npy`` file one field named by its stem, an HDF5 file its top-level datasets, a raw binary
    file (``dtype`` and ``shape`` given) one field named by its stem.
    """
    p = Path(path)
    if not p.exists():
        from gpuloader.errors import SourceNotFoundError

        raise SourceNotFoundError(f"--data / path: {str(p)!r} does not exist")
    found: Dict[str, RawField] = {}
    if p.is_dir():
        for f in sorted(p.glob("*.npy")):
            found[f.stem] = RawField("npy", str(f))
    elif dtype is not None:
        if shape is None:
            raise ArgumentError(f"shape is needed with dtype={dtype!r} for raw binary {str(p)!r}")
        row = tuple(int(s) for s in shape)
        itemsize = np.dtype(dtype).itemsize * int(np.prod([s for s in row if s != -1]))
        dims = tuple(p.stat().st_size // itemsize if s == -1 else s for s in row)
        found[p.stem] = RawField("bin", str(p), dtype=str(np.dtype(dtype)), shape=dims)
    elif p.suffix == ".npy":
        found[p.stem] = RawField("npy", str(p))
    else:
        import h5py

        with h5py.File(p, "r") as h5file:
            for name, obj in h5file.items():
                if isinstance(obj, h5py.Dataset) and obj.ndim >= 1:
                    found[name] = RawField("h5", str(p), key=name)
    if fields is not None:
        missing = [f for f in fields if f not in found]
        if missing:
            from gpuloader.errors import FieldNotFoundError

            raise FieldNotFoundError(
                f"fields {missing!r} not found in {str(p)!r}; available: {sorted(found)}"
            )
        found = {f: found[f] for f in fields}
    return found


def _raw_fields_from_dataset(dataset: Any) -> Optional[Dict[str, RawField]]:
    """Raw fields of an ArrayDataset, from its source's ``storage`` description; else None.

    Flat files and HDF5 datasets are reopened from their paths; in-RAM fields are used when the
    source exposes its arrays.  None when any field's bytes cannot be reached directly.
    """
    source = getattr(dataset, "source", None)
    storage = getattr(source, "storage", None)
    if not isinstance(storage, Mapping) or not storage:
        return None
    files = getattr(source, "files", None)
    arrays = getattr(source, "arrays", None)
    found: Dict[str, RawField] = {}
    for name, info in storage.items():
        fmt = getattr(info, "format", None)
        path = getattr(info, "path", None)
        if fmt == "npy" and path:
            found[name] = RawField("npy", path)
        elif fmt == "raw" and isinstance(files, Mapping) and name in files:
            flat = files[name]
            found[name] = RawField("bin", flat.path, dtype=str(np.dtype(flat.dtype)),
                                   shape=tuple(flat.shape), offset=int(flat.offset))
        elif fmt == "hdf5" and path and getattr(info, "key", None):
            found[name] = RawField("h5", path, key=info.key)
        elif fmt == "ram" and isinstance(arrays, Mapping) and name in arrays:
            found[name] = RawField("array", array=arrays[name])
        else:
            return None
    return found


def _as_raw_field(value: Any) -> RawField:
    if isinstance(value, RawField):
        return value
    if isinstance(value, np.ndarray):
        return RawField("array", array=value)
    raise ArgumentTypeError(f"raw field must be a RawField or ndarray, got {describe(value)}")


# --------------------------------------------------------------------------------------------
# Plain datasets for torch's DataLoader.
# --------------------------------------------------------------------------------------------

class PerSampleDataset(torch.utils.data.Dataset):
    """What users write by hand: ``__getitem__`` reads one row of every field (no batched hook).

    Samples are dicts of tensors (copies), so torch's ``default_collate`` stacks them.
    """

    def __init__(self, raw: Mapping[str, RawField]) -> None:
        self.raw = dict(raw)
        first = next(iter(self.raw.values())).open()
        self._len = int(first.shape[0])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.array(f.open()[index])) for name, f in self.raw.items()}


class _HideBatchedHook(torch.utils.data.Dataset):
    """A map-style Dataset seen through ``__getitem__`` only (torch then fetches per sample)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


class _StreamSampler(torch.utils.data.Sampler):
    """Endless index stream: epoch orders 0, 1, ... each cut to whole batches."""

    def __init__(self, order: str, n: int, seed: int, batch_size: int, block_length: int) -> None:
        self.order, self.n, self.seed = order, n, seed
        self.batch_size, self.block_length = batch_size, block_length

    def __iter__(self) -> Iterator[int]:
        for batch in _batch_stream(self.order, self.n, self.seed, self.batch_size,
                                   self.block_length):
            yield from batch.tolist()


def _batch_stream(order: str, n: int, seed: int, batch_size: int,
                  block_length: int) -> Iterator[np.ndarray]:
    """Batches of indices of epoch orders 0, 1, ... (see NOTE(bench-fairness)); endless."""
    epoch = 0
    whole = (n // batch_size) * batch_size
    while True:
        indices = epoch_order(order, n, seed=seed, epoch=epoch, block_length=block_length)
        for start in range(0, whole, batch_size):
            yield indices[start:start + batch_size]
        epoch += 1


# --------------------------------------------------------------------------------------------
# Measuring one case.
# --------------------------------------------------------------------------------------------

@dataclass
class Measurement:
    """One timed window of one case (seconds of wall clock, bytes of delivered batches)."""

    samples: int
    batches: int
    nbytes: int
    elapsed_s: float
    wait_s: float
    truncated: bool

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.elapsed_s, 1e-9)

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / max(self.elapsed_s, 1e-9) / 1e9

    @property
    def stall_fraction(self) -> float:
        return min(1.0, self.wait_s / max(self.elapsed_s, 1e-9))


def _leaves(batch: Any) -> Iterator[Any]:
    if isinstance(batch, Mapping):
        for value in batch.values():
            yield from _leaves(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from _leaves(value)
    else:
        yield batch


def _batch_len_and_bytes(batch: Any) -> Tuple[int, int]:
    rows, nbytes = 0, 0
    for leaf in _leaves(batch):
        if isinstance(leaf, torch.Tensor):
            nbytes += leaf.numel() * leaf.element_size()
            rows = rows or (int(leaf.shape[0]) if leaf.dim() else 1)
        elif isinstance(leaf, np.ndarray):
            nbytes += leaf.nbytes
            rows = rows or (int(leaf.shape[0]) if leaf.ndim else 1)
    return rows, nbytes


def measure(batches: Iterator[Any], *, step: Callable[[Any], None], warmup: int,
            samples: Optional[int], time_cap_s: float,
            ready: Optional[Callable[[Any], None]] = None) -> Measurement:
    """Draw ``warmup`` batches untimed, then time batches until ``samples`` have been drawn.

    With ``samples=None`` the window is ``time_cap_s`` long (a calibration run).  ``ready``
    (optional) waits until a drawn batch is usable — on CUDA, until its copy has landed — and
    counts as waiting; ``step`` then runs on it (the synthetic training step).  The window stops
    at ``time_cap_s`` in any case; then ``truncated`` is True if ``samples`` was not reached.
    """
    for _ in range(warmup):
        batch = next(batches)
        if ready is not None:
            ready(batch)
        step(batch)
    wait = 0.0
    drawn = count = nbytes = 0
    truncated = False
    clock = time.perf_counter
    start = clock()
    while samples is None or drawn < samples:
        before = clock()
        batch = next(batches)
        if ready is not None:
            ready(batch)
        wait += clock() - before
        rows, size = _batch_len_and_bytes(batch)
        drawn += rows
        nbytes += size
        count += 1
        step(batch)
        if clock() - start >= time_cap_s:
            truncated = samples is not None and drawn < samples
            break
    elapsed = clock() - start
    return Measurement(drawn, count, nbytes, elapsed, wait, truncated)


COMPUTE_KINDS: Tuple[str, ...] = ("auto", "sleep", "spin", "matmul")


def make_step(compute_ms: float, device: Union[str, torch.device] = "cpu",
              kind: str = "auto") -> Tuple[Callable[[Any], None], Callable[[Any], None]]:
    """``(ready, step)`` for :func:`measure`: the consumer's wait for a batch and its work.

    ``ready`` synchronizes the current CUDA stream (so copy time counts as waiting; a no-op on
    the CPU).  ``step`` takes about ``compute_ms`` milliseconds: ``"matmul"`` runs a loop of
    matmuls on ``device`` calibrated to that time and synchronizes; ``"sleep"`` sleeps (the CPU
    and the GIL stay free, as during a GPU step); ``"spin"`` busy-waits; ``"auto"`` is matmul on
    CUDA and sleep on the CPU.
    """
    if kind not in COMPUTE_KINDS:
        raise ArgumentError(
            f"compute_kind must be one of {', '.join(map(repr, COMPUTE_KINDS))}, got "
            f"{describe(kind)}"
        )
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    seconds = compute_ms / 1000.0

    def sync(batch: Any = None) -> None:
        if cuda:
            torch.cuda.current_stream(dev).synchronize()

    if seconds <= 0:
        return sync, lambda batch: None
    if kind == "auto":
        kind = "matmul" if cuda else "sleep"
    if kind == "sleep":
        return sync, lambda batch: time.sleep(seconds)
    if kind == "spin":
        def spin(batch: Any) -> None:
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                pass
        return sync, spin
    size = 1024 if cuda else 256
    a = torch.randn(size, size, device=dev)
    b = torch.randn(size, size, device=dev)

    def loop(k: int) -> None:
        c = a
        for _ in range(k):
            c = torch.mm(c, b).mul_(1e-3)
        sync()

    loop(2)
    start = time.perf_counter()
    loop(10)
    per = max((time.perf_counter() - start) / 10, 1e-7)
    iterations = max(1, int(round(seconds / per)))
    return sync, lambda batch: loop(iterations)


# --------------------------------------------------------------------------------------------
# The cases.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One benchmark case: which loader, in which order, with how many worker processes."""

    loader: str
    order: str
    num_workers: int = 0

    @property
    def label(self) -> str:
        if self.loader == "gpuloader":
            return f"gpuloader {self.order}"
        if self.loader == "torch":
            return f"torch per-sample w={self.num_workers}"
        if self.loader == "torch-batched":
            return f"torch __getitems__ w={self.num_workers}"
        if self.loader == "raw":
            return f"raw {self.order}"
        if self.loader == "raw-seq":
            return "raw sequential copy"
        return "h2d pinned copy"


@dataclass
class _Setup:
    dataset: Any
    batch_size: int
    device: torch.device
    device_arg: Optional[str]
    seed: int
    raw: Optional[Dict[str, RawField]]
    block_length: int
    gpuloader_kwargs: Dict[str, Any]


Opened = Tuple[Iterator[Any], Callable[[], None]]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(batch).to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _open_gpuloader(case: Case, s: _Setup) -> Opened:
    from gpuloader.loader import DataLoader

    loader = DataLoader(s.dataset, batch_size=s.batch_size, drop_last=True, num_workers=0,
                        device=s.device_arg, order=case.order, seed=s.seed,
                        **s.gpuloader_kwargs)

    def batches() -> Iterator[Any]:
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            delivered = False
            for batch in loader:
                delivered = True
                yield batch
            if not delivered:
                raise ArgumentError(
                    f"batch_size={s.batch_size} gives no whole batch of {len(s.dataset)} samples"
                )
            epoch += 1

    stream = batches()

    def close() -> None:
        stream.close()
        loader.close()

    return stream, close


def _open_torch(case: Case, s: _Setup, batched: bool) -> Opened:
    if batched:
        dataset: Any = s.dataset
    elif s.raw is not None:
        dataset = PerSampleDataset(s.raw)
    else:
        dataset = _HideBatchedHook(s.dataset)
    if case.num_workers > 0:
        close_raw()  # workers open their own handles (HDF5 handles must not cross a fork)
    sampler = _StreamSampler(case.order, len(s.dataset), s.seed, s.batch_size, s.block_length)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=s.batch_size, sampler=sampler, num_workers=case.num_workers,
        drop_last=True, pin_memory=s.device.type == "cuda",
    )
    iterator = iter(loader)

    def batches() -> Iterator[Any]:
        for batch in iterator:
            yield _to_device(batch, s.device) if s.device.type == "cuda" else batch

    stream = batches()

    def close() -> None:
        stream.close()
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()

    return stream, close


def _field_shapes(raw: Mapping[str, RawField]) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    shapes = {}
    for name, f in raw.items():
        a = f.open()
        shapes[name] = (tuple(a.shape[1:]), np.dtype(a.dtype))
    return shapes


def _open_raw(case: Case, s: _Setup) -> Opened:
    assert s.raw is not None  # the caller checked
    arrays = {name: f.open() for name, f in s.raw.items()}
    n = len(s.dataset)
    is_h5 = any(f.kind == "h5" for f in s.raw.values())
    bs = s.batch_size
    if case.loader == "raw-seq" or is_h5:
        shapes = _field_shapes(s.raw)
        out = {name: np.empty((bs, *shape), dtype=dt) for name, (shape, dt) in shapes.items()}
        whole = (n // bs) * bs

        def batches() -> Iterator[Any]:
            start = 0
            while True:
                for name, a in arrays.items():
                    if s.raw[name].kind == "h5":
                        a.read_direct(out[name], np.s_[start:start + bs])
                    else:
                        np.copyto(out[name], a[start:start + bs])
                yield out
                start = (start + bs) % whole
    else:
        def batches() -> Iterator[Any]:
            for idx in _batch_stream(case.order, n, s.seed, bs, s.block_length):
                idx = np.sort(idx)
                yield {name: a[idx] for name, a in arrays.items()}

    stream = batches()
    return stream, stream.close


def _open_h2d(case: Case, s: _Setup) -> Opened:
    shapes = _sample_layout(s)
    host = {name: torch.empty((s.batch_size, *shape), dtype=dt, pin_memory=True).random_(0, 100)
            for name, (shape, dt) in shapes.items()}
    dev = {name: torch.empty_like(t, device=s.device) for name, t in host.items()}

    def batches() -> Iterator[Any]:
        while True:
            for name, t in host.items():
                dev[name].copy_(t, non_blocking=True)
            yield dev

    stream = batches()
    return stream, stream.close


def _sample_layout(s: _Setup) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Per-field (sample shape, torch dtype) of the dataset, from its fields or one sample."""
    fields = getattr(s.dataset, "fields", None)
    if isinstance(fields, Mapping) and fields:
        layout = {}
        for name, spec in fields.items():
            dt = torch.from_numpy(np.empty(0, dtype=np.dtype(spec.dtype))).dtype
            layout[str(name)] = (tuple(spec.shape), dt)
        return layout
    sample = s.dataset[0]
    layout = {}
    for k, leaf in enumerate(_leaves(sample)):
        t = leaf if isinstance(leaf, torch.Tensor) else torch.as_tensor(np.asarray(leaf))
        layout[f"f{k}"] = (tuple(t.shape), t.dtype)
    return layout


def _open_case(case: Case, s: _Setup) -> Opened:
    if case.loader == "gpuloader":
        return _open_gpuloader(case, s)
    if case.loader == "torch":
        return _open_torch(case, s, batched=False)
    if case.loader == "torch-batched":
        return _open_torch(case, s, batched=True)
    if case.loader in ("raw", "raw-seq"):
        return _open_raw(case, s)
    return _open_h2d(case, s)


def open_case(case: Case, dataset: Any, *, batch_size: int, seed: int = 0,
              raw: Optional[Mapping[str, Union[RawField, np.ndarray]]] = None,
              device: Optional[Union[str, torch.device]] = None,
              gpuloader_kwargs: Optional[Mapping[str, Any]] = None) -> Opened:
    """Start one case on ``dataset``: ``(batches, stop)``.

    ``batches`` is an endless iterator of whole batches (epochs follow each other); ``stop()``
    ends it and releases its threads, worker processes and buffers.  The building block of
    :func:`compare`, for scripts that time something else (e.g. a first epoch).
    """
    dev, dev_arg = _resolve_device(device)
    raw_fields = None if raw is None else {str(k): _as_raw_field(v) for k, v in raw.items()}
    setup = _Setup(dataset, _positive_int("batch_size", batch_size), dev, dev_arg, int(seed),
                   raw_fields, _block_length(dataset), dict(gpuloader_kwargs or {}))
    return _open_case(case, setup)


def _run_case(case: Case, s: _Setup, work: Tuple[Callable[[Any], None], Callable[[Any], None]],
              samples: Optional[int], time_cap_s: float) -> Measurement:
    ready, step = work
    stream, close = _open_case(case, s)
    try:
        return measure(stream, step=step, ready=ready, warmup=_WARMUP_BATCHES, samples=samples,
                       time_cap_s=time_cap_s)
    finally:
        close()


# --------------------------------------------------------------------------------------------
# compare(): the public entry point.
# --------------------------------------------------------------------------------------------

def _check_names(name: str, values: Optional[Sequence[str]], accepted: Sequence[str],
                 default: Sequence[str]) -> List[str]:
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


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__} "
                                f"{describe(value)}")
    if value < 1:
        raise ArgumentError(f"{name} must be an int >= 1, got {value}")
    return int(value)


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ArgumentTypeError(f"{name} must be a number, got {describe(value)}")
    if not math.isfinite(value) or value < 0:
        raise ArgumentError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def _resolve_device(device: Optional[Union[str, torch.device]]) -> Tuple[torch.device,
                                                                           Optional[str]]:
    if device is None:
        return torch.device("cpu"), None
    text = str(device)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(text)
    except RuntimeError:
        raise ArgumentError(
            f"device must be None, 'auto', 'cpu' or 'cuda[:N]', got {describe(device)}"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"device={text!r} needs CUDA, which is not available; use 'cpu'")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved, text


def _is_array_dataset(dataset: Any) -> bool:
    try:
        from gpuloader.dataset import ArrayDataset
    except ImportError:
        return False
    return isinstance(dataset, ArrayDataset)


def _block_length(dataset: Any) -> int:
    """Rows per block of the "block" order: the source's chunk length, as gpuloader uses."""
    source = getattr(dataset, "source", None)
    chunk = getattr(source, "chunk_length", None)
    if isinstance(chunk, (int, np.integer)) and chunk > 0:
        return int(chunk)
    return 1


def _plan_cases(loaders: List[str], orders: List[str], workers: List[int], *, cuda: bool,
                raw: Optional[Mapping[str, RawField]], has_batched_hook: bool) -> List[Case]:
    baseline_order = "shuffle" if "shuffle" in orders else orders[0]
    is_h5 = raw is not None and any(f.kind == "h5" for f in raw.values())
    cases: List[Case] = []
    for loader in loaders:
        if loader == "gpuloader":
            cases += [Case("gpuloader", o) for o in orders]
        elif loader == "torch":
            cases += [Case("torch", baseline_order, w) for w in workers]
        elif loader == "torch-batched" and has_batched_hook:
            cases += [Case("torch-batched", baseline_order, w) for w in workers]
        elif loader == "raw" and raw is not None:
            if is_h5:
                cases.append(Case("raw", "sequential"))
            else:
                cases += [Case("raw", o) for o in orders]
        elif loader == "raw-seq" and raw is not None:
            if not (is_h5 and "raw" in loaders):  # for HDF5 "raw" already is the sequential copy
                cases.append(Case("raw-seq", "sequential"))
        elif loader == "h2d" and cuda:
            cases.append(Case("h2d", "sequential"))
    return cases


def _describe_dataset(dataset: Any, raw: Optional[Mapping[str, RawField]],
                      sample_bytes: int) -> Dict[str, Any]:
    info: Dict[str, Any] = {"type": type(dataset).__name__, "samples": len(dataset),
                            "sample_bytes": sample_bytes,
                            "total_bytes": sample_bytes * len(dataset)}
    fields = getattr(dataset, "fields", None)
    if isinstance(fields, Mapping):
        info["fields"] = {str(k): {"dtype": str(np.dtype(v.dtype)), "shape": list(v.shape)}
                          for k, v in fields.items()}
    if raw:
        kinds = sorted({f.kind for f in raw.values()})
        info["storage"] = ",".join(kinds)
        paths = sorted({f.path for f in raw.values() if f.path})
        if paths:
            info["paths"] = paths
        if "h5" in kinds:
            info["h5_chunks"] = _h5_chunks(raw)
    return info


def _h5_chunks(raw: Mapping[str, RawField]) -> Dict[str, Optional[List[int]]]:
    chunks = {}
    for name, f in raw.items():
        if f.kind == "h5":
            c = f.open().chunks
            chunks[name] = list(c) if c else None
    return chunks


def _median_run(runs: List[Measurement]) -> Measurement:
    ordered = sorted(runs, key=lambda m: m.samples_per_s)
    return ordered[(len(ordered) - 1) // 2]


def compare(
    dataset: Any,
    *,
    batch_size: int = 256,
    loaders: Optional[Sequence[str]] = None,
    orders: Optional[Sequence[str]] = None,
    num_workers: Optional[Sequence[int]] = None,
    seconds: float = 3.0,
    compute_ms: float = 0.0,
    compute_kind: str = "auto",
    device: Optional[Union[str, torch.device]] = None,
    repeats: int = 3,
    samples: Optional[int] = None,
    seed: int = 0,
    raw: Optional[Mapping[str, Union[RawField, np.ndarray]]] = None,
    gpuloader_kwargs: Optional[Mapping[str, Any]] = None,
    progress: bool = False,
) -> List[Dict[str, Any]]:
    """Benchmark loaders on ``dataset``; return one record (a JSON-ready dict) per case.

    ``dataset`` is any map-style Dataset: an ArrayDataset gets every case; another Dataset gets
    gpuloader's generic path, torch's per-sample baseline (and torch's ``__getitems__`` path if it
    has that hook), and the raw cases only when ``raw`` says where its bytes are.  ``loaders`` picks
    cases from :data:`LOADERS` (default :data:`DEFAULT_LOADERS`); ``orders`` the gpuloader (and raw)
    orders (default all of ``sequential, shuffle, block``); ``num_workers`` the torch worker counts
    (default ``0`` and ``min(4, CPUs)``).  ``seconds``: the measured window of the slowest case;
    ``samples`` fixes the per-case sample count instead (see NOTE(bench-fairness)).
    ``compute_ms``: the synthetic step per batch, milliseconds.  ``device``: None (CPU batches),
    ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``.  ``repeats``: timed runs per case; the median is
    reported.  ``raw``: field name -> :class:`RawField` (or in-RAM array); default: discovered
    from an ArrayDataset's source.  ``gpuloader_kwargs``: extra ``gpuloader.DataLoader`` options
    (e.g. ``prefetch_depth``, ``reader_threads``).  Every record has the keys in
    :data:`RECORD_KEYS`; ``ratio_to_torch`` is relative to the fastest torch per-sample case,
    ``ratio_to_ceiling`` to the raw case of the same order (HDF5: the sequential read), and for
    batches on CUDA to the lower of that and the h2d copy.
    """
    try:
        n = len(dataset)
    except TypeError:
        raise ArgumentTypeError(
            f"dataset must be a map-style Dataset with __len__ and __getitem__, got "
            f"{type(dataset).__name__}"
        ) from None
    bs = _positive_int("batch_size", batch_size)
    if bs > n:
        raise ArgumentError(f"batch_size must be <= len(dataset)={n}, got {bs}; use a smaller "
                            f"batch size or a larger dataset")
    loader_names = _check_names("loaders", loaders, LOADERS, DEFAULT_LOADERS)
    order_names = _check_names("orders", orders, ORDERS, ORDERS)
    for o in order_names:
        check_order(o)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if num_workers is None:
        workers = sorted({0, min(4, cpus or 1)})
    else:
        workers = []
        for w in ([num_workers] if isinstance(num_workers, int) else num_workers):
            if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 0:
                raise ArgumentError(
                    f"num_workers must be ints >= 0 (0: load in the main process), got {w!r}"
                )
            if int(w) not in workers:
                workers.append(int(w))
    window = _non_negative("seconds", seconds)
    if window <= 0:
        raise ArgumentError(f"seconds must be > 0, got {seconds}")
    compute = _non_negative("compute_ms", compute_ms)
    reps = _positive_int("repeats", repeats)
    fixed_samples = None if samples is None else _positive_int("samples", samples)
    dev, dev_arg = _resolve_device(device)
    cuda = dev.type == "cuda"

    raw_fields: Optional[Dict[str, RawField]]
    if raw is not None:
        raw_fields = {str(k): _as_raw_field(v) for k, v in raw.items()}
    else:
        raw_fields = _raw_fields_from_dataset(dataset) if _is_array_dataset(dataset) else None
    has_hook = callable(getattr(dataset, "__getitems__", None))
    cases = _plan_cases(loader_names, order_names, workers, cuda=cuda, raw=raw_fields,
                        has_batched_hook=has_hook)
    if not cases:
        raise ArgumentError(
            f"loaders={loader_names!r} leave no case to run for this dataset/device (raw needs "
            f"storage it can read, h2d needs CUDA)"
        )
    setup = _Setup(dataset, bs, dev, dev_arg, int(seed), raw_fields,
                   _block_length(dataset), dict(gpuloader_kwargs or {}))
    work = make_step(compute, dev, compute_kind)
    bare = make_step(0.0, dev)  # the h2d ceiling runs without the synthetic step
    time_cap = max(3 * window, 10.0)

    bar = _progress(len(cases) * (reps + (0 if fixed_samples else 1)), progress)
    try:
        if fixed_samples is None:
            rates = []
            for case in cases:
                bar.set_description(f"calibrate {case.label}")
                probe = _run_case(case, setup, bare if case.loader == "h2d" else work, None,
                                  window * _CALIBRATION_FRACTION)
                rates.append(probe.samples_per_s)
                bar.update(1)
            budget = int(min(rates) * window)
            budget = max(_MIN_MEASURED_BATCHES * bs, budget)
            budget = min(budget, _MAX_EPOCHS_OF_SAMPLES * (n // bs) * bs)
        else:
            budget = fixed_samples
        budget = max(bs, budget - budget % bs)  # whole batches

        runs: Dict[Case, List[Measurement]] = {c: [] for c in cases}
        for r in range(reps):
            for case in cases:
                bar.set_description(f"{case.label} ({r + 1}/{reps})")
                runs[case].append(_run_case(case, setup, bare if case.loader == "h2d" else work,
                                            budget, time_cap))
                bar.update(1)
    finally:
        bar.close()
        close_raw()

    sample_bytes = 0
    for case in cases:
        m = runs[case][0]
        if case.loader != "h2d" and m.samples:
            sample_bytes = m.nbytes // m.samples
            break
    dataset_info = _describe_dataset(dataset, raw_fields, sample_bytes)
    machine = machine_info()
    records = [
        build_record(case.label, case.loader, case.order, runs[case], batch_size=bs,
                     num_workers=case.num_workers,
                     device="cpu" if case.loader in ("raw", "raw-seq") else str(dev),
                     compute_ms=0.0 if case.loader == "h2d" else compute,
                     dataset=dataset_info, machine=machine)
        for case in cases
    ]
    add_ratios(records, cuda=cuda)
    return records


def build_record(case: str, loader: str, order: str, runs: Sequence[Measurement], *,
                 batch_size: int, num_workers: int, device: str, compute_ms: float,
                 dataset: Mapping[str, Any], machine: Mapping[str, Any]) -> Dict[str, Any]:
    """One result record (keys :data:`RECORD_KEYS`) from the repeats of one case.

    The reported figures are those of the median repeat (by samples/s); the ratios are left
    None for :func:`add_ratios` to fill in once every case of a comparison is known.
    """
    med = _median_run(list(runs))
    return {
        "case": case,
        "loader": loader,
        "order": order,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": device,
        "compute_ms": compute_ms,
        "samples": med.samples,
        "batches": med.batches,
        "elapsed_s": med.elapsed_s,
        "samples_per_s": med.samples_per_s,
        "gb_per_s": med.gb_per_s,
        "stall_fraction": med.stall_fraction,
        "ratio_to_ceiling": None,
        "ratio_to_torch": None,
        "ceiling_case": None,
        "torch_case": None,
        "repeats": len(runs),
        "runs": [{"samples_per_s": m.samples_per_s, "gb_per_s": m.gb_per_s,
                  "stall_fraction": m.stall_fraction, "elapsed_s": m.elapsed_s,
                  "samples": m.samples, "truncated": m.truncated} for m in runs],
        "truncated": any(m.truncated for m in runs),
        "dataset": dict(dataset),
        "machine": dict(machine),
    }


def add_ratios(records: List[Dict[str, Any]], *, cuda: bool = False) -> None:
    """Fill ``ratio_to_torch`` / ``ratio_to_ceiling`` (and the case each is relative to) in place.

    ``ratio_to_torch``: over the fastest ``torch`` (per-sample) record.  ``ratio_to_ceiling``:
    over the ``raw`` record of the same order, else the fastest ``raw`` record; with ``cuda``,
    over the lower of that and the ``h2d`` record for cases that deliver to the device.
    """
    torch_records = [r for r in records if r["loader"] == "torch"]
    best_torch = max(torch_records, key=lambda r: r["samples_per_s"], default=None)
    raws = {r["order"]: r for r in records if r["loader"] == "raw"}
    h2d = next((r for r in records if r["loader"] == "h2d"), None)
    for r in records:
        if best_torch is not None and best_torch["samples_per_s"] > 0:
            r["ratio_to_torch"] = r["samples_per_s"] / best_torch["samples_per_s"]
            r["torch_case"] = best_torch["case"]
        if r["loader"] == "h2d":
            r["ratio_to_ceiling"], r["ceiling_case"] = 1.0, r["case"]
            continue
        ceiling = raws.get(r["order"]) or (max(raws.values(), key=lambda x: x["samples_per_s"])
                                           if raws else None)
        candidates = [c for c in (ceiling,) if c is not None]
        if cuda and h2d is not None and r["loader"] not in ("raw", "raw-seq"):
            candidates.append(h2d)
        if candidates:
            lowest = min(candidates, key=lambda x: x["samples_per_s"])
            if lowest["samples_per_s"] > 0:
                r["ratio_to_ceiling"] = r["samples_per_s"] / lowest["samples_per_s"]
                r["ceiling_case"] = lowest["case"]


class _NoBar:
    def set_description(self, text: str) -> None:
        return None

    def update(self, k: int) -> None:
        return None

    def close(self) -> None:
        return None


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Machine info, reports.
# --------------------------------------------------------------------------------------------

def machine_info() -> Dict[str, Any]:
    """CPU, RAM, library versions and GPU of this machine (JSON-ready)."""
    import psutil

    try:
        import h5py

        h5py_version: Optional[str] = h5py.__version__
    except ImportError:
        h5py_version = None
    try:
        from importlib.metadata import version

        gl_version: Optional[str] = version("gpuloader")
    except ImportError:
        gl_version = None
    except Exception:  # noqa: BLE001 - PackageNotFoundError: running from a checkout
        import gpuloader

        gl_version = getattr(gpuloader, "__version__", None)
    info: Dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else None),
        "cpu_model": _cpu_model(),
        "ram_bytes": psutil.virtual_memory().total,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "h5py": h5py_version,
        "gpuloader": gl_version,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return info


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _markdown(records: Sequence[Mapping[str, Any]]) -> str:
    rows = sorted(records, key=lambda r: r["samples_per_s"], reverse=True)
    lines = [
        "| case | order | batch | workers | samples/s | GB/s | stall | vs torch | vs ceiling |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = " (truncated)" if r.get("truncated") else ""
        lines.append(
            f"| {r['case']}{mark} | {r['order']} | {r['batch_size']} | {r['num_workers']} "
            f"| {r['samples_per_s']:,.0f} | {r['gb_per_s']:.2f} | {r['stall_fraction']:.2f} "
            f"| {_ratio(r.get('ratio_to_torch'))} | {_ratio(r.get('ratio_to_ceiling'))} |"
        )
    return "\n".join(lines) + "\n"


def _report_text(records: Sequence[Mapping[str, Any]]) -> str:
    first = records[0]
    d, m = first.get("dataset") or {}, first.get("machine") or {}
    torch_case = next((r["torch_case"] for r in records if r.get("torch_case")), None)
    ceiling = sorted({r["ceiling_case"] for r in records if r.get("ceiling_case")})
    gpu = f", GPU {m.get('gpu')}" if m.get("gpu") else ""
    total_mb = (d.get("total_bytes") or 0) / 1e6
    load = m.get("load_avg_1m")
    parts = [
        "# gpuloader bench\n",
        f"Dataset: {d.get('type', '?')} of {_fmt(d.get('samples'), ',')} samples x "
        f"{_fmt(d.get('sample_bytes'), ',')} B ({total_mb:,.0f} MB), storage "
        f"{d.get('storage', 'n/a')}; device {first.get('device')}, compute "
        f"{first.get('compute_ms')} ms/batch; {_fmt(first.get('samples'), ',')} samples per "
        f"case, median of {first.get('repeats')} repeat(s).\n",
        f"Machine: {m.get('cpu_count', '?')} CPUs ({m.get('cpu_model', '?')}), "
        f"{m.get('ram_gb', '?')} GB RAM{gpu}; torch {m.get('torch', '?')}, numpy "
        f"{m.get('numpy', '?')}, h5py {m.get('h5py', '?')}; 1-min load average "
        f"{_fmt(load, '.2f')}.\n",
        _markdown(records),
        f"\n'vs torch': samples/s over the fastest torch per-sample case ({torch_case}). "
        f"'vs ceiling': over the raw case of the same order ({', '.join(ceiling) or 'n/a'}); "
        "raw reads are single-threaded, so a multi-threaded loader can exceed 1x. "
        "'stall': share of the window the consumer waited for data.\n",
    ]
    return "\n".join(parts)


def write_report(records: Sequence[Mapping[str, Any]],
                 out_dir: Union[str, os.PathLike]) -> Dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``throughput.png`` under ``out_dir``.

    ``results.json`` is the list of records as given.  The plot needs matplotlib; without it a
    message says how to install it and the other two files are still written.  Returns the
    paths written, by kind ("json", "md", "png").
    """
    if not records:
        raise ArgumentError("records must hold at least one record, got an empty list")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: Dict[str, Path] = {}
    json_path = out / "results.json"
    json_path.write_text(json.dumps(list(records), indent=2, default=str) + "\n",
                         encoding="utf-8")
    written["json"] = json_path
    md_path = out / "results.md"
    md_path.write_text(_report_text(records), encoding="utf-8")
    written["md"] = md_path
    png = _plot(records, out / "throughput.png")
    if png is not None:
        written["png"] = png
    return written


_COLORS = {"gpuloader": "#2a9d8f", "torch": "#e76f51", "torch-batched": "#f4a261",
           "raw": "#8d99ae", "raw-seq": "#8d99ae", "h2d": "#264653"}


def _plot(records: Sequence[Mapping[str, Any]], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {path.name} ({_PLOT_HINT})",
              file=sys.stderr)
        return None
    rows = sorted(records, key=lambda r: r["samples_per_s"])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4))
    values = [r["samples_per_s"] for r in rows]
    bars = ax.barh([r["case"] for r in rows], values,
                   color=[_COLORS.get(r["loader"], "#999999") for r in rows])
    for bar, r in zip(bars, rows):
        ratio = r.get("ratio_to_torch")
        note = f" {r['gb_per_s']:.2f} GB/s" + (f", {ratio:.1f}x torch" if ratio else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, note, va="center",
                fontsize=8)
    ax.set_xlabel("samples / s (median)")
    ax.set_xlim(0, max(values) * 1.35 if values and max(values) > 0 else 1)
    first = rows[0]
    ax.set_title(f"batch {first['batch_size']}, device {first['device']}, "
                 f"compute {first['compute_ms']} ms", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Synthetic data.
# --------------------------------------------------------------------------------------------

def make_synthetic(directory: Union[str, os.PathLike], *, size_mb: float = 256,
                   sample_floats: int = 1024, fmt: str = "npy", chunk_rows: Optional[int] = 64,
                   seed: int = 0) -> Path:
    """Write a synthetic dataset of about ``size_mb`` MB (1e6 bytes) under ``directory``.

    Fields: ``x`` float32 ``(sample_floats,)`` and ``y`` int64 (the sample index).  ``fmt="npy"``
    writes ``x.npy`` and ``y.npy`` and returns the folder; ``fmt="h5"`` writes ``data.h5`` (chunks
    of ``chunk_rows`` rows, or contiguous when None) and returns the file.
    """
    if fmt not in ("npy", "h5"):
        raise ArgumentError(f"fmt must be 'npy' or 'h5', got {describe(fmt)}")
    floats = _positive_int("sample_floats", sample_floats)
    n = max(1, int(size_mb * 1e6) // (4 * floats))
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    step = max(1, (32 << 20) // (4 * floats))
    if fmt == "npy":
        x = np.lib.format.open_memmap(root / "x.npy", mode="w+", dtype=np.float32,
                                      shape=(n, floats))
        for start in range(0, n, step):
            stop = min(n, start + step)
            x[start:stop] = rng.random((stop - start, floats), dtype=np.float32)
        x.flush()
        del x
        np.save(root / "y.npy", np.arange(n, dtype=np.int64))
        return root
    import h5py

    path = root / "data.h5"
    chunks = (min(chunk_rows, n), floats) if chunk_rows else None
    with h5py.File(path, "w") as f:
        x = f.create_dataset("x", shape=(n, floats), dtype=np.float32, chunks=chunks)
        for start in range(0, n, step):
            stop = min(n, start + step)
            x[start:stop] = rng.random((stop - start, floats), dtype=np.float32)
        f.create_dataset("y", data=np.arange(n, dtype=np.int64),
                         chunks=(min(chunk_rows, n),) if chunk_rows else None)
    return path


# --------------------------------------------------------------------------------------------
# Command line: ``gpuloader bench``.
# --------------------------------------------------------------------------------------------

def _list_arg(text: str) -> List[str]:
    return [part for part in text.replace(" ", ",").split(",") if part]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``gpuloader bench`` options to ``parser``."""
    parser.add_argument("--data", help="dataset path (.npy, folder of .npy, HDF5, raw binary); "
                        "default: a synthetic dataset in a temporary folder")
    parser.add_argument("--fields", type=_list_arg, default=None,
                        help="fields to read, comma-separated (default: all)")
    parser.add_argument("--dtype", default=None, help="dtype of a raw binary --data file")
    parser.add_argument("--shape", type=lambda s: [int(v) for v in _list_arg(s)], default=None,
                        help="shape of a raw binary --data file, e.g. -1,256")
    parser.add_argument("--out", default="bench_out",
                        help="folder for results.json, results.md, throughput.png "
                        "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="default: %(default)s")
    parser.add_argument("--orders", type=_list_arg, default=",".join(ORDERS),
                        help="gpuloader orders, comma-separated (default: %(default)s)")
    parser.add_argument("--loaders", type=_list_arg, default=None,
                        help=f"cases, comma-separated, from {', '.join(LOADERS)} "
                        f"(default: {', '.join(DEFAULT_LOADERS)}; h2d only on CUDA)")
    parser.add_argument("--num-workers", type=lambda s: [int(v) for v in _list_arg(s)],
                        default=None, help="torch DataLoader worker counts, comma-separated "
                        "(default: 0 and min(4, CPUs))")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N or auto (default: CPU batches)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="measured window of the slowest case per repeat; all cases read "
                        "the same samples (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per case and repeat (overrides --seconds' calibration)")
    parser.add_argument("--compute-ms", type=float, default=0.0,
                        help="synthetic training step per batch, ms (default: %(default)s)")
    parser.add_argument("--compute-kind", choices=COMPUTE_KINDS, default="auto",
                        help="the synthetic step: auto (matmul on CUDA, sleep on the CPU, which "
                        "leaves the CPU free as a GPU step does), sleep, spin (busy-wait), "
                        "matmul (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="default: %(default)s")
    parser.add_argument("--size-mb", type=float, default=256.0,
                        help="size of the synthetic dataset, MB (default: %(default)s)")
    parser.add_argument("--sample-floats", type=int, default=1024,
                        help="float32 values per synthetic sample (default: %(default)s)")
    parser.add_argument("--format", choices=("npy", "h5"), default="npy",
                        help="storage of the synthetic dataset (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="order seed (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _print_table(records: Sequence[Mapping[str, Any]]) -> None:
    print(_markdown(records), end="")


def main(args: Union[argparse.Namespace, Sequence[str], None] = None) -> int:
    """Run ``gpuloader bench``; ``args`` is a parsed namespace or an argv list.  Returns 0.

    Bad options print one line to stderr and return 2.
    """
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="gpuloader bench", description=__doc__.split(
            "\n")[0])
        add_arguments(parser)
        args = parser.parse_args(args)
    try:
        return _main(args)
    except GpuLoaderError as exc:
        if getattr(args, "debug", False):  # `gpuloader --debug bench ...`: full traceback
            raise
        print(f"gpuloader bench: error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from gpuloader.dataset import open_dataset

    progress = not getattr(args, "no_progress", False)
    # Check the case names before spending time on data.
    _check_names("loaders", args.loaders, LOADERS, DEFAULT_LOADERS)
    _check_names("orders", args.orders, ORDERS, ORDERS)
    with contextlib.ExitStack() as stack:
        if args.data:
            path: Path = Path(args.data)
            dataset = open_dataset(str(path), args.fields, dtype=args.dtype, shape=args.shape)
            raw = _raw_fields_from_dataset(dataset) or raw_fields_from_path(
                path, args.fields, dtype=args.dtype, shape=args.shape)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="gpuloader-bench-"))
            print(f"gpuloader bench: writing a synthetic {args.format} dataset of "
                  f"{args.size_mb:g} MB to {tmp}", file=sys.stderr)
            path = make_synthetic(tmp, size_mb=args.size_mb, sample_floats=args.sample_floats,
                                  fmt=args.format, seed=args.seed)
            dataset = open_dataset(str(path))
            raw = _raw_fields_from_dataset(dataset) or raw_fields_from_path(path)
        closer = getattr(dataset, "close", None)
        if callable(closer):
            stack.callback(closer)
        stack.callback(close_raw)
        records = compare(
            dataset, batch_size=args.batch_size, loaders=args.loaders, orders=args.orders,
            num_workers=args.num_workers, seconds=args.seconds, compute_ms=args.compute_ms,
            compute_kind=getattr(args, "compute_kind", "auto"),
            device=args.device, repeats=args.repeats, samples=args.samples, seed=args.seed,
            raw=raw, progress=progress,
        )
    written = write_report(records, args.out)
    _print_table(records)
    for kind in ("json", "md", "png"):
        if kind in written:
            print(f"wrote {written[kind]}")
    return 0


if __name__ == "__main__":  # python -m gpuloader.bench ... (same as `gpuloader bench ...`)
    sys.exit(main())
