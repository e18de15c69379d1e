"""``gpuloader demo``: a first run on built-in defaults.

It builds (once, cached) a synthetic, learnable classification dataset as a folder of ``.npy``
files and as an HDF5 file, trains a small MLP on it with ``batch_size="auto"`` and
``device="auto"``, then runs the same epoch through ``torch.utils.data.DataLoader`` with
per-sample reads and prints both side by side.

NOTE(demo-cache): data lives under ``<cache>/demo-<samples>x<features>-c<classes>-s<seed>/``
(``npy/x.npy``, ``npy/y.npy`` and ``data.h5``), where ``<cache>`` is ``--cache-dir``, else
``$XDG_CACHE_HOME/gpuloader``, else ``~/.cache/gpuloader`` (an empty variable counts as unset,
as in the examples' ``${XDG_CACHE_HOME:-~/.cache}``).  A folder is built under a temporary name
and renamed when complete; before reuse, every file's dtype, shape and byte size is checked, and
a stale or truncated cache is rebuilt.  Labels are ``argmax(x @ W)`` for a fixed random ``W``
(seeded), so the task is learnable and the loss falls.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from gpuloader.cliargs import non_negative_int, positive_int, positive_ints, table
from gpuloader.stats import rates

__all__ = ["DemoData", "cache_root", "demo_data", "add_arguments", "main"]

DEFAULT_SAMPLES = 250_000
DEFAULT_FEATURES = 256
DEFAULT_CLASSES = 10
DEFAULT_TEXT_STEPS = 150
_GEN_BLOCK_BYTES = 32 << 20


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """Where demo data is cached (NOTE(demo-cache))."""
    if cache_dir:
        return Path(os.path.expanduser(cache_dir))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(os.path.expanduser("~/.cache"))
    return base / "gpuloader"


@dataclass(frozen=True)
class DemoData:
    """Paths and size of one cached demo dataset."""

    root: Path
    samples: int
    features: int
    classes: int

    @property
    def npy(self) -> Path:
        """Folder with ``x.npy`` (float32 features) and ``y.npy`` (int64 labels)."""
        return self.root / "npy"

    @property
    def hdf5(self) -> Path:
        """HDF5 file with datasets ``x`` and ``y`` (chunked, uncompressed)."""
        return self.root / "data.h5"

    def path(self, fmt: str) -> Path:
        return self.hdf5 if fmt == "hdf5" else self.npy

    @property
    def nbytes(self) -> int:
        """Bytes of one format's data."""
        return self.samples * (4 * self.features + 8)


def _npy_ok(path: Path, dtype: np.dtype, shape: Tuple[int, ...]) -> bool:
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
        expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return (tuple(got_shape) == shape and np.dtype(got_dtype) == dtype and not fortran
                and path.stat().st_size == expected)
    except (OSError, ValueError):
        return False


def _h5_ok(path: Path, data: DemoData) -> bool:
    try:
        import h5py

        with h5py.File(path, "r") as f:
            x, y = f["x"], f["y"]
            ok = (x.shape == (data.samples, data.features) and x.dtype == np.float32
                  and y.shape == (data.samples,) and y.dtype == np.int64)
            if ok and data.samples:  # the last rows must be readable (not truncated)
                x[data.samples - 1]
                y[data.samples - 1]
            return bool(ok)
    except Exception:  # h5py raises OSError, KeyError, RuntimeError... for broken files
        return False


def _valid(data: DemoData) -> bool:
    return (_npy_ok(data.npy / "x.npy", np.dtype(np.float32), (data.samples, data.features))
            and _npy_ok(data.npy / "y.npy", np.dtype(np.int64), (data.samples,))
            and _h5_ok(data.hdf5, data))


