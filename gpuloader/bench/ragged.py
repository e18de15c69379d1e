"""Variable-length benchmark: padding efficiency, tokens/s against torch, time to resume.

Two corpora, each a byte-level / token Megatron pair written to a temporary folder:

- ``lognormal``: lengths drawn log-normal (heavy-tailed, like real text), uint16 tokens;
- ``stdlib``: the Python standard library's own ``.py`` files (no site-packages), one document
  per file, byte-level (``gpuloader convert`` does the same from the command line).  Its
  budget is separate (``stdlib_max_tokens``): source files are long (median ~6.5 kB), so a
  budget of a few typical files is 64 Ki tokens.

Per corpus, in one run:

- padding efficiency (real tokens / padded tokens) of one epoch of gpuloader's length buckets
  (``shuffle=True, max_tokens``), of fixed-size random batches (``batch_size`` samples in the
  shuffled order), and of a global sort by length cut by the same budget (the bound a bucketing
  scheme can reach, with no randomness left);
- batch-order randomness: the correlation of each batch's mean length with its position in the
  epoch (|r| near 0 means the batch order is random);
- tokens/s (real tokens delivered over the wall time of a whole warm epoch) of gpuloader and of
  torch's DataLoader over a per-sample Dataset (``__getitem__`` returns one sample's tensor) with
  a pad-collate (``pad_sequence``), at each ``num_workers``; medians of ``repeats`` runs, the
  cases interleaved, with the ratio to torch at num_workers=0;
- time to resume mid-epoch: a new loader, ``load_state_dict`` of a state saved half-way, and the
  first batch (median of ``repeats``).
"""
from __future__ import annotations

import statistics
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.utils.data as tud
from torch.nn.utils.rnn import pad_sequence

from gpuloader.batching import TokenBudget, boundaries, padding_efficiency
from gpuloader.order import epoch_order
from gpuloader.ragged_convert import write_tokens
from gpuloader.sources.binidx import write_index


def lognormal_corpus(prefix: Path, *, n: int, mean_log: float = 5.5, sigma: float = 1.0,
                     max_len: int = 8192, seed: int = 0) -> Path:
    """A Megatron pair of ``n`` samples with log-normal lengths (uint16 tokens)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean_log, sigma, n), 1, max_len).astype(np.int64)
    rng.integers(1, 50000, int(lengths.sum()), dtype=np.uint16).tofile(f"{prefix}.bin")
    write_index(f"{prefix}.idx", lengths, np.dtype(np.uint16))
    return prefix


def stdlib_files() -> List[Path]:
    """The standard library's ``.py`` files, sorted, without site-/dist-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.parts and "dist-packages" not in p.parts
                  and p.is_file())


def stdlib_corpus(prefix: Path, *, limit: Optional[int] = None) -> Path:
    """A byte-level Megatron pair of the stdlib's ``.py`` files (at most ``limit``)."""
    files = stdlib_files()[:limit]
    write_tokens((f.read_bytes() for f in files), prefix, overwrite=True)
    return prefix


