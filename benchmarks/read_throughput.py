"""Read throughput of gpuloader's sources next to the raw reads they replace.

Builds (under ``--dir``, default a fresh temp dir that is deleted afterwards) one float32
dataset of ``--mb`` MB as a ``.npy`` file, a contiguous HDF5 file, a chunked HDF5 file and a
smaller gzip-compressed HDF5 file (``--gzip-mb``), then times, per file and batch order:

  gpuloader      ``source.read_into(sorted_indices, out)`` into a preallocated buffer
  numpy-fancy    ``mm[idx]`` on ``np.load(path, mmap_mode="r")``               (.npy)
  memmap-fancy   ``mm[idx]`` on an ``np.memmap`` at the dataset's file offset  (contiguous HDF5)
  slice-copy     ``out[...] = mm[s:s+B]``                                  (sequential, mapped)
  h5py-direct    ``dset.read_direct(out, np.s_[s:s+B])``                   (sequential, HDF5)
  h5py-fancy     ``dset[idx]`` (h5py fancy indexing; only ``--fancy-batches`` batches)

Orders: ``sequential`` (consecutive batches of ``--batch`` rows) and ``shuffled-sorted``
(``--batch`` distinct random rows, sorted — what the loader passes).  Every file is read
once before timing, so the page cache is warm and the figures measure the copy path, not
the disk.  Each figure is the median of ``--repeats`` timed passes after one warm-up pass;
the methods of one file and order take turns pass by pass, so a busy machine slows them
alike.  The gzip file is reopened for each pass so chunks are really decompressed.

Writes JSON to ``--out`` and prints a table with each gpuloader figure's ratio to its
baseline (numpy-fancy for .npy, memmap-fancy or h5py-direct for HDF5).

    python3 benchmarks/read_throughput.py --mb 256
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from gpuloader.sources import Hdf5Source, NpySource, Source  # noqa: E402

_WRITE_BLOCK_BYTES = 64 << 20  # data is generated and written in pieces of this size


@dataclass(frozen=True)
class Result:
    """One timed case: ``gbps`` = bytes copied per pass / median seconds per pass / 1e9."""

    file: str
    order: str
    method: str
    batches: int
    bytes_per_pass: int
    median_s: float
    gbps: float


def write_files(root: Path, rows: int, row_floats: int, chunk_rows: int,
                gzip_rows: int) -> Dict[str, Path]:
    """The benchmark's files under ``root``; data is random float32, generated piecewise."""
    rng = np.random.default_rng(0)
    paths = {"npy": root / "x.npy", "h5-contiguous": root / "contiguous.h5",
             "h5-chunked": root / "chunked.h5", "h5-gzip": root / "gzip.h5"}
    step = max(1, _WRITE_BLOCK_BYTES // (row_floats * 4))
    mm = np.lib.format.open_memmap(paths["npy"], mode="w+", dtype=np.float32,
                                   shape=(rows, row_floats))
    with h5py.File(paths["h5-contiguous"], "w") as fc, \
            h5py.File(paths["h5-chunked"], "w") as fk, h5py.File(paths["h5-gzip"], "w") as fg:
        dc = fc.create_dataset("x", shape=(rows, row_floats), dtype=np.float32)
        dk = fk.create_dataset("x", shape=(rows, row_floats), dtype=np.float32,
                               chunks=(chunk_rows, row_floats))
        dg = fg.create_dataset("x", shape=(gzip_rows, row_floats), dtype=np.float32,
                               chunks=(chunk_rows, row_floats), compression="gzip",
                               compression_opts=1)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            block = rng.standard_normal((stop - start, row_floats), dtype=np.float32)
            mm[start:stop] = block
            dc[start:stop] = block
            dk[start:stop] = block
            if start < gzip_rows:
                dg[start:min(stop, gzip_rows)] = block[: max(0, gzip_rows - start)]
    mm.flush()
    del mm
    return paths


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read every file once so timings measure copying, not the disk."""
    for path in paths:
        with open(path, "rb") as fh:
            while fh.read(16 << 20):
                pass


def batch_orders(rows: int, batch: int, batches: int, seed: int) -> Dict[str, List[np.ndarray]]:
    """``sequential`` and ``shuffled-sorted`` index batches of ``batch`` rows each."""
    rng = np.random.default_rng(seed)
    count = min(batches, rows // batch)
    sequential = [np.arange(k * batch, (k + 1) * batch, dtype=np.int64) for k in range(count)]
    shuffled = [np.sort(rng.choice(rows, batch, replace=False)).astype(np.int64)
                for _ in range(count)]
    return {"sequential": sequential, "shuffled-sorted": shuffled}


@dataclass
class Method:
    """One way to read a batch, over ``batches`` (its share of the group's batches).

    ``close`` releases its handles.  ``isolated`` methods (compressed HDF5) are closed before
    and after every pass: HDF5 shares one chunk cache between all handles of a dataset in a
    process, and the benchmark's gzip file is small enough to stay cached, which would time
    memcpy instead of decompression.
    """

    read: Callable[[np.ndarray], object]
    close: Optional[Callable[[], None]] = None
    isolated: bool = False


def time_group(methods: Dict[str, Method], batches: Dict[str, List[np.ndarray]],
               repeats: int) -> Dict[str, float]:
    """Median seconds per pass of each method over its batches.

    One untimed warm-up pass each, then ``repeats`` rounds that time every method once in
    turn, so load from other processes on a shared machine hits all methods alike.
    """
    times: Dict[str, List[float]] = {name: [] for name in methods}
    try:
        for rep in range(repeats + 1):
            for name, method in methods.items():
                started = time.perf_counter()
                for idx in batches[name]:
                    method.read(idx)
                elapsed = time.perf_counter() - started
                if rep:
                    times[name].append(elapsed)
                if method.isolated and method.close is not None:
                    method.close()
    finally:
        for method in methods.values():
            if method.close is not None:
                method.close()
    return {name: statistics.median(values) for name, values in times.items()}


def source_method(source: Source, batch: int, isolated: bool) -> Method:
    """``read_into`` into one preallocated buffer (what the loader does with a host slot)."""
    out = {name: np.empty((batch, *spec.shape), dtype=spec.dtype)
           for name, spec in source.fields.items()}

    def read(idx: np.ndarray) -> None:
        source.read_into(idx, out)

    return Method(read, source.close, isolated)


def slice_method(array: np.ndarray, batch: int) -> Method:
    out = np.empty((batch, *array.shape[1:]), dtype=array.dtype)

    def copy(idx: np.ndarray) -> None:
        start = int(idx[0])
        out[...] = array[start:start + len(idx)]

    return Method(copy)


class H5Handle:
    """Dataset ``x`` of one file, opened on first use; :meth:`close` empties its chunk cache."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Optional[h5py.File] = None
        self._dset: Optional[h5py.Dataset] = None

    @property
    def dset(self) -> h5py.Dataset:
        if self._dset is None:
            self._file = h5py.File(self.path, "r")
            self._dset = self._file["x"]
        return self._dset

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._dset = None


def h5py_methods(path: Path, order: str, batch: int, isolated: bool) -> Dict[str, Method]:
    """read_direct of consecutive rows (sequential only) and h5py fancy indexing."""
    found: Dict[str, Method] = {}
    if order == "sequential":
        direct_handle = H5Handle(path)  # opened on first read, after earlier methods closed
        with h5py.File(path, "r") as h5:
            out = np.empty((batch, *h5["x"].shape[1:]), dtype=h5["x"].dtype)

        def direct(idx: np.ndarray) -> None:
            start = int(idx[0])
            direct_handle.dset.read_direct(out, source_sel=np.s_[start:start + len(idx)])

        found["h5py-direct"] = Method(direct, direct_handle.close, isolated)
    fancy_handle = H5Handle(path)
    found["h5py-fancy"] = Method(lambda idx: fancy_handle.dset[idx],
                                 fancy_handle.close, isolated)
    return found


def methods_for(kind: str, path: Path, order: str, batch: int) -> Dict[str, Method]:
    """method name -> Method, for file ``kind`` and batch ``order``.

    Methods on the compressed file are ``isolated`` (see :class:`Method`).
    """
    if kind == "npy":
        mm = np.load(path, mmap_mode="r")
        found = {"gpuloader": source_method(NpySource(path), batch, False),
                 "numpy-fancy": Method(lambda idx: mm[idx])}
        if order == "sequential":
            found["slice-copy"] = slice_method(mm, batch)
        return found
    isolated = kind == "h5-gzip"
    found = {"gpuloader": source_method(Hdf5Source(path), batch, isolated)}
    if kind == "h5-contiguous":
        with h5py.File(path, "r") as h5:
            offset, shape, dtype = h5["x"].id.get_offset(), h5["x"].shape, h5["x"].dtype
        mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        found["memmap-fancy"] = Method(lambda idx: mm[idx])
        if order == "sequential":
            found["slice-copy"] = slice_method(mm, batch)
    found.update(h5py_methods(path, order, batch, isolated))
    return found


BASELINE = {"npy": "numpy-fancy", "h5-contiguous": "memmap-fancy",
            "h5-chunked": "h5py-direct", "h5-gzip": "h5py-direct"}


def run(args: argparse.Namespace, root: Path) -> Dict[str, object]:
    row_bytes = args.row_floats * 4
    rows = max(args.batch, (args.mb << 20) // row_bytes)
    gzip_rows = min(rows, max(args.batch, (args.gzip_mb << 20) // row_bytes))
    print(f"writing {rows} rows x {row_bytes} B ({rows * row_bytes / 1e6:.0f} MB) to {root}",
          file=sys.stderr)
    paths = write_files(root, rows, args.row_floats, args.chunk_rows, gzip_rows)
    warm_page_cache(list(paths.values()))
    results: List[Result] = []
    for kind, path in paths.items():
        n = gzip_rows if kind == "h5-gzip" else rows
        for order, batches in batch_orders(n, args.batch, args.batches, args.seed).items():
            methods = methods_for(kind, path, order, args.batch)
            share = {name: batches[: args.fancy_batches] if name == "h5py-fancy" else batches
                     for name in methods}
            for name, seconds in time_group(methods, share, args.repeats).items():
                nbytes = len(share[name]) * args.batch * row_bytes
                results.append(Result(kind, order, name, len(share[name]), nbytes, seconds,
                                      nbytes / seconds / 1e9))
                print(f"  {kind:14s} {order:16s} {name:13s} {results[-1].gbps:7.2f} GB/s",
                      file=sys.stderr)
    return {
        "config": {**vars(args), "rows": rows, "row_bytes": row_bytes, "gzip_rows": gzip_rows,
                   "page_cache": "warm", "python": platform.python_version(),
                   "numpy": np.__version__, "h5py": h5py.__version__,
                   "hdf5": h5py.version.hdf5_version, "cpus": os.cpu_count(),
                   "machine": platform.machine()},
        "results": [asdict(r) for r in results],
        "ratios": ratios(results),
    }


def ratios(results: List[Result]) -> Dict[str, Optional[float]]:
    """``file/order`` -> gpuloader GB/s divided by the baseline's (BASELINE; slice-copy or
    h5py-direct where that baseline was not run for the order)."""
    table = {(r.file, r.order, r.method): r.gbps for r in results}
    found: Dict[str, Optional[float]] = {}
    for (kind, order, method), gbps in table.items():
        if method != "gpuloader":
            continue
        base = table.get((kind, order, BASELINE[kind]))
        if base is None:
            base = table.get((kind, order, "h5py-fancy"))
        found[f"{kind}/{order}"] = round(gbps / base, 3) if base else None
    return found


def print_table(report: Dict[str, object]) -> None:
    results = report["results"]
    header = f"{'file':14s} {'order':16s} {'method':13s} {'GB/s':>8s} {'vs gpuloader':>13s}"
    print(header)
    print("-" * len(header))
    ours = {(r["file"], r["order"]): r["gbps"] for r in results if r["method"] == "gpuloader"}
    for r in results:
        mine = ours.get((r["file"], r["order"]))
        ratio = "" if r["method"] == "gpuloader" or not r["gbps"] else f"{mine / r['gbps']:.2f}x"
        print(f"{r['file']:14s} {r['order']:16s} {r['method']:13s} {r['gbps']:8.2f} {ratio:>13s}")
    print("\ngpuloader / baseline (npy: numpy-fancy; h5-contiguous: memmap-fancy; "
          "chunked, gzip: h5py-direct when sequential, h5py-fancy when shuffled):")
    for key, value in report["ratios"].items():
        print(f"  {key:32s} {value}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write the data files (default: a temp dir, removed)")
    parser.add_argument("--mb", type=int, default=512, help="dataset size in MB (default 512)")
    parser.add_argument("--gzip-mb", type=int, default=32,
                        help="size of the gzip HDF5 file in MB (default 32; slow to write)")
    parser.add_argument("--row-floats", type=int, default=256,
                        help="float32 values per sample (default 256 = 1 KiB rows)")
    parser.add_argument("--chunk-rows", type=int, default=1024,
                        help="HDF5 chunk length along dim 0 (default 1024)")
    parser.add_argument("--batch", type=int, default=1024, help="rows per batch (default 1024)")
    parser.add_argument("--batches", type=int, default=64, help="batches per pass (default 64)")
    parser.add_argument("--fancy-batches", type=int, default=4,
                        help="batches per pass for h5py fancy indexing (slow; default 4)")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes (default 7)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("read_throughput.json"))
    args = parser.parse_args(argv)
    if args.dir is None:
        root = Path(tempfile.mkdtemp(prefix="gpuloader-read-"))
        cleanup = True
    else:
        root = args.dir
        root.mkdir(parents=True, exist_ok=True)
        cleanup = False
    try:
        report = run(args, root)
    finally:
        if cleanup:
            shutil.rmtree(root, ignore_errors=True)
    report["config"] = {k: str(v) if isinstance(v, Path) else v
                        for k, v in report["config"].items()}
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
