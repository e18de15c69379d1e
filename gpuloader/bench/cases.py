"""The benchmark cases: what each one reads through, started as an endless batch stream."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Generator, Iterator, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from gpuloader.bench.baselines import (HideBatchedHook, PerSampleDataset, StreamSampler,
                                       batch_stream)
from gpuloader.bench.checks import positive_int, resolve_device
from gpuloader.bench.timing import leaves
from gpuloader.bench.raw import RawField, as_raw_fields, close_raw
from gpuloader.checks import torch_dtype
from gpuloader.errors import ArgumentError

#: Every case name ``loaders=`` accepts (see the module docstring).
LOADERS: Tuple[str, ...] = ("gpuloader", "torch", "torch-batched", "raw", "raw-seq", "h2d")
#: Cases run when ``loaders`` is None (``h2d`` only when the device is CUDA).
DEFAULT_LOADERS: Tuple[str, ...] = ("gpuloader", "torch", "torch-batched", "raw", "h2d")

Opened = Tuple[Iterator[Any], Callable[[], None]]


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
class Setup:
    """What every case of one comparison shares."""

    dataset: Any
    batch_size: int
    device: torch.device
    device_arg: Optional[str]
    seed: int
    raw: Optional[Dict[str, RawField]]
    block_length: int
    gpuloader_kwargs: Dict[str, Any]


def block_length(dataset: Any) -> int:
    """Rows per block of the "block" order: the source's chunk length, as gpuloader uses."""
    source = getattr(dataset, "source", None)
    chunk = getattr(source, "chunk_length", None)
    if isinstance(chunk, (int, np.integer)) and chunk > 0:
        return int(chunk)
    return 1


def open_case(case: Case, dataset: Any, *, batch_size: int, seed: int = 0,
              raw: Optional[Mapping[str, Union[RawField, np.ndarray]]] = None,
              device: Optional[Union[str, torch.device]] = None,
              gpuloader_kwargs: Optional[Mapping[str, Any]] = None) -> Opened:
    """Start one case on ``dataset``: ``(batches, stop)``.

    ``batches`` is an endless iterator of whole batches (epochs follow each other); ``stop()``
    ends it and releases its threads, worker processes and buffers.  The building block of
    :func:`compare`, for scripts that time something else (e.g. a first epoch).
    """
    dev, dev_arg = resolve_device(device)
    raw_fields = None if raw is None else as_raw_fields(raw)
    setup = Setup(dataset, positive_int("batch_size", batch_size), dev, dev_arg, int(seed),
                  raw_fields, block_length(dataset), dict(gpuloader_kwargs or {}))
    return start_case(case, setup)


def start_case(case: Case, s: Setup) -> Opened:
    """:func:`open_case` for a checked :class:`Setup`."""
    if case.loader == "gpuloader":
        return _open_gpuloader(case, s)
    if case.loader == "torch":
        return _open_torch(case, s, batched=False)
    if case.loader == "torch-batched":
        return _open_torch(case, s, batched=True)
    if case.loader in ("raw", "raw-seq"):
        return _open_raw(case, s)
    return _open_h2d(case, s)


def _open_gpuloader(case: Case, s: Setup) -> Opened:
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


def _open_torch(case: Case, s: Setup, batched: bool) -> Opened:
    if batched:
        dataset: Any = s.dataset
    elif s.raw is not None:
        dataset = PerSampleDataset(s.raw)
    else:
        dataset = HideBatchedHook(s.dataset)
    if case.num_workers > 0:
        close_raw()  # workers open their own handles (HDF5 handles must not cross a fork)
    sampler = StreamSampler(case.order, len(s.dataset), s.seed, s.batch_size, s.block_length)
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


def _open_raw(case: Case, s: Setup) -> Opened:
    assert s.raw is not None  # the caller checked
    arrays = {name: f.open() for name, f in s.raw.items()}
    is_h5 = any(f.kind == "h5" for f in s.raw.values())
    if case.loader == "raw-seq" or is_h5:
        stream = _sequential_copies(s, arrays)
    else:
        stream = _gathers(case, s, arrays)
    return stream, stream.close


def _sequential_copies(s: Setup, arrays: Dict[str, Any]) -> Generator[Any, None, None]:
    """Consecutive rows copied into one batch allocated here (HDF5: ``read_direct``); endless."""
    raw = s.raw
    assert raw is not None  # the caller checked
    bs = s.batch_size
    out = {name: np.empty((bs, *shape), dtype=dt)
           for name, (shape, dt) in _field_shapes(raw).items()}
    whole = (len(s.dataset) // bs) * bs

    def batches() -> Generator[Any, None, None]:
        start = 0
        while True:
            for name, a in arrays.items():
                if raw[name].kind == "h5":
                    a.read_direct(out[name], np.s_[start:start + bs])
                else:
                    np.copyto(out[name], a[start:start + bs])
            yield out
            start = (start + bs) % whole

    return batches()


def _gathers(case: Case, s: Setup, arrays: Dict[str, Any]) -> Generator[Any, None, None]:
    """``array[sorted_batch_indices]`` per field, in the case's order; endless."""
    for idx in batch_stream(case.order, len(s.dataset), s.seed, s.batch_size, s.block_length):
        idx = np.sort(idx)
        yield {name: a[idx] for name, a in arrays.items()}


def _field_shapes(raw: Mapping[str, RawField]) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    shapes = {}
    for name, f in raw.items():
        a = f.open()
        shapes[name] = (tuple(a.shape[1:]), np.dtype(a.dtype))
    return shapes


def _open_h2d(case: Case, s: Setup) -> Opened:
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


def _sample_layout(s: Setup) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Per-field (sample shape, torch dtype) of the dataset, from its fields or one sample."""
    fields = getattr(s.dataset, "fields", None)
    if isinstance(fields, Mapping) and fields:
        layout = {}
        for name, spec in fields.items():
            dt = torch_dtype(np.dtype(spec.dtype))
            layout[str(name)] = (tuple(spec.shape), dt)
        return layout
    sample = s.dataset[0]
    layout = {}
    for k, leaf in enumerate(leaves(sample)):
        t = leaf if isinstance(leaf, torch.Tensor) else torch.as_tensor(np.asarray(leaf))
        layout[f"f{k}"] = (tuple(t.shape), t.dtype)
    return layout
