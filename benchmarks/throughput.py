#!/usr/bin/env python3
"""Throughput of gpuloader against torch's DataLoader and raw reads, on memmap and HDF5 data.

    python3 benchmarks/throughput.py                 # 1 GB per storage format, ~2-4 minutes
    python3 benchmarks/throughput.py --gb 0.25 --seconds 1 --repeats 1     # a quick look

For each storage format (``npy``: memory-mapped .npy; ``h5-chunked``; ``h5-contiguous``) it
writes a synthetic dataset (float32 rows of ``--sample-floats`` plus an int64 label) and runs
``gpuloader.bench.compare`` on it: gpuloader in the ``shuffle`` and ``block`` orders, torch's
DataLoader on a per-sample Dataset with num_workers 0 and 2, the raw numpy gather over the same
permutation (``mm[sorted_batch]``; for HDF5 the sequential ``read_direct``), and a raw sequential
copy.  Then:

- tiny batches: 32 samples x 16 float32 in RAM, shuffled: gpuloader vs a raw torch indexing loop
  ``t[idx]`` over the same permutation (and torch's per-sample DataLoader);
- the first epoch of a fresh process, per case, each run in its own subprocess (loader start-up,
  thread/worker start and first touch of the maps included; the page cache is warm because the
  files were just written, and it is not dropped: that needs root and hurts a shared machine);
- anonymous memory (psutil RSS minus file-backed/shared pages) after each of several epochs of a
  gpuloader loader, which must not grow, and the Python threads left after ``close()`` (also after
  an early ``break``), which must be none.

Prints tables and writes ``throughput.json`` (plus results.md / throughput.png of all cases) to
``--out``.  Timings are of this machine under its current load; the JSON records the load average.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import gpuloader as gl  # noqa: E402
from gpuloader import bench  # noqa: E402

FORMATS = ("npy", "h5-chunked", "h5-contiguous")
H5_CHUNK_ROWS = 64


# ---------------------------------------------------------------------------------- data

def build(fmt: str, root: Path, gb: float, sample_floats: int) -> Path:
    """Write the synthetic dataset of format ``fmt`` under ``root``; return its path."""
    target = root / fmt
    if fmt == "npy":
        return bench.make_synthetic(target, size_mb=gb * 1000, sample_floats=sample_floats)
    chunk = H5_CHUNK_ROWS if fmt == "h5-chunked" else None
    return bench.make_synthetic(target, size_mb=gb * 1000, sample_floats=sample_floats,
                                fmt="h5", chunk_rows=chunk)


def anon_bytes() -> int:
    """Resident anonymous memory of this process: RSS minus file-backed and shared pages."""
    info = psutil.Process().memory_info()
    return int(info.rss - getattr(info, "shared", 0))


# ---------------------------------------------------------------------------------- children

def child_first_epoch(path: str, case: str, batch_size: int) -> Dict[str, Any]:
    """One full epoch of ``case`` ("loader:order" or "torch:workers") from a fresh process."""
    loader, _, arg = case.partition(":")
    ds = gl.open_dataset(path)
    raw = bench.raw_fields_from_path(path)
    if loader == "torch":
        spec = bench.Case("torch", "shuffle", int(arg or 0))
    else:
        spec = bench.Case(loader, arg or "shuffle")
    whole = (len(ds) // batch_size) * batch_size
    start = time.perf_counter()
    stream, stop = bench.open_case(spec, ds, batch_size=batch_size, raw=raw)
    try:
        m = bench.measure(stream, step=lambda b: None, warmup=0, samples=whole,
                          time_cap_s=3600.0)
        total = time.perf_counter() - start
    finally:
        closing = time.perf_counter()
        stop()
        close_s = time.perf_counter() - closing
    return {"case": spec.label, "samples": m.samples, "epoch_s": total,
            "startup_s": total - m.elapsed_s, "close_s": close_s,
            "samples_per_s": m.samples / total, "gb_per_s": m.nbytes / total / 1e9}


def child_memory(path: str, batch_size: int, epochs: int) -> Dict[str, Any]:
    """Anonymous memory per epoch of a gpuloader loader, and threads left after close()."""
    ds = gl.open_dataset(path)
    before = {t.ident for t in threading.enumerate()}
    native_before = psutil.Process().num_threads()
    loader = gl.DataLoader(ds, batch_size=batch_size, order="shuffle", seed=0, drop_last=True)
    anon: List[int] = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
        anon.append(anon_bytes())
    stats = loader.stats()
    batch_bytes = int(stats.get("bytes", 0)) // max(1, int(stats.get("batches", 1)))
    loader.close()
    # An early break must not leave threads behind either.
    early = gl.DataLoader(ds, batch_size=batch_size, order="block", seed=1)
    for k, _ in enumerate(early):
        if k == 3:
            break
    early.close()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        survivors = [t.name for t in threading.enumerate() if t.ident not in before]
        if not survivors:
            break
        time.sleep(0.05)
    growth = anon[-1] - anon[0]
    allowed = max(16 << 20, 8 * batch_bytes)
    return {
        "epochs": epochs, "anon_bytes_per_epoch": anon, "anon_growth_bytes": growth,
        "allowed_growth_bytes": allowed, "memory_ok": growth <= allowed,
        "threads_after_close": survivors, "threads_ok": not survivors,
        "native_threads_before": native_before,
        "native_threads_after": psutil.Process().num_threads(),
    }


def run_child(args: List[str], timeout: float) -> Dict[str, Any]:
    """Run this script in a fresh interpreter; return its JSON answer (plus its wall time)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["failed"], "args": args}
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    answer["process_s"] = wall
    return answer