def _write_npy(path: Path, dtype: np.dtype, shape: Tuple[int, ...],
               blocks: Iterable[np.ndarray]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": shape}
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_2_0(fh, header)
        for block in blocks:
            fh.write(memoryview(np.ascontiguousarray(block, dtype=dtype)).cast("B"))


def _generate(folder: Path, samples: int, features: int, classes: int, seed: int,
              progress: bool) -> None:
    """Write ``x.npy``/``y.npy`` into ``folder`` in blocks of rows (bounded memory)."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((features, classes)).astype(np.float32)
    block = max(1, _GEN_BLOCK_BYTES // (4 * features))
    labels = np.empty(samples, dtype=np.int64)

    def x_blocks() -> Iterable[np.ndarray]:
        with tqdm(total=samples, unit="sample", unit_scale=True, disable=not progress,
                  desc="making demo data", leave=False) as bar:
            for start in range(0, samples, block):
                stop = min(samples, start + block)
                x = rng.standard_normal((stop - start, features), dtype=np.float32)
                labels[start:stop] = np.argmax(x @ weights, axis=1)
                yield x
                bar.update(stop - start)

    _write_npy(folder / "x.npy", np.dtype(np.float32), (samples, features), x_blocks())
    _write_npy(folder / "y.npy", np.dtype(np.int64), (samples,), [labels])


def demo_data(*, samples: int = DEFAULT_SAMPLES, features: int = DEFAULT_FEATURES,
              classes: int = DEFAULT_CLASSES, seed: int = 0, cache_dir: Optional[str] = None,
              rebuild: bool = False, progress: bool = False,
              log: Callable[[str], None] = lambda _m: None) -> DemoData:
    """The cached demo dataset for these parameters, built when missing, stale or truncated."""
    from gpuloader.convert import convert

    for name, value, low in (("samples", samples, 1), ("features", features, 1),
                             ("classes", classes, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            from gpuloader.errors import ArgumentError

            raise ArgumentError(f"{name} must be an int >= {low}; got {value!r}")
    root = cache_root(cache_dir)
    data = DemoData(root / f"demo-{samples}x{features}-c{classes}-s{seed}", samples, features,
                    classes)
    if not rebuild and data.root.exists() and _valid(data):
        return data
    if data.root.exists():
        log(f"rebuilding {data.root} (missing or incomplete files)" if not rebuild
            else f"rebuilding {data.root}")
    else:
        log(f"making {data.nbytes / 1e6:,.0f} MB of demo data per format in {data.root}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{data.root.name}.", suffix=".tmp", dir=str(root)))
    try:
        (tmp / "npy").mkdir()
        _generate(tmp / "npy", samples, features, classes, seed, progress)
        chunk_rows = max(1, (1 << 20) // (4 * features))  # about 1 MiB chunks of x
        convert(tmp / "npy", tmp / "data.h5", chunk_rows=chunk_rows, progress=progress)
        if data.root.exists():
            shutil.rmtree(data.root)
        os.replace(tmp, data.root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data


# --------------------------------------------------------------------------------------------
# training and the comparison


class _PerSample:
    """A plain per-sample torch Dataset over the demo files (what a torch user would write)."""

    def __init__(self, data: DemoData, fmt: str) -> None:
        self.data, self.fmt = data, fmt
        self._x: Any = None
        self._y: Any = None

    def _open(self) -> None:
        if self.fmt == "hdf5":
            import h5py

            handle = h5py.File(self.data.hdf5, "r")
            self._x, self._y = handle["x"], handle["y"]
        else:
            self._x = np.load(self.data.npy / "x.npy", mmap_mode="r")
            self._y = np.load(self.data.npy / "y.npy", mmap_mode="r")

    def __len__(self) -> int:
        return self.data.samples

    def __getitem__(self, i: int) -> Dict[str, Any]:
        import torch

        if self._x is None:
            self._open()
        return {"x": torch.from_numpy(np.array(self._x[i])), "y": int(self._y[i])}


@dataclass
class _Result:
    name: str
    samples: int = 0
    bytes: int = 0
    elapsed_s: float = 0.0
    wait_s: float = 0.0
    batch_sizes: Tuple[int, ...] = ()
    path: str = "-"  # gpuloader's "fast" or "generic" path (NOTE(paths) in loader.py)
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    partial: bool = False
    note: str = ""

    @property
    def samples_per_s(self) -> float:
        return rates(self.samples, self.bytes, self.elapsed_s).samples_per_s

    @property
    def gb_per_s(self) -> float:
        return rates(self.samples, self.bytes, self.elapsed_s).gb_per_s

    @property
    def stall(self) -> float:
        return rates(self.samples, self.bytes, self.elapsed_s, self.wait_s).stall_fraction


def _loss_window(losses: List[float]) -> Tuple[float, float]:
    k = max(1, min(10, len(losses) // 4 or 1))
    return (sum(losses[:k]) / k, sum(losses[-k:]) / k) if losses else (math.nan, math.nan)


def _make_model(features: int, classes: int, hidden: Tuple[int, ...], device: Any) -> Any:
    import torch

    from gpuloader.models import mlp

    torch.manual_seed(0)
    return mlp(input_shape=(features,), outputs=classes, hidden=hidden).to(device)


def _run_gpuloader(data: DemoData, fmt: str, args: argparse.Namespace,
                   device: Any) -> Tuple[_Result, Any]:
    import torch
    from tqdm import tqdm

    from gpuloader.dataset import open_dataset
    from gpuloader.loader import DataLoader

    model = _make_model(data.features, data.classes, args.hidden, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    ds = open_dataset(data.path(fmt))
    loader = DataLoader(ds, batch_size="auto", shuffle=True, device=device, seed=0,
                        max_batch_size=args.max_batch_size)
    result = _Result("gpuloader.DataLoader")
    losses: List[float] = []
    sizes: List[int] = []
    try:
        for epoch in range(args.epochs):
            loader.set_epoch(epoch)
            loader.stats_reset()
            started = time.perf_counter()
            with tqdm(total=len(ds), unit="sample", unit_scale=True, dynamic_ncols=True,
                      desc=f"gpuloader epoch {epoch + 1}/{args.epochs}", disable=args.quiet,
                      file=sys.stderr) as bar:
                for batch in loader:
                    guard = loader.oom_guard(optimizer)
                    with guard:
                        out = model(batch["x"])
                        loss = loss_fn(out, batch["y"])
                        loss.backward()
                    if guard.failed:
                        continue
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
                    if loader.batch_size not in sizes:  # the sizes auto chose (not the
                        sizes.append(int(loader.batch_size))  # epoch's short last batch)
                    bar.update(int(batch["x"].shape[0]))
                    st = loader.stats()
                    bar.set_postfix(bs=loader.batch_size,
                                    stall=f"{100 * st['stall_fraction']:.0f}%", refresh=False)
            st = loader.stats()
            result.samples += int(st["samples"])
            result.bytes += int(st["bytes"])
            result.wait_s += float(st["wait_s"])
            result.elapsed_s += time.perf_counter() - started
    finally:
        loader.close()
        ds.close()
    result.batch_sizes = tuple(sizes)
    result.path = loader.path
    result.first_loss, result.last_loss = _loss_window(losses)
    return result, loader


def _run_torch(data: DemoData, fmt: str, args: argparse.Namespace, device: Any,
               batch_size: int) -> _Result:
    import torch
    from tqdm import tqdm

    model = _make_model(data.features, data.classes, args.hidden, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    dataset = _PerSample(data, fmt)
    cuda = getattr(device, "type", "cpu") == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=args.torch_workers,
        pin_memory=cuda, generator=torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    result = _Result(f"torch DataLoader (per-sample, num_workers={args.torch_workers})")
    row_bytes = 4 * data.features + 8
    losses: List[float] = []
    started = time.perf_counter()
    limit = args.compare_seconds
    with tqdm(total=len(dataset), unit="sample", unit_scale=True, dynamic_ncols=True,
              desc="torch epoch 1/1", disable=args.quiet, file=sys.stderr) as bar:
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            x = batch["x"].to(device, non_blocking=True)
            y = batch["y"].to(device, non_blocking=True)
            if cuda:
                torch.cuda.current_stream().synchronize()
            result.wait_s += time.perf_counter() - t0
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            n = int(x.shape[0])
            result.samples += n
            bar.update(n)
            if limit and time.perf_counter() - started > limit and result.samples < len(dataset):
                result.partial = True
                break
        del it
    result.elapsed_s = time.perf_counter() - started
    result.bytes = result.samples * row_bytes
    result.batch_sizes = (batch_size,)
    result.first_loss, result.last_loss = _loss_window(losses)
    return result


def summary(results: List[_Result], epochs: int = 1, max_batch_size: Optional[int] = None) -> str:
    """The comparison table printed at the end of the demo (gpuloader ran ``epochs``, with
    ``batch_size="auto"`` bounded by ``max_batch_size``)."""
    bound = f", max {max_batch_size}" if max_batch_size else ""
    header = ("",) + tuple(r.name for r in results)

    def row(label: str, fn: Callable[[_Result], str]) -> Tuple[str, ...]:
        return (label,) + tuple(fn(r) for r in results)

    def samples(r: _Result) -> str:
        text = f"{r.samples:,}"
        if r.partial:
            text += f" (stopped after {r.elapsed_s:.0f} s of the epoch)"
        return text

    rows = [
        header,
        row("samples/s", lambda r: f"{r.samples_per_s:,.0f}"),
        row("GB/s", lambda r: f"{r.gb_per_s:.3f}"),
        row("batch sizes", lambda r: ", ".join(str(s) for s in r.batch_sizes)
            + (f" (auto{bound})" if r is results[0] else " (fixed)")),
        row("stall fraction", lambda r: f"{100 * r.stall:.1f}%"),
        row("gpuloader path", lambda r: r.path),
        row("samples trained", samples),
        row("time", lambda r: f"{r.elapsed_s:.1f} s"),
        row("loss first -> last", lambda r: f"{r.first_loss:.3f} -> {r.last_loss:.3f}"),
    ]
    text = table(rows, rule=True)
    if len(results) > 1 and results[1].samples_per_s > 0:
        ratio = results[0].samples_per_s / results[1].samples_per_s
        text += (f"\n\ngpuloader read and trained {ratio:.1f}x as many samples per second as "
                 "torch's DataLoader with per-sample reads.")
        if epochs > 1:
            text += f" (gpuloader: {epochs} epochs; torch: its first epoch only.)"
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``gpuloader demo`` options."""
    parser.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES,
                        help=f"rows of synthetic data (default {DEFAULT_SAMPLES:,})")
    parser.add_argument("--features", type=positive_int, default=DEFAULT_FEATURES,
                        help=f"float32 features per row (default {DEFAULT_FEATURES})")
    parser.add_argument("--classes", type=positive_int, default=DEFAULT_CLASSES,
                        help=f"label classes (default {DEFAULT_CLASSES})")
    parser.add_argument("--format", choices=("npy", "hdf5"), default="npy", dest="fmt",
                        help="which copy of the data to train from (default npy)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the data is cached (default $XDG_CACHE_HOME/gpuloader or "
                             "~/.cache/gpuloader)")
    parser.add_argument("--epochs", type=positive_int, default=1,
                        help="epochs through gpuloader (default 1; torch runs one)")
    parser.add_argument("--device", default="auto",
                        help='"auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:N"')
    parser.add_argument("--max-batch-size", type=positive_int, default=1024,
                        help="upper bound for the auto batch size (default 1024): on a big "
                             "GPU or host, free memory alone would allow huge batches")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--torch-workers", type=non_negative_int, default=0,
                        help="num_workers of the torch comparison (default 0)")
    parser.add_argument("--compare-seconds", type=float, default=30.0,
                        help="stop the torch epoch after this many seconds and report its rate "
                             "so far (0: no limit; default 30)")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the torch DataLoader comparison")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only make (or check) the cached data and print its paths")
    parser.add_argument("--rebuild", action="store_true", help="remake the cached data")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--hidden", type=positive_ints, default=(64,),
                        help="hidden layer widths of the MLP, comma-separated (default 64)")
    parser.add_argument("--text", action="store_true",
                        help="the sequence-model path instead: convert the standard library's "
                             "*.py sources to byte tokens, train bytelm with batch_size auto "
                             "(token budgets from memory), loss vs unigram entropy")
    parser.add_argument("--text-source", default=None, metavar="DIR",
                        help="--text: a folder of *.py files (default: the standard library)")
    parser.add_argument("--text-steps", type=positive_int, default=DEFAULT_TEXT_STEPS,
                        metavar="N", help=f"--text: optimizer steps (default "
                                          f"{DEFAULT_TEXT_STEPS})")


