#!/usr/bin/env python3
"""GPU checks and figures for gpuloader's device path (run by benchmarks/gpu_check.sh).

Sections (each writes ``<name>.json`` under ``--out``; a failing section records its error and
the others still run; the exit status is 1 if any check failed):

h2d          Host-to-device GB/s: a plain pinned ``copy_(non_blocking=True)`` of one buffer
             (several sizes) and, through ``gpuloader.bench.compare``, gpuloader with
             ``device="cuda"`` (the staging ring) against the pinned copy of the same batch, the
             raw gather and torch's DataLoader (pin_memory=True, ``.to(non_blocking=True)``).
stall        Stall fraction with a synthetic compute step (a calibrated matmul loop,
             ``--compute-ms``): gpuloader vs torch's DataLoader with workers.
allocations  cudaMalloc (``memory_stats()["num_device_alloc"]``), allocator block and
             cudaHostAlloc (``host_memory_stats()["num_host_alloc"]``) counts over one epoch
             after a warm-up epoch: none with reused staging slots (the default);
             reuse_buffers=False and the generic path shown for contrast.
oom          A real out-of-memory: ``set_per_process_memory_fraction`` caps the caching
             allocator, ``batch_size="auto"`` plans while the step's cost is unknown, and the
             step's activations grow with the batch.  With ``oom_guard`` the epoch completes and
             every sample index is seen exactly once (two epochs; GPU clones compared at the end).
tokens       Token budgets (``max_tokens`` on a ragged field), once gpuloader has them: B x L
             within the budget and exactly once; otherwise recorded as skipped.

Everything also lands in one ``gpu_bench.json`` (with the device name).
Without CUDA only ``h2d``/``stall`` run, on the CPU, as a smoke test of the script.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gpuloader as gl  # noqa: E402
from gpuloader import bench  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pinned_copy_gbps(nbytes: int, repeats: int = 20) -> float:
    """GB/s of ``copy_(non_blocking=True)`` from one pinned buffer of ``nbytes`` to the GPU."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        dev.copy_(host, non_blocking=True)
    _sync()
    return nbytes * repeats / (time.perf_counter() - start) / 1e9


def section_h2d(args: argparse.Namespace, ds: Any, raw: Any, device: Optional[str]
                ) -> Dict[str, Any]:
    result: Dict[str, Any] = {}
    if device == "cuda":
        result["pinned_copy_gbps"] = {f"{mb} MB": pinned_copy_gbps(mb << 20)
                                      for mb in (4, 64, 256)}
    records = bench.compare(
        ds, batch_size=args.batch_size, loaders=["gpuloader", "torch", "raw", "h2d"],
        orders=["shuffle"], num_workers=[args.workers], seconds=args.seconds,
        repeats=args.repeats, device=device, raw=raw, progress=True,
        gpuloader_kwargs={"reader_threads": args.reader_threads})
    bench.write_report(records, Path(args.out) / "h2d")
    result["records"] = records
    result["summary"] = _summary(records)
    return result


def section_stall(args: argparse.Namespace, ds: Any, raw: Any, device: Optional[str]
                  ) -> Dict[str, Any]:
    records = bench.compare(
        ds, batch_size=args.batch_size, loaders=["gpuloader", "torch"], orders=["shuffle"],
        num_workers=[args.workers], seconds=args.seconds, repeats=args.repeats,
        compute_ms=args.compute_ms, device=device, raw=raw, progress=True,
        gpuloader_kwargs={"reader_threads": args.reader_threads})
    bench.write_report(records, Path(args.out) / "stall")
    return {"compute_ms": args.compute_ms, "records": records, "summary": _summary(records)}