class PerSampleTokens(tud.Dataset):
    """torch baseline: one sample's tokens per ``__getitem__``, from the same memory map."""

    def __init__(self, prefix: Path) -> None:
        from gpuloader.sources.binidx import pair_paths, read_index

        bin_path, idx_path = pair_paths(prefix)
        dtype, self.sizes, pointers = read_index(idx_path)
        self.starts = pointers // dtype.itemsize
        self.values = np.memmap(bin_path, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> torch.Tensor:
        a = int(self.starts[i])
        return torch.from_numpy(np.array(self.values[a:a + int(self.sizes[i])]))


def pad_collate(samples: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Pad to the longest sample; lengths alongside (what gpuloader delivers too)."""
    lengths = torch.tensor([len(s) for s in samples], dtype=torch.int64)
    return {"tokens": pad_sequence(samples, batch_first=True), "tokens_lengths": lengths}


def _epoch(make: Callable[[], Iterator[Dict[str, torch.Tensor]]]) -> Dict[str, float]:
    """Real and padded tokens, batches and seconds of one pass over ``make()``."""
    started = time.perf_counter()
    real = padded = batches = 0
    for batch in make():
        real += int(batch["tokens_lengths"].sum())
        padded += batch["tokens"].numel()
        batches += 1
    return {"seconds": time.perf_counter() - started, "real": real, "padded": padded,
            "batches": batches}


def _batch_order_r(loader: Any) -> float:
    means = [float(b["tokens_lengths"].double().mean()) for b in loader]
    if len(means) < 3:
        return 0.0
    return float(np.corrcoef(np.arange(len(means)), np.asarray(means))[0, 1])


def _resume_seconds(ds: Any, kwargs: Dict[str, Any], repeats: int) -> float:
    import gpuloader as gl

    loader = gl.DataLoader(ds, **kwargs)
    it = iter(loader)
    for _ in range(max(1, len(loader) // 2)):
        next(it)
    state = loader.state_dict()
    del it
    loader.close()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        again = gl.DataLoader(ds, **kwargs)
        again.load_state_dict(state)
        next(iter(again))
        times.append(time.perf_counter() - started)
        again.close()
    return statistics.median(times)


def run_corpus(prefix: Path, *, max_tokens: int, batch_size: int, num_workers: Sequence[int],
               repeats: int, seed: int) -> Dict[str, Any]:
    """Every figure of the module docstring for the corpus at ``prefix``."""
    import gpuloader as gl

    ds = gl.open_dataset(prefix)
    lengths = ds.lengths()
    n = len(ds)
    budget = TokenBudget(max_tokens)
    order = epoch_order("shuffle", n, seed=seed, epoch=0)
    fixed_ends = np.minimum(np.arange(batch_size, n + batch_size, batch_size), n)
    by_length = np.sort(lengths)
    kwargs = dict(max_tokens=max_tokens, shuffle=True, seed=seed)
    loader = gl.DataLoader(ds, **kwargs)
    gl_epoch = _epoch(lambda: iter(loader))  # warms the page cache and the loader
    r = _batch_order_r(loader)
    times: Dict[str, List[float]] = {"gpuloader": []}
    torch_loaders = {}
    for w in num_workers:
        times[f"torch w={w}"] = []
        torch_loaders[f"torch w={w}"] = tud.DataLoader(
            PerSampleTokens(prefix), batch_size=batch_size, shuffle=True,
            num_workers=w, collate_fn=pad_collate, persistent_workers=w > 0)
    real = {}
    for _ in range(repeats):  # interleaved, so load drifts hit every case alike
        out = _epoch(lambda: iter(loader))
        times["gpuloader"].append(out["seconds"])
        real["gpuloader"] = out["real"]
        for name, tl in torch_loaders.items():
            out = _epoch(lambda: iter(tl))
            times[name].append(out["seconds"])
            real[name] = out["real"]
    loader.close()
    tokens_per_s = {k: real[k] / statistics.median(v) for k, v in times.items()}
    base = tokens_per_s.get("torch w=0")
    return {
        "samples": n, "tokens": int(lengths.sum()),
        "lengths": {"mean": float(lengths.mean()), "p50": float(np.median(lengths)),
                    "p99": float(np.percentile(lengths, 99)), "max": int(lengths.max())},
        "max_tokens": max_tokens, "fixed_batch_size": batch_size,
        "padding_efficiency": {
            "gpuloader_buckets": gl_epoch["real"] / max(1, gl_epoch["padded"]),
            "fixed_random": padding_efficiency(lengths[order], fixed_ends),
            "global_sort": padding_efficiency(by_length, boundaries(by_length, budget)),
        },
        "batches_per_epoch": gl_epoch["batches"],
        "batch_mean_length_vs_position_r": r,
        "tokens_per_s": tokens_per_s,
        "ratio_vs_torch_w0": {k: v / base for k, v in tokens_per_s.items()} if base else {},
        "epoch_seconds": {k: statistics.median(v) for k, v in times.items()},
        "resume_seconds": _resume_seconds(ds, kwargs, repeats),
    }


def run(*, samples: int = 50000, max_tokens: int = 16384, stdlib_max_tokens: int = 65536,
        batch_size: int = 32,
        num_workers: Sequence[int] = (0, 2), repeats: int = 3, seed: int = 0,
        stdlib_limit: Optional[int] = None, root: Optional[Path] = None) -> Dict[str, Any]:
    """Both corpora (see the module docstring); returns the JSON-ready results."""
    from gpuloader.bench.machine import machine_info

    with tempfile.TemporaryDirectory(prefix="gpuloader-ragged-", dir=root) as tmp:
        corpora = {
            "lognormal": lognormal_corpus(Path(tmp) / "lognormal", n=samples, seed=seed),
            "stdlib": stdlib_corpus(Path(tmp) / "stdlib", limit=stdlib_limit),
        }
        budgets = {"lognormal": max_tokens, "stdlib": stdlib_max_tokens}
        results = {name: run_corpus(prefix, max_tokens=budgets[name], batch_size=batch_size,
                                    num_workers=num_workers, repeats=repeats, seed=seed)
                   for name, prefix in corpora.items()}
    return {"machine": machine_info(), "repeats": repeats, "corpora": results}


def table(results: Dict[str, Any]) -> str:
    """A markdown table of :func:`run`'s results."""
    lines = ["| corpus | eff. buckets | eff. fixed | eff. sort | r(len, pos) | "
             "case | tokens/s | x torch w=0 | resume s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, res in results["corpora"].items():
        eff = res["padding_efficiency"]
        for k, (case, tps) in enumerate(res["tokens_per_s"].items()):
            head = (f"| {name} | {eff['gpuloader_buckets']:.3f} | {eff['fixed_random']:.3f} | "
                    f"{eff['global_sort']:.3f} | {res['batch_mean_length_vs_position_r']:+.3f} "
                    if k == 0 else "| | | | | ")
            ratio = res["ratio_vs_torch_w0"].get(case, float("nan"))
            resume = f"{res['resume_seconds']:.3f}" if k == 0 else ""
            lines.append(f"{head}| {case} | {tps:,.0f} | {ratio:.1f} | {resume} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: Any) -> None:
    """The ragged benchmark's options (also under ``gpuloader bench --ragged``)."""
    parser.add_argument("--corpus-samples", type=int, default=50000,
                        help="log-normal corpus size (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=16384,
                        help="gpuloader's token budget, log-normal corpus (default: "
                        "%(default)s)")
    parser.add_argument("--stdlib-max-tokens", type=int, default=65536,
                        help="token budget for the stdlib corpus, whose median file is ~6.5 kB "
                        "(default: %(default)s)")
    parser.add_argument("--fixed-batch", type=int, default=32,
                        help="samples per torch / fixed-size batch (default: %(default)s)")
    parser.add_argument("--stdlib-limit", type=int, default=None,
                        help="use at most this many stdlib files (default: all)")
    parser.add_argument("--torch-workers", type=lambda s: [int(v) for v in s.split(",") if v],
                        default=[0, 2], help="torch num_workers values (default: 0,2)")


def main(argv: Optional[Sequence[str]] = None, args: Any = None) -> int:
    """Run :func:`run`, print :func:`table`, write ``<out>/ragged.json``."""
    import argparse
    import json

    if args is None:
        parser = argparse.ArgumentParser(prog="benchmarks/ragged.py",
                                         description=(__doc__ or "").split("\n")[0])
        add_arguments(parser)
        parser.add_argument("--repeats", type=int, default=3)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--out", default="bench_out")
        args = parser.parse_args(argv)
    results = run(samples=args.corpus_samples, max_tokens=args.max_tokens,
                  stdlib_max_tokens=args.stdlib_max_tokens,
                  batch_size=args.fixed_batch, num_workers=args.torch_workers,
                  repeats=args.repeats, seed=args.seed, stdlib_limit=args.stdlib_limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ragged.json").write_text(json.dumps(results, indent=2))
    print(table(results), end="")
    print(f"wrote {out / 'ragged.json'}")
    return 0
