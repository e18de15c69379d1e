"""The ``gpuloader`` command: ``demo | train | inspect | convert | probe | bench``.

``main(argv) -> int`` is the entry point (also ``python -m gpuloader``).  Bad input — options
argparse refuses, and the library's own errors (GpuLoaderError, ConfigError, missing files,
ValueErrors from validation) — prints ``gpuloader: error: <line>`` per problem on stderr, with no
traceback, and returns 2.  ``--debug`` (before or after the subcommand) re-raises instead, for a
traceback.  Heavy modules (torch, h5py, the loader) are imported only by the subcommand that needs
them, so ``--help`` and ``--version`` are quick.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Sequence

from gpuloader.cliargs import positive_int, table

__all__ = ["main", "build_parser"]

PROG = "gpuloader"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpuloader")
    except PackageNotFoundError:
        pass
    import gpuloader

    return str(getattr(gpuloader, "__version__", "unknown"))


def _names(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    """``--fields x y`` and ``--fields x,y`` alike."""
    if not values:
        return None
    return [part for value in values for part in value.split(",") if part]


def _gib(n: int) -> str:
    return f"{n / (1 << 30):,.2f} GiB"


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------------------------
# subcommands


def _cmd_demo(args: argparse.Namespace) -> int:
    from gpuloader import demo

    return demo.main(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from gpuloader import config as config_mod
    from gpuloader import train

    cfg = config_mod.load(args.config, args.overrides or ())
    what = (f"{cfg.data.inputs} -> {cfg.data.targets}" if cfg.data.targets is not None
            else f"next token of {cfg.data.inputs}")
    print(f"training {cfg.model.name} on {cfg.data.path} ({what}) for {cfg.train.epochs} "
          f"epoch(s); output in {cfg.output}", file=sys.stderr)
    train.run(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
              log=print)
    print(f"metrics: {os.path.join(cfg.output, train.METRICS)}; checkpoint: "
          f"{os.path.join(cfg.output, train.CHECKPOINT)}")
    return 0


def _auto_batch(ds: Any, device: str) -> Dict[str, Any]:
    """What ``batch_size="auto"`` picks for ``ds`` on ``device`` now, and why."""
    import torch

    from gpuloader.buffers import ring_slots
    from gpuloader.loader import DataLoader
    from gpuloader.planning import SizerConfig, plan_batch_size
    from gpuloader.probes import probe_for

    loader = DataLoader(ds, batch_size="auto", device=device)
    try:
        size = int(loader.batch_size or 0)
        target = loader.device or torch.device("cpu")
        info = probe_for(target, None).read()
        per_sample = sum(spec.sample_nbytes for spec in ds.fields.values())
        uncapped = plan_batch_size(info.free, SizerConfig(
            staging_bytes_per_sample=per_sample, ring_slots=ring_slots(loader.prefetch_depth),
            dataset_len=max(1, len(ds)), memory_fraction=loader.memory_fraction,
            unknown_cost_cap=1 << 62))
    finally:
        loader.close()
    return {"batch_size": size, "device": str(target), "free": info.free, "total": info.total,
            "memory_source": info.source, "capped": uncapped > size,
            "memory_fraction": loader.memory_fraction}


def _cmd_inspect(args: argparse.Namespace) -> int:
    from gpuloader.dataset import open_dataset

    ds = open_dataset(args.path, fields=_names(args.fields))
    try:
        source = ds.source
        storage = dict(getattr(source, "storage", {}) or {})
        rows = len(ds)
        fields = []
        ragged = _ragged_report(ds, args.max_tokens, args.pad_to_multiple_of)
        for name, spec in ds.fields.items():
            st = storage.get(name)
            per_sample = spec.sample_nbytes
            if name in ragged:  # per token; a sample's bytes vary
                per_sample = int(round(spec.sample_nbytes * ragged[name]["lengths"]["mean"]))
            fields.append({
                "name": name, "dtype": str(spec.dtype), "shape": list(spec.shape),
                "ragged": spec.ragged, "sample_bytes": per_sample,
                "bytes": (spec.sample_nbytes * ragged[name]["lengths"]["tokens"]
                          if name in ragged else per_sample * rows),
                "format": getattr(st, "format", None), "layout": getattr(st, "layout", None),
                "read_path": getattr(st, "read_path", None),
                "chunk_rows": getattr(st, "chunk_rows", None),
                "compression": getattr(st, "compression", None),
            })
        auto = None if ragged else _auto_batch(ds, args.device)
    finally:
        ds.close()
    per_sample = sum(f["sample_bytes"] for f in fields)
    report = {"path": os.path.abspath(args.path), "rows": rows, "sample_bytes": per_sample,
              "bytes": per_sample * rows, "chunk_length": int(getattr(source, "chunk_length", 0)),
              "fields": fields, "auto": auto, "ragged": ragged}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    kind = fields[0]["format"] if fields and fields[0]["format"] else "data"
    print(f"{report['path']} ({kind})")
    print(f"rows: {rows:,}")
    rows_out = [["field", "dtype", "shape", "bytes/sample", "total", "layout", "chunk rows",
                 "compression", "read path"]]
    for f in fields:
        rows_out.append([f["name"], f["dtype"], str(tuple(f["shape"])), f"{f['sample_bytes']:,}",
                      _bytes(f["bytes"]), f["layout"] or "-",
                      f"{f['chunk_rows']:,}" if f["chunk_rows"] else "-",
                      f["compression"] or "none", f["read_path"] or "-"])
    print(table(rows_out))
    print(f"bytes: {_bytes(report['bytes'])} ({per_sample:,} per sample"
          f"{' on average' if ragged else ''})")
    for name, info in ragged.items():
        _print_ragged(name, info, next(f for f in fields if f["name"] == name))
    if auto is None:
        return 0
    note = ""
    if auto["capped"]:
        note = ("; capped by the 1 GiB staging limit that applies while the training step's "
                "memory cost is unknown (set sample_bytes or max_batch_size)")
    elif auto["batch_size"] >= rows > 1:
        note = "; that is every row: memory allows it, set max_batch_size to bound it"
    print(f"batch_size=\"auto\" on {auto['device']}: {auto['batch_size']:,} (free "
          f"{_gib(auto['free'])} of {_gib(auto['total'])} via {auto['memory_source']}, "
          f"memory_fraction {auto['memory_fraction']}{note})")
    return 0


def _is_text_source(args: argparse.Namespace) -> bool:
    """Text -> tokens: a JSON-lines file, --text-key/--glob, or a folder holding no .npy."""
    src = Path(args.src)
    if args.text_key is not None or args.glob is not None:
        return True
    if src.is_file():
        return src.suffix.lower() in (".jsonl", ".json")
    return src.is_dir() and not any(src.glob("*.npy"))


def _ragged_report(ds: Any, max_tokens: Optional[int], multiple: int) -> Dict[str, Any]:
    """Per ragged field: length distribution and, with max_tokens, padding efficiency."""
    from gpuloader.batching import TokenBudget, length_summary, plan_efficiency

    out: Dict[str, Any] = {}
    for name in ds.ragged_fields:
        lengths = ds.lengths(name)
        info: Dict[str, Any] = {"lengths": length_summary(lengths)}
        if max_tokens is not None:
            info["padding"] = plan_efficiency(lengths, TokenBudget(max_tokens, multiple))
        out[name] = info
    return out


def _print_ragged(name: str, info: Dict[str, Any], field: Dict[str, Any]) -> None:
    s = info["lengths"]
    print(f"{name} (ragged) lengths: count {s['count']:,}, mean {s['mean']:,.1f}, "
          f"p50 {s['p50']:,.0f}, p90 {s['p90']:,.0f}, p99 {s['p99']:,.0f}, max {s['max']:,}; "
          f"{s['tokens']:,} tokens")
    if field["layout"] == "vlen":
        print(f"  note: {name} is an HDF5 variable-length dataset; h5py reads it element by "
              f"element, much slower than a values/offsets group (gpuloader convert writes one)")
    pad = info.get("padding")
    if pad:
        print(f"  max_tokens={pad['max_tokens']:,} (pad_to_multiple_of "
              f"{pad['pad_to_multiple_of']}): padding efficiency {pad['shuffle']:.3f} "
              f"shuffled with length buckets ({pad['shuffle_batches']:,} batches, window "
              f"{pad['bucket_window']:,}), {pad['sequential']:.3f} in storage order "
              f"({pad['sequential_batches']:,} batches)")


def _cmd_convert(args: argparse.Namespace) -> int:
    from gpuloader.convert import convert
    from gpuloader.ragged_convert import convert_ragged, output_kind, text_to_tokens
    from gpuloader.sources.discover import has_ragged_layout

    compression = None if args.compression in (None, "none") else args.compression
    if _is_text_source(args):
        done = text_to_tokens(args.src, args.dst, text_key=args.text_key,
                              glob=args.glob or "**/*", overwrite=args.overwrite,
                              max_length=args.max_length)
        print(f"wrote {done['dst']}.bin/.idx: {done['documents']:,} documents, "
              f"{done['tokens']:,} byte-level tokens (uint8)")
        return 0
    if output_kind(args.dst) == "megatron" or has_ragged_layout(args.src):
        done = convert_ragged(args.src, args.dst, fields=_names(args.fields),
                              compression=compression, overwrite=args.overwrite)
        names = ", ".join(f"{k} {v['dtype']}{'[*]' if v['ragged'] else tuple(v['shape'])}"
                          for k, v in done["fields"].items())
        print(f"wrote {done['dst']} ({done['format']}): {done['rows']:,} samples ({names}); "
              f"tokens: {', '.join(f'{k} {v:,}' for k, v in done['tokens'].items())}")
        return 0
    summary = convert(args.src, args.dst, fields=_names(args.fields), chunk_rows=args.chunk_rows,
                      compression=compression, overwrite=args.overwrite,
                      progress=not args.quiet)
    names = ", ".join(f"{k} {v['dtype']}{tuple(v['shape'])}" for k, v in summary["fields"].items())
    extra = ""
    if summary["format"] == "hdf5":
        chunks = ", ".join(f"{k} {tuple(v)}" for k, v in summary["chunks"].items())
        extra = f"; chunks {chunks}; compression {summary['compression'] or 'none'}"
    print(f"wrote {summary['dst']}: {summary['rows']:,} rows, {_bytes(summary['bytes'])} "
          f"({names}){extra}")
    return 0


def _probe_rows(device: Optional[str]) -> List[List[str]]:
    import torch

    from gpuloader.errors import GpuLoaderError
    from gpuloader.probes import CudaProbe, HostProbe, NvmlProbe

    def measure(label: str, kind: str, probe: Any) -> List[str]:
        try:
            info = probe.read()
        except GpuLoaderError as exc:
            return [label, kind, "-", "-", f"unavailable: {str(exc).splitlines()[0]}"]
        return [label, kind, _gib(info.free), _gib(info.total), info.source]

    rows = [["device", "probe", "free", "total", "source"]]
    want_cpu = device in (None, "cpu")
    cuda_indices: List[int] = []
    if device is not None and device != "cpu":
        from gpuloader.devices import resolve_device

        target = resolve_device(device)  # DeviceError: absent device or no CUDA
        if target is not None and target.type == "cuda":
            cuda_indices = [int(target.index or 0)]
        else:
            want_cpu = True
    elif device is None and torch.cuda.is_available():
        cuda_indices = list(range(torch.cuda.device_count()))
    if want_cpu:
        rows.append(measure("cpu", "host", HostProbe()))
    for i in cuda_indices:
        rows.append(measure(f"cuda:{i}", "torch", CudaProbe(i, init_cuda=True)))
        rows.append(measure(f"cuda:{i}", "nvml", NvmlProbe(i)))
    if device is None and not cuda_indices:
        rows.append(["cuda", "torch", "-", "-",
                     f"unavailable: torch.cuda.is_available() is False (torch "
                     f"{torch.__version__}, CUDA build {torch.version.cuda})"])
        rows.append(measure("cuda:0", "nvml", NvmlProbe(0)))
    return rows


def _cmd_probe(args: argparse.Namespace) -> int:
    print(table(_probe_rows(args.device)))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from gpuloader import bench

    return int(bench.main(args) or 0)


# --------------------------------------------------------------------------------------------
# the parser


_TRAIN_EPILOG = """\
config keys (defaults shown; only data.path is required):
  data:   {path: <required>, fields: null, inputs: null, targets: null}  # .npy, folder, .h5,
          # Megatron .bin/.idx; a ragged inputs field without targets: next-token training
  loader: {batch_size: auto, shuffle: true, order: null, memory_fraction: 0.8, device: auto,
           num_workers: 0, sample_bytes: 0, max_batch_size: null, ...,
           token_bytes: 0, max_tokens: null, pad_to_multiple_of: 1}   # last three: ragged
  model:  {name: mlp, hidden: [256, 128], outputs: null}   # mlp, cnn, bytelm, "pkg.module:factory"
  train:  {epochs: 3, lr: 0.001, optimizer: adamw, loss: cross_entropy,
           global_batch_size: null, global_tokens: null, seed: 0, val_fraction: 0.0,
           checkpoint_every: 0, max_steps: null, weight_decay: null}
  output: runs/<config name>     # metrics.jsonl, checkpoint.pt, config.yaml