# ---------------------------------------------------------------------------------- tiny

def tiny_batches(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """32 x 16 float32 batches from RAM, shuffled: gpuloader, torch per-sample, raw ``t[idx]``."""
    n, bs = args.tiny_samples, 32
    x = np.random.default_rng(0).random((n, 16), dtype=np.float32)
    ds = gl.ArrayDataset(x=x)
    samples = min(args.tiny_budget, (n // bs) * bs)
    records = bench.compare(ds, batch_size=bs, loaders=["gpuloader", "torch"],
                            orders=["shuffle"], num_workers=[0], samples=samples,
                            repeats=args.repeats, seconds=args.seconds, progress=False)
    t = torch.from_numpy(x)
    runs = []
    for _ in range(args.repeats):
        def stream():
            for idx in bench.batch_stream("shuffle", n, 0, bs, 1):
                yield t[torch.from_numpy(idx)]
        runs.append(bench.measure(stream(), step=lambda b: None, warmup=3, samples=samples,
                                  time_cap_s=max(30.0, 3 * args.seconds)))
    records.append(bench.build_record(
        "raw torch t[idx]", "raw", "shuffle", runs, batch_size=bs, num_workers=0, device="cpu",
        compute_ms=0.0, dataset=records[0]["dataset"], machine=records[0]["machine"]))
    for r in records:
        r["ratio_to_ceiling"] = r["ratio_to_torch"] = None
    bench.add_ratios(records)
    for r in records:
        r["storage"] = "ram-tiny"
    return records


# ---------------------------------------------------------------------------------- main

def fmt_table(rows: List[Dict[str, Any]], columns: List[tuple]) -> str:
    head = "| " + " | ".join(c[0] for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(c[1](r) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="GB per dataset (default 1.0)")
    p.add_argument("--formats", default=",".join(FORMATS),
                   help="comma-separated subset of " + ", ".join(FORMATS))
    p.add_argument("--sample-floats", type=int, default=1024, help="float32 per sample (1024)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seconds", type=float, default=4.0,
                   help="measured window of the slowest case; every case reads as many samples "
                   "(4.0)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", default="0,2", help="torch num_workers values (0,2)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the memory check (3)")
    p.add_argument("--first-epoch", default="gpuloader:shuffle,gpuloader:block,torch:2,raw:shuffle",
                   help="cases whose first epoch runs in a fresh process, on npy; HDF5 formats "
                   "run the gpuloader ones ('' to skip)")
    p.add_argument("--tiny-samples", type=int, default=1 << 20)
    p.add_argument("--tiny-budget", type=int, default=1 << 17,
                   help="samples per tiny-batch case (131072)")
    p.add_argument("--dir", default=None, help="where to write the data (default: a temp dir, "
                   "removed afterwards)")
    p.add_argument("--out", default="bench_out/throughput")
    p.add_argument("--child", choices=("first-epoch", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child == "first-epoch":
        print(json.dumps(child_first_epoch(args.data, args.case, args.batch_size)))
        return 0
    if args.child == "memory":
        print(json.dumps(child_memory(args.data, args.batch_size, args.epochs)))
        return 0

    formats = [f for f in args.formats.split(",") if f]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        p.error(f"--formats: unknown {unknown}; choose from {', '.join(FORMATS)}")
    workers = [int(w) for w in args.workers.split(",") if w]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = bench.machine_info()
    print(f"machine: {machine['cpu_count']} CPUs, {machine['ram_gb']} GB RAM, load "
          f"{machine['load_avg_1m']:.2f}, torch {machine['torch']}", flush=True)

    tmp = None
    root = Path(args.dir) if args.dir else Path(tmp := tempfile.mkdtemp(prefix="gl-throughput-"))
    records: List[Dict[str, Any]] = []
    first_epoch: List[Dict[str, Any]] = []
    memory: Dict[str, Any] = {}
    started = time.perf_counter()
    try:
        for fmt in formats:
            t0 = time.perf_counter()
            path = build(fmt, root, args.gb, args.sample_floats)
            print(f"[{fmt}] wrote {args.gb:g} GB in {time.perf_counter() - t0:.1f} s; "
                  "comparing ...", flush=True)
            ds = gl.open_dataset(str(path))
            try:
                recs = bench.compare(
                    ds, batch_size=args.batch_size,
                    loaders=["gpuloader", "torch", "raw", "raw-seq"], orders=["shuffle", "block"],
                    num_workers=workers, seconds=args.seconds, repeats=args.repeats,
                    raw=bench.raw_fields_from_path(path), progress=True)
            finally:
                close = getattr(ds, "close", None)
                if callable(close):
                    close()
            for r in recs:
                r["storage"] = fmt
            records += recs
            cases = [c for c in args.first_epoch.split(",") if c]
            if fmt != "npy":
                cases = [c for c in cases if c.startswith("gpuloader")]
            for case in cases:
                answer = run_child(["--child", "first-epoch", "--data", str(path), "--case", case,
                                    "--batch-size", str(args.batch_size)], timeout=600)
                answer["storage"] = fmt
                first_epoch.append(answer)
            if fmt == "npy":
                memory = run_child(["--child", "memory", "--data", str(path), "--batch-size",
                                    str(args.batch_size), "--epochs", str(args.epochs)],
                                   timeout=600)
                memory["storage"] = fmt
        print("[ram-tiny] 32 x 16 floats, shuffled ...", flush=True)
        records += tiny_batches(args)
    finally:
        bench.close_raw()
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    for r in records:
        r["dataset"]["storage_format"] = r.get("storage")
    cols = [("storage", lambda r: r["storage"]), ("case", lambda r: r["case"]),
            ("samples/s", lambda r: f"{r['samples_per_s']:,.0f}"),
            ("GB/s", lambda r: f"{r['gb_per_s']:.2f}"),
            ("stall", lambda r: f"{r['stall_fraction']:.2f}"),
            ("vs torch", lambda r: ratio(r["ratio_to_torch"])),
            ("vs ceiling", lambda r: ratio(r["ratio_to_ceiling"])),
            ("samples", lambda r: f"{r['samples']:,}")]
    print()
    print(fmt_table(records, cols))
    if first_epoch:
        print("\nfirst epoch of a fresh process (warm page cache):")
        print(fmt_table(first_epoch, [
            ("storage", lambda r: r["storage"]), ("case", lambda r: r.get("case", "?")),
            ("epoch s", lambda r: f"{r['epoch_s']:.2f}" if "epoch_s" in r else str(r)),
            ("of which start-up s", lambda r: f"{r.get('startup_s', 0):.2f}"),
            ("samples/s", lambda r: f"{r.get('samples_per_s', 0):,.0f}"),
            ("close() s", lambda r: f"{r.get('close_s', 0):.2f}"),
            ("process s", lambda r: f"{r.get('process_s', 0):.2f}")]))
    if memory:
        print(f"\nmemory over {memory.get('epochs')} epochs (anon MB): "
              f"{[round(b / 2**20, 1) for b in memory.get('anon_bytes_per_epoch', [])]} "
              f"growth {memory.get('anon_growth_bytes', 0) / 2**20:.1f} MB -> "
              f"{'OK' if memory.get('memory_ok') else 'GROWS'}; threads after close: "
              f"{memory.get('threads_after_close')} -> "
              f"{'OK' if memory.get('threads_ok') else 'LEAK'}")
    result = {"machine": machine, "config": vars(args), "records": records,
              "first_epoch": first_epoch, "memory": memory,
              "total_s": time.perf_counter() - started}
    (out / "throughput.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    bench.write_report([{**r, "case": f"{r['storage']}: {r['case']}"} for r in records], out)
    print(f"\nwrote {out / 'throughput.json'}, {out / 'results.md'} "
          f"in {result['total_s']:.0f} s")
    ok = (not memory or (memory.get("memory_ok") and memory.get("threads_ok")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
