"""The measurements of the cold benchmark, each run in a fresh process (see cold.py).

Every case first drops its file from the page cache (NOTE(cold-drop)), then reads from the
start of epoch 0 for about ``seconds`` and reports rows/s over the batches after the first (the
first batch's latency is reported separately, so process and worker start-up do not count).

NOTE(cold-drop): ``os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`` after ``fsync`` evicts a
file's clean pages, except those some process has mapped into its page tables; each case runs in
a fresh process that drops its file before mapping it.  cold.py checks that the drop works on
the machine's filesystem by timing a cold and a warm sequential read of the same bytes.

Run as ``python -m gpuloader.bench.coldcases '<json spec>'``; prints one JSON line.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np


def drop_from_cache(path: str) -> None:
    """NOTE(cold-drop)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def rss_anon() -> int:
    """Resident anonymous memory of this process, bytes (file pages are page cache, not this)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    """Peak resident set size of this process so far, bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(batches: Iterator[int], seconds: Optional[float]) -> Dict[str, float]:
    """Consume ``batches`` (each yields its row count) for ``seconds`` after the first (None:
    all of them, a whole epoch)."""
    seconds = float("inf") if seconds is None else seconds
    started = time.perf_counter()
    first = next(batches)
    t0 = time.perf_counter()
    rows = 0
    for count in batches:
        rows += count
        if time.perf_counter() - t0 >= seconds:
            break
    elapsed = time.perf_counter() - t0
    return {"first_batch_s": t0 - started, "rows": rows + first,
            "rows_per_s": rows / elapsed if elapsed > 0 else 0.0, "seconds": elapsed,
            "rows_per_s_from_start": (rows + first) / (time.perf_counter() - started)}


def _batches_of(loader: Any) -> Iterator[int]:
    for batch in loader:
        values = batch.values() if isinstance(batch, dict) else batch
        yield len(next(iter(values)))


def _sorted_batches(n: int, batch: int, seed: int) -> Iterator[np.ndarray]:
    """The batches of gpuloader's shuffle order (epoch 0), each sorted, as raw cases read them."""
    from gpuloader.order import EpochOrder

    order = EpochOrder("shuffle", n, seed=seed, epoch=0)
    for start in range(0, n - batch + 1, batch):
        yield np.sort(order[start:start + batch])


def raw_pread(spec: Dict[str, Any]) -> Dict[str, float]:
    """``threads`` threads of ``os.preadv``, one row each, over the sorted shuffled batches."""
    threads, row, base = spec["threads"], spec["row_nbytes"], spec["offset"]
    fd = os.open(spec["path"], os.O_RDONLY)
    out = np.empty((spec["batch"], row), dtype=np.uint8)
    views = [memoryview(out[k]) for k in range(len(out))]
    barrier = threading.Barrier(threads + 1)
    current: List[np.ndarray] = []

    def work(t: int) -> None:
        while True:
            barrier.wait()
            if not current:
                return
            offsets = (base + current[0] * row).tolist()
            for k in range(t, len(offsets), threads):
                os.preadv(fd, [views[k]], offsets[k])
            barrier.wait()

    pool = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
    for t in pool:
        t.start()

    def batches() -> Iterator[int]:
        for idx in _sorted_batches(spec["n"], spec["batch"], spec["seed"]):
            current[:] = [idx]
            barrier.wait()
            barrier.wait()
            yield len(idx)

    try:
        return _timed(batches(), spec["seconds"])
    finally:
        current.clear()
        barrier.wait()
        os.close(fd)


def raw_sequential(spec: Dict[str, Any]) -> Dict[str, float]:
    """One thread of 8 MB ``os.preadv`` from the start of the file."""
    fd = os.open(spec["path"], os.O_RDONLY)
    buf = memoryview(bytearray(8 << 20))
    size = os.fstat(fd).st_size

    def batches() -> Iterator[int]:
        offset = spec["offset"]
        while offset < size:
            got = os.preadv(fd, [buf], offset)
            offset += got
            yield got // spec["row_nbytes"]

    try:
        return _timed(batches(), spec["seconds"])
    finally:
        os.close(fd)


def torch_per_sample(spec: Dict[str, Any]) -> Dict[str, float]:
    """torch's DataLoader over a per-sample memmap Dataset, shuffled, ``workers`` processes."""
    import torch

    loader = torch.utils.data.DataLoader(
        PerSample(spec["path"]), batch_size=spec["batch"], shuffle=True, drop_last=True,
        num_workers=spec["workers"], generator=torch.Generator().manual_seed(spec["seed"]))
    return _timed((len(b) for b in loader), spec["seconds"])