def main(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status."""
    if args.text:
        from gpuloader import textdemo

        return textdemo.main(args)
    say = print
    t0 = time.perf_counter()
    data = demo_data(samples=args.samples, features=args.features, classes=args.classes,
                     cache_dir=args.cache_dir, rebuild=args.rebuild, progress=not args.quiet,
                     log=lambda m: print(m, file=sys.stderr))
    if args.prepare_only:
        say(f"npy:  {data.npy}")
        say(f"hdf5: {data.hdf5}")
        return 0
    import torch

    from gpuloader.devices import resolve_device

    device = resolve_device(args.device) or torch.device("cpu")
    threads = ""
    if device.type == "cpu":
        # Training on the CPU: leave a core for reading.  torch's intra-op threads spin while
        # they wait, so threads that also want every core slow each other down badly on small
        # machines.  Both runs below use the same setting.
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - 1)))
        threads = f", {torch.get_num_threads()} compute thread(s) of {cores} cores"
    say(f"gpuloader demo: {data.samples:,} samples x {data.features} float32 features, "
        f"{data.classes} classes ({data.nbytes / 1e6:,.0f} MB, {args.fmt}: {data.path(args.fmt)})")
    say(f"model: mlp {data.features}-{'-'.join(map(str, args.hidden))}-{data.classes}, AdamW "
        f"lr={args.lr}; device: {device} (from --device {args.device}){threads}")
    results = []
    ours, loader = _run_gpuloader(data, args.fmt, args, device)
    results.append(ours)
    if not args.no_compare:
        size = ours.batch_sizes[0] if ours.batch_sizes else 256
        results.append(_run_torch(data, args.fmt, args, device, size))
    say("")
    say(summary(results, args.epochs, args.max_batch_size))
    say(f"\ntotal {time.perf_counter() - t0:.0f} s. Next: gpuloader train examples/npy.yaml "
        "(see examples/), gpuloader inspect " + str(data.path(args.fmt)))
    return 0
