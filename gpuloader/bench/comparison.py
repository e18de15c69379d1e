"""compare(): plan the cases, calibrate a common sample budget, run the repeats, build records."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from gpuloader.bench.cases import DEFAULT_LOADERS, LOADERS, Case, Setup, block_length, start_case
from gpuloader.bench.checks import (check_names, non_negative, positive_int, resolve_device,
                                    worker_counts)
from gpuloader.bench.machine import machine_info
from gpuloader.bench.timing import Measurement, Steps, make_step, measure
from gpuloader.bench.raw import RawField, close_raw, resolve_raw
from gpuloader.bench.records import add_ratios, build_record
from gpuloader.errors import ArgumentError, ArgumentTypeError
from gpuloader.order import ORDERS, check_order

_WARMUP_BATCHES = 3
_CALIBRATION_FRACTION = 0.25   # calibration window per case, as a share of ``seconds``
_MAX_EPOCHS_OF_SAMPLES = 50    # the common sample budget never exceeds this many epochs
_MIN_MEASURED_BATCHES = 4


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
    n = _dataset_length(dataset)
    bs = positive_int("batch_size", batch_size)
    if bs > n:
        raise ArgumentError(f"batch_size must be <= len(dataset)={n}, got {bs}; use a smaller "
                            f"batch size or a larger dataset")
    loader_names = check_names("loaders", loaders, LOADERS, DEFAULT_LOADERS)
    order_names = check_names("orders", orders, ORDERS, ORDERS)
    for o in order_names:
        check_order(o)
    workers = worker_counts(num_workers)
    window = non_negative("seconds", seconds)
    if window <= 0:
        raise ArgumentError(f"seconds must be > 0, got {seconds}")
    compute = non_negative("compute_ms", compute_ms)
    reps = positive_int("repeats", repeats)
    fixed_samples = None if samples is None else positive_int("samples", samples)
    dev, dev_arg = resolve_device(device)
    raw_fields = resolve_raw(dataset, raw)
    has_hook = callable(getattr(dataset, "__getitems__", None))
    cases = _plan_cases(loader_names, order_names, workers, cuda=dev.type == "cuda",
                        raw=raw_fields, has_batched_hook=has_hook)
    if not cases:
        raise ArgumentError(
            f"loaders={loader_names!r} leave no case to run for this dataset/device (raw needs "
            f"storage it can read, h2d needs CUDA)"
        )
    setup = Setup(dataset, bs, dev, dev_arg, int(seed), raw_fields,
                  block_length(dataset), dict(gpuloader_kwargs or {}))
    work = make_step(compute, dev, compute_kind)
    bare = make_step(0.0, dev)  # the h2d ceiling runs without the synthetic step
    runs = _run_cases(cases, setup, work, bare, repeats=reps, samples=fixed_samples,
                      window=window, progress=progress)
    return _records(cases, runs, setup, compute)


def _dataset_length(dataset: Any) -> int:
    try:
        return len(dataset)
    except TypeError:
        raise ArgumentTypeError(
            f"dataset must be a map-style Dataset with __len__ and __getitem__, got "
            f"{type(dataset).__name__}"
        ) from None


def _plan_cases(loaders: List[str], orders: List[str], workers: List[int], *, cuda: bool,
                raw: Optional[Mapping[str, RawField]], has_batched_hook: bool) -> List[Case]:
    """The cases to run, in the order of ``loaders``; those that cannot run here are left out."""
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


def _run_cases(cases: List[Case], s: Setup, work: Steps, bare: Steps, *, repeats: int,
               samples: Optional[int], window: float,
               progress: bool) -> Dict[Case, List[Measurement]]:
    """Run every case ``repeats`` times, interleaved, on one common sample budget.

    The budget is ``samples``, or calibrated when that is None; see NOTE(bench-fairness).
    """
    def steps(case: Case) -> Steps:
        return bare if case.loader == "h2d" else work

    time_cap = max(3 * window, 10.0)
    bar = _progress(len(cases) * (repeats + (0 if samples else 1)), progress)
    try:
        if samples is None:
            budget = _calibrate(cases, s, steps, window, bar)
        else:
            budget = samples
        budget = max(s.batch_size, budget - budget % s.batch_size)  # whole batches
        runs: Dict[Case, List[Measurement]] = {c: [] for c in cases}
        for r in range(repeats):
            for case in cases:
                bar.set_description(f"{case.label} ({r + 1}/{repeats})")
                runs[case].append(_run_case(case, s, steps(case), budget, time_cap))
                bar.update(1)
    finally:
        bar.close()
        close_raw()
    return runs


def _calibrate(cases: List[Case], s: Setup, steps: Callable[[Case], Steps], window: float,
               bar: Any) -> int:
    """Samples the slowest case reads in about ``window`` seconds, within the budget's bounds."""
    rates = []
    for case in cases:
        bar.set_description(f"calibrate {case.label}")
        probe = _run_case(case, s, steps(case), None, window * _CALIBRATION_FRACTION)
        rates.append(probe.samples_per_s)
        bar.update(1)
    bs = s.batch_size
    budget = int(min(rates) * window)
    budget = max(_MIN_MEASURED_BATCHES * bs, budget)
    return min(budget, _MAX_EPOCHS_OF_SAMPLES * (len(s.dataset) // bs) * bs)


def _run_case(case: Case, s: Setup, work: Steps, samples: Optional[int],
              time_cap_s: float) -> Measurement:
    ready, step = work
    stream, close = start_case(case, s)
    try:
        return measure(stream, step=step, ready=ready, warmup=_WARMUP_BATCHES, samples=samples,
                       time_cap_s=time_cap_s)
    finally:
        close()


def _records(cases: List[Case], runs: Dict[Case, List[Measurement]], s: Setup,
             compute: float) -> List[Dict[str, Any]]:
    """One record per case, with the dataset and machine described and the ratios filled in."""
    dataset_info = _describe_dataset(s.dataset, s.raw, _sample_bytes(cases, runs))
    machine = machine_info()
    records = [
        build_record(case.label, case.loader, case.order, runs[case], batch_size=s.batch_size,
                     num_workers=case.num_workers,
                     device="cpu" if case.loader in ("raw", "raw-seq") else str(s.device),
                     compute_ms=0.0 if case.loader == "h2d" else compute,
                     dataset=dataset_info, machine=machine)
        for case in cases
    ]
    add_ratios(records, cuda=s.device.type == "cuda")
    return records


def _sample_bytes(cases: List[Case], runs: Dict[Case, List[Measurement]]) -> int:
    """Bytes per delivered sample, from the first repeat of the first case that reads data."""
    for case in cases:
        m = runs[case][0]
        if case.loader != "h2d" and m.samples:
            return m.nbytes // m.samples
    return 0


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
