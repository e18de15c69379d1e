"""Result records: one JSON-ready dict per case, and the ratios between cases."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

from gpuloader.bench.timing import Measurement

#: Keys every record returned by :func:`compare` has (values may be None where they do not apply).
RECORD_KEYS: Tuple[str, ...] = (
    "case", "loader", "order", "batch_size", "num_workers", "device", "compute_ms",
    "samples", "batches", "elapsed_s", "samples_per_s", "gb_per_s", "stall_fraction",
    "ratio_to_ceiling", "ratio_to_torch", "ceiling_case", "torch_case", "repeats", "runs",
    "truncated", "dataset", "machine",
)


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


def _median_run(runs: List[Measurement]) -> Measurement:
    ordered = sorted(runs, key=lambda m: m.samples_per_s)
    return ordered[(len(ordered) - 1) // 2]


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