class PerSample:
    """A plain map-style Dataset: one memmap row per ``__getitem__`` (opened lazily per worker)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.length = int(np.load(path, mmap_mode="r").shape[0])
        self.rows: Any = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        import torch

        if self.rows is None:
            self.rows = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self.rows[i]))


def gpuloader_case(spec: Dict[str, Any]) -> Dict[str, float]:
    """gpuloader's DataLoader in ``order`` (any dataset ``open_dataset`` reads);
    ``read_around: false`` reads cold rows one by one, as for a file larger than memory
    (NOTE(read-around) in sources/pread.py)."""
    import gpuloader as gl
    from gpuloader.sources import pread

    fit = pread.FIT_FRACTION
    if not spec.get("read_around", True):
        pread.FIT_FRACTION = 0.0  # restored below: tests run cases in the test process
    ds = gl.open_dataset(spec["path"], **spec.get("open", {}))
    try:
        with gl.DataLoader(ds, batch_size=spec["batch"], order=spec["order"],
                           seed=spec["seed"], num_workers=spec.get("workers", 0),
                           drop_last=True) as loader:
            return _timed(_batches_of(loader), spec["seconds"])
    finally:
        ds.close()
        pread.FIT_FRACTION = fit


def h5py_sequential(spec: Dict[str, Any]) -> Dict[str, float]:
    """h5py's own sequential ``read_direct`` of consecutive batches into one buffer."""
    import h5py

    with h5py.File(spec["path"], "r") as h5:
        dset = h5[spec["key"]]
        out = np.empty((spec["batch"], *dset.shape[1:]), dtype=dset.dtype)

        def batches() -> Iterator[int]:
            for start in range(0, dset.shape[0] - spec["batch"] + 1, spec["batch"]):
                dset.read_direct(out, source_sel=np.s_[start:start + spec["batch"]])
                yield spec["batch"]

        return _timed(batches(), spec["seconds"])


def billion(spec: Dict[str, Any]) -> Dict[str, float]:
    """Time to the first shuffled batch and peak RSS growth on a huge sparse raw file."""
    import gpuloader as gl

    ds = gl.open_dataset(spec["path"], dtype="uint8", shape=(-1,))
    before, anon = peak_rss(), rss_anon()
    started = time.perf_counter()
    with gl.DataLoader(ds, batch_size=spec["batch"], order="shuffle", seed=spec["seed"]) as loader:
        first = next(iter(loader))
        elapsed = time.perf_counter() - started
        # ru_maxrss only grows past the peak the imports left; RssAnon shows the order's cost
        growth, anon_growth = peak_rss() - before, rss_anon() - anon
    ds.close()
    return {"samples": len(ds), "first_batch_s": elapsed, "peak_rss_growth": growth,
            "rss_anon_growth": anon_growth, "batch": sum(len(v) for v in first.values())}


def epochs_rss(spec: Dict[str, Any]) -> Dict[str, float]:
    """Anonymous-memory growth over ``epochs`` cold shuffled epochs (cache dropped before each)."""
    import gpuloader as gl

    ds = gl.open_dataset(spec["path"])
    loader = gl.DataLoader(ds, batch_size=spec["batch"], order="shuffle", seed=spec["seed"])
    start = rss_anon()
    peaks, rows, t0 = [], 0, time.perf_counter()
    for _ in range(spec["epochs"]):
        drop_from_cache(spec["path"])
        for count in _batches_of(loader):
            rows += count
        peaks.append(rss_anon())
    elapsed = time.perf_counter() - t0
    loader.close()
    ds.close()
    return {"rss_anon_start": start, "rss_anon_after_epochs": peaks,
            "rss_anon_growth": max(peaks) - start, "rows_per_s": rows / elapsed}


CASES: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
    "raw-pread": raw_pread, "raw-sequential": raw_sequential, "torch": torch_per_sample,
    "gpuloader": gpuloader_case, "h5py-sequential": h5py_sequential, "billion": billion,
    "epochs-rss": epochs_rss,
}


def run(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Drop ``spec["path"]`` from the cache (unless ``warm``), then run its case."""
    if not spec.get("warm"):
        drop_from_cache(spec["path"])
    return CASES[spec["case"]](spec)


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