paths may use ~ and $VAR / ${VAR:-default}; relative paths are from the current directory."""


def _wants_bench(argv: Sequence[str]) -> bool:
    for token in argv:
        if token in ("--", "-h", "--help", "--version"):
            return False
        if not token.startswith("-"):
            return token == "bench"
    return False


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (``PROG: error: ...``) and exit 2,
    like every other error of the command line; ``-h`` still shows the full usage."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} -h`)\n")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser; ``argv`` decides whether bench's options are loaded (lazily)."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks instead of one-line errors")
    parser = OneLineParser(
        prog=PROG, description="Feed PyTorch training from .npy / HDF5 data larger than the GPU.",
        epilog="Start with `gpuloader demo`; `gpuloader COMMAND -h` explains each command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", parents=[debug], help="make synthetic data, train one epoch, "
                       "compare with torch's DataLoader",
                       description="A first run: makes a cached synthetic dataset, trains a small "
                       "MLP with batch_size='auto' on the best device, and compares with "
                       "torch.utils.data.DataLoader.  --text: converts the standard "
                       "library's sources to byte tokens and trains a byte-level language "
                       "model with token budgets planned from free memory.")
    from gpuloader import demo  # light: numpy only at import

    demo.add_arguments(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", parents=[debug], help="train from a YAML/JSON config",
                       description="Train as a YAML (or JSON) config says; see examples/*.yaml.",
                       epilog=_TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config file (.yaml, .yml or .json)")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY.PATH=VALUE",
                   help="override a config value, read as YAML (repeatable), e.g. "
                        "--set loader.batch_size=64")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the output folder from its checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output folder that holds an earlier run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("inspect", parents=[debug], help="describe a dataset",
                       description="Fields, dtypes, shapes, rows, bytes, HDF5 chunking and "
                       "compression, and the batch size 'auto' would pick here; for ragged "
                       "fields the length distribution and the padding efficiency a token "
                       "budget (--max-tokens) reaches.")
    p.add_argument("path", help=".npy file, folder of .npy files, HDF5 file or Megatron "
                                "prefix (.bin/.idx)")
    p.add_argument("--fields", nargs="+", metavar="FIELD", help="only these fields")
    p.add_argument("--device", default="auto",
                   help="device the auto batch size is planned for (default auto)")
    p.add_argument("--max-tokens", type=positive_int, default=None, metavar="N",
                   help="ragged fields: the padding efficiency this token budget reaches")
    p.add_argument("--pad-to-multiple-of", type=positive_int, default=1, metavar="M",
                   help="with --max-tokens: padded lengths round up to a multiple of M")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("convert", parents=[debug], help="folder of .npy <-> HDF5, text -> "
                       "tokens, ragged formats; streaming",
                       description="Copy fields between a folder of .npy files (or one .npy) "
                       "and an HDF5 file (.h5/.hdf5), in blocks of rows.  Text (a folder of "
                       "text files, one document each, or a JSON-lines file, one per line) "
                       "becomes a byte-level Megatron .bin/.idx token dataset.  Datasets with "
                       "ragged fields convert between Megatron (.bin/.idx), folders "
                       "(NAME.values.npy + NAME.offsets.npy) and HDF5 (values/offsets groups).")
    p.add_argument("src", help="source: folder of .npy, .npy file, HDF5 file, Megatron prefix, "
                              "folder of text files or JSON-lines file")
    p.add_argument("dst", help="destination: .h5/.hdf5 for HDF5, .bin/.idx for Megatron, "
                              "otherwise a folder of .npy files")
    p.add_argument("--text-key", default=None, metavar="KEY",
                   help="JSON-lines input: the key holding each document's text (default text)")
    p.add_argument("--glob", default=None, metavar="PATTERN",
                   help="folder of text files: which files are documents (default **/*)")
    p.add_argument("--max-length", type=positive_int, default=None, metavar="N",
                   help="text input: split documents longer than N bytes into consecutive "
                        "samples of at most N tokens")
    p.add_argument("--chunk-rows", type=positive_int, default=None, metavar="N",
                   help="rows per HDF5 chunk (default: about 1 MiB of rows)")
    p.add_argument("--compression", choices=("gzip", "lzf", "none"), default="none",
                   help="HDF5 compression (default none)")
    p.add_argument("--fields", nargs="+", metavar="FIELD", help="only these fields")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("probe", parents=[debug], help="free and total memory per device",
                       description="Free and total memory of the host and each CUDA device, "
                       "as torch, NVML and psutil report it, and where each figure came from.")
    p.add_argument("--device", default=None, help="only this device (cpu, cuda, cuda:N)")
    p.set_defaults(func=_cmd_probe)

    if _wants_bench(argv):
        p = sub.add_parser("bench", parents=[debug], help="compare loaders' throughput")
        from gpuloader import bench

        bench.add_arguments(p)
    else:
        p = sub.add_parser("bench", parents=[debug], help="compare loaders' throughput",
                           description="run `gpuloader bench -h` for its options")
    p.set_defaults(func=_cmd_bench)
    return parser


def _report(exc: BaseException) -> None:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and not str(exc).strip("'\""):
        text = type(exc).__name__
    for line in text.splitlines() or [text]:
        if line.strip():
            print(f"{PROG}: error: {line.strip()}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, and argparse's own one-line errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except ImportError as exc:  # e.g. bench's optional dependencies
        if "--debug" in argv:
            raise
        _report(exc)
        return 2
    from gpuloader.errors import GpuLoaderError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        code = getattr(exc, "exit_code", None)  # train's TrainingInterrupted: checkpoint saved
        if code is not None:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return int(code)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (GpuLoaderError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, ValueError) as exc:
        if getattr(args, "debug", False):
            raise
        _report(exc)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