def _summary(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    keys = ("case", "samples_per_s", "gb_per_s", "stall_fraction", "ratio_to_torch",
            "ratio_to_ceiling", "ceiling_case")
    return [{k: r[k] for k in keys} for r in records]


class _Rows(torch.utils.data.Dataset):
    """A plain map-style dataset (no array view): gpuloader runs it on the generic path."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {"x": torch.from_numpy(self.x[i]), "idx": i}


def allocation_counters() -> Dict[str, int]:
    """Allocation counters now: cudaMalloc calls (``num_device_alloc``), the caching
    allocator's block hand-outs (``allocation.all.allocated``) and cudaHostAlloc calls of the
    pinned-memory cache (``num_host_alloc``; absent before torch 2.5)."""
    dev = torch.cuda.memory_stats()
    host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    return {"cudaMalloc": int(dev.get("num_device_alloc", -1)),
            "allocator_blocks": int(dev.get("allocation.all.allocated", -1)),
            "cudaHostAlloc": int(host.get("num_host_alloc", -1))}


def _epoch_allocations(make_loader: Callable[[], Any], name: str) -> Dict[str, Any]:
    """Counters over the second epoch of a loader (the first warms the caches up)."""
    loader = make_loader()
    try:
        for epoch in range(2):
            loader.set_epoch(epoch)
            _sync()
            before = allocation_counters()
            batches = sum(1 for _ in loader)  # consume only: the loop allocates nothing itself
            _sync()
            after = allocation_counters()
    finally:
        loader.close()
    per_epoch = {k: after[k] - before[k] for k in after if before[k] >= 0}
    return {"case": name, "batches_per_epoch": batches, "per_epoch_after_warmup": per_epoch}


def section_allocations(args: argparse.Namespace, ds: Any) -> Dict[str, Any]:
    """cudaMalloc / cudaHostAlloc calls per epoch after a warm-up epoch (the steady state must
    make none with reused staging slots); fresh batches and the generic path for contrast."""
    bs = args.batch_size
    x = np.random.default_rng(0).standard_normal((20 * bs, 256), dtype=np.float32)
    cases = [
        _epoch_allocations(lambda: gl.DataLoader(ds, batch_size=bs, device="cuda",
                                                 order="shuffle", seed=0, drop_last=True),
                           "fast path, reused staging slots"),
        _epoch_allocations(lambda: gl.DataLoader(ds, batch_size=bs, device="cuda",
                                                 order="shuffle", seed=0, drop_last=True,
                                                 reuse_buffers=False),
                           "fast path, reuse_buffers=False"),
        _epoch_allocations(lambda: gl.DataLoader(_Rows(x), batch_size=bs, device="cuda",
                                                 shuffle=True, seed=0, drop_last=True),
                           "generic path"),
    ]
    steady = cases[0]["per_epoch_after_warmup"]
    return {"cases": cases,
            "ok": steady.get("cudaMalloc", 0) == 0 and steady.get("cudaHostAlloc", 0) == 0
            and steady.get("allocator_blocks", 0) == 0}


def _oom_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
              repeat: int) -> None:
    """One training step whose activations grow with the batch.  A function, so its locals
    (the failed step's activations) die with its frame and oom_guard can free them."""
    h = model(x)
    wide = h.repeat(1, repeat)                    # activations: repeat x 4 KB / sample
    torch.nn.functional.gelu(wide).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def section_oom(args: argparse.Namespace) -> Dict[str, Any]:
    """Exactly once under real CUDA out-of-memory errors (see the module docstring)."""
    n, width, repeat = args.oom_samples, 1024, args.oom_repeat
    x = np.random.default_rng(0).standard_normal((n, width), dtype=np.float32)
    ds = gl.ArrayDataset(x=x, idx=np.arange(n, dtype=np.int64))
    total = torch.cuda.get_device_properties(0).total_memory
    cap = args.oom_cap_gb * 2**30
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(0.95, cap / total))
    model = torch.nn.Linear(width, width).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = gl.DataLoader(ds, batch_size="auto", device="cuda", order="shuffle", seed=0)
    epochs = []
    try:
        for epoch in range(2):
            loader.set_epoch(epoch)
            seen: List[torch.Tensor] = []  # GPU clones: no per-batch host sync
            failures = 0
            start = time.perf_counter()
            for batch in loader:
                with loader.oom_guard(optimizer) as guard:
                    _oom_step(model, optimizer, batch["x"], repeat)
                if not guard.failed:
                    seen.append(batch["idx"].clone())
                failures += int(guard.failed)
            _sync()
            ids = torch.cat(seen).cpu().numpy() if seen else np.empty(0, dtype=np.int64)
            exactly_once = bool(len(ids) == n and np.array_equal(np.sort(ids), np.arange(n)))
            stats = loader.stats()
            epochs.append({
                "epoch": epoch, "seconds": time.perf_counter() - start,
                "samples_seen": int(len(ids)), "distinct": int(len(np.unique(ids))),
                "exactly_once": exactly_once, "rolled_back_steps": failures,
                "oom_count": stats.get("oom_count"), "batch_size_now": loader.batch_size,
                "batch_sizes": stats.get("batch_sizes"),
            })
    finally:
        loader.close()
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    ok = all(e["exactly_once"] for e in epochs) and any(e["oom_count"] for e in epochs)
    return {"samples": n, "activation_bytes_per_sample": repeat * width * 4 * 2,
            "cap_bytes": cap, "epochs": epochs, "ok": ok,
            "note": "ok needs every epoch exactly once and at least one real OOM"}


def has_token_budgets() -> bool:
    """True once this gpuloader has ragged fields and ``max_tokens`` (DESIGN.md)."""
    import inspect

    return hasattr(gl, "Ragged") and \
        "max_tokens" in inspect.signature(gl.DataLoader.__init__).parameters


def section_tokens(args: argparse.Namespace) -> Dict[str, Any]:
    """Token budgets on the device: every batch holds B x L <= max_tokens padded tokens (or
    one over-long sample), and every sample arrives exactly once."""
    if not has_token_budgets():
        return {"ok": True, "skipped": "this gpuloader has no token budgets (max_tokens) yet"}
    rng = np.random.default_rng(0)
    n, budget = 20000, 8192
    lengths = rng.integers(1, 512, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = rng.integers(0, 50000, size=int(offsets[-1]), dtype=np.int64)
    ds = gl.ArrayDataset(tokens=gl.Ragged(values, offsets), idx=np.arange(n, dtype=np.int64))
    seen: List[torch.Tensor] = []
    over = 0
    start = time.perf_counter()
    with gl.DataLoader(ds, max_tokens=budget, shuffle=True, seed=0, device="cuda") as loader:
        for batch in loader:
            b, length = batch["tokens"].shape
            over += int(b * length > budget and b > 1)
            seen.append(batch["idx"].clone())
    _sync()
    ids = torch.cat(seen).cpu().numpy()
    exactly_once = bool(len(ids) == n and np.array_equal(np.sort(ids), np.arange(n)))
    return {"samples": n, "max_tokens": budget, "batches": len(seen),
            "batches_over_budget": over, "exactly_once": exactly_once,
            "seconds": time.perf_counter() - start, "ok": exactly_once and over == 0}


def run_section(name: str, out: Path, fn: Callable[[], Dict[str, Any]],
                results: Dict[str, Any]) -> None:
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        result = fn()
        result.setdefault("ok", True)
    except Exception as exc:  # noqa: BLE001 - a failed section is a result, not a crash
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()}
    result["seconds"] = time.perf_counter() - start
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    results[name] = result
    brief = {k: v for k, v in result.items() if k not in ("records", "traceback")}
    print(json.dumps(brief, indent=1, default=str)[:3000], flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_out")
    p.add_argument("--gb", type=float, default=1.0, help="memmap dataset size, GB (1)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=8, help="torch num_workers (8)")
    p.add_argument("--reader-threads", type=int, default=8, help="gpuloader reader threads (8)")
    p.add_argument("--compute-ms", type=float, default=20.0)
    p.add_argument("--oom-samples", type=int, default=20000)
    p.add_argument("--oom-repeat", type=int, default=256,
                   help="activation width multiplier of the OOM step (256: ~2 MB per sample)")
    p.add_argument("--oom-cap-gb", type=float, default=3.0)
    p.add_argument("--sections", default="h2d,stall,allocations,oom,tokens")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else None
    sections = [s for s in args.sections.split(",") if s]
    if not cuda:
        print("CUDA is not available: running h2d/stall on the CPU as a smoke test only",
              flush=True)
        sections = [s for s in sections if s in ("h2d", "stall")]
    results: Dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else None,
                               "machine": bench.machine_info(), "config": vars(args)}
    with tempfile.TemporaryDirectory(prefix="gl-gpu-bench-") as tmp:
        path = bench.make_synthetic(tmp, size_mb=args.gb * 1000, sample_floats=1024)
        raw = bench.raw_fields_from_path(path)
        ds = gl.open_dataset(str(path))
        try:
            if "h2d" in sections:
                run_section("h2d", out, lambda: section_h2d(args, ds, raw, device), results)
            if "stall" in sections:
                run_section("stall", out, lambda: section_stall(args, ds, raw, device), results)
            if "allocations" in sections:
                run_section("allocations", out, lambda: section_allocations(args, ds), results)
        finally:
            close = getattr(ds, "close", None)
            if callable(close):
                close()
            bench.close_raw()
    if "oom" in sections:
        run_section("oom", out, lambda: section_oom(args), results)
    if "tokens" in sections:
        run_section("tokens", out, lambda: section_tokens(args), results)
    (out / "gpu_bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    failed = [name for name in sections if not results.get(name, {}).get("ok", False)]
    print(f"gpu_bench: {'FAILED: ' + ', '.join(failed) if failed else 'all sections ok'}; "
          f"JSON in {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
