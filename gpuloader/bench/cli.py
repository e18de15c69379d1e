"""Command line: ``gpuloader bench`` (and ``python -m gpuloader.bench``)."""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

from gpuloader.bench.cases import DEFAULT_LOADERS, LOADERS
from gpuloader.bench.checks import check_names
from gpuloader.bench.comparison import compare
from gpuloader.bench.timing import COMPUTE_KINDS
from gpuloader.bench.raw import RawField, close_raw, raw_fields_from_dataset, raw_fields_from_path
from gpuloader.bench.report import markdown, write_report
from gpuloader.bench.synthetic import make_synthetic
from gpuloader.dataset import open_dataset
from gpuloader.errors import GpuLoaderError
from gpuloader.order import ORDERS


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
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: 256 (1024 with --cold)")
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
    parser.add_argument("--ragged", action="store_true",
                        help="the variable-length benchmark instead (gpuloader/bench/ragged.py"
                        "): padding efficiency, tokens/s vs torch, resume; uses --out, "
                        "--repeats, --seed and the options below")
    ragged = parser.add_argument_group("--ragged options")
    from gpuloader.bench.ragged import add_arguments as ragged_arguments
    ragged_arguments(ragged)
    cold = parser.add_argument_group("cold storage (--cold: files not in the page cache; "
                                     "see gpuloader.bench.cold)")
    cold.add_argument("--cold", action="store_true",
                      help="run the cold benchmark instead: each case in a fresh process after "
                      "dropping its file from the page cache; writes cold.json and cold.md")
    cold.add_argument("--dir", default="gpuloader-cold",
                      help="folder for the cold benchmark's files (default: %(default)s)")
    cold.add_argument("--gb", type=float, default=4.0,
                      help="size of the cold .npy file of 1 KB rows, GB (default: %(default)s)")
    cold.add_argument("--gzip-mb", type=float, default=256.0,
                      help="size of the gzip HDF5 file, MB (default: %(default)s)")
    cold.add_argument("--epochs-mb", type=float, default=128.0,
                      help="file read for 3 cold epochs (memory bound), MB (default: "
                      "%(default)s)")
    cold.add_argument("--delete", action="store_true",
                      help="delete the cold benchmark's files afterwards")


def main(args: Union[argparse.Namespace, Sequence[str], None] = None) -> int:
    """Run ``gpuloader bench``; ``args`` is a parsed namespace or an argv list.  Returns 0.

    Bad options print one line to stderr and return 2.
    """
    if not isinstance(args, argparse.Namespace):
        import gpuloader.bench as package  # its docstring's first line describes the command

        parser = argparse.ArgumentParser(prog="gpuloader bench",
                                         description=(package.__doc__ or "").split("\n")[0])
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
    if getattr(args, "ragged", False):
        from gpuloader.bench.ragged import main as ragged_main

        return ragged_main(args=args)
    if getattr(args, "cold", False):
        from gpuloader.bench import cold

        return cold.main(args)
    progress = not getattr(args, "no_progress", False)
    # Check the case names before spending time on data.
    check_names("loaders", args.loaders, LOADERS, DEFAULT_LOADERS)
    check_names("orders", args.orders, ORDERS, ORDERS)
    with contextlib.ExitStack() as stack:
        dataset, raw = _open_data(args, stack)
        closer = getattr(dataset, "close", None)
        if callable(closer):
            stack.callback(closer)
        stack.callback(close_raw)
        records = compare(
            dataset, batch_size=args.batch_size or 256, loaders=args.loaders, orders=args.orders,
            num_workers=args.num_workers, seconds=args.seconds, compute_ms=args.compute_ms,
            compute_kind=getattr(args, "compute_kind", "auto"),
            device=args.device, repeats=args.repeats, samples=args.samples, seed=args.seed,
            raw=raw, progress=progress,
        )
    written = write_report(records, args.out)
    print(markdown(records), end="")
    for kind in ("json", "md", "png"):
        if kind in written:
            print(f"wrote {written[kind]}")
    return 0


def _open_data(args: argparse.Namespace,
               stack: contextlib.ExitStack) -> Tuple[Any, Dict[str, RawField]]:
    """The dataset of ``--data`` and its raw fields.

    Without ``--data``: a synthetic dataset in a temporary folder that ``stack`` removes.
    """
    if args.data:
        path = Path(args.data)
        dataset = open_dataset(str(path), args.fields, dtype=args.dtype, shape=args.shape)
        raw = raw_fields_from_dataset(dataset) or raw_fields_from_path(
            path, args.fields, dtype=args.dtype, shape=args.shape)
        return dataset, raw
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="gpuloader-bench-"))
    print(f"gpuloader bench: writing a synthetic {args.format} dataset of "
          f"{args.size_mb:g} MB to {tmp}", file=sys.stderr)
    path = make_synthetic(tmp, size_mb=args.size_mb, sample_floats=args.sample_floats,
                          fmt=args.format, seed=args.seed)
    dataset = open_dataset(str(path))
    return dataset, raw_fields_from_dataset(dataset) or raw_fields_from_path(path)
