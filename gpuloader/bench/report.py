"""Reports: ``results.json``, ``results.md`` (a markdown table) and ``throughput.png``."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from gpuloader.errors import ArgumentError

_PLOT_HINT = "pip install gpuloader[plot]"
_COLORS = {"gpuloader": "#2a9d8f", "torch": "#e76f51", "torch-batched": "#f4a261",
           "raw": "#8d99ae", "raw-seq": "#8d99ae", "h2d": "#264653"}


def write_report(records: Sequence[Mapping[str, Any]],
                 out_dir: Union[str, os.PathLike]) -> Dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``throughput.png`` under ``out_dir``.

    ``results.json`` is the list of records as given.  The plot needs matplotlib; without it a
    message says how to install it and the other two files are still written.  Returns the
    paths written, by kind ("json", "md", "png").
    """
    if not records:
        raise ArgumentError("records must hold at least one record, got an empty list")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: Dict[str, Path] = {}
    json_path = out / "results.json"
    json_path.write_text(json.dumps(list(records), indent=2, default=str) + "\n",
                         encoding="utf-8")
    written["json"] = json_path
    md_path = out / "results.md"
    md_path.write_text(_report_text(records), encoding="utf-8")
    written["md"] = md_path
    png = _plot(records, out / "throughput.png")
    if png is not None:
        written["png"] = png
    return written


def markdown(records: Sequence[Mapping[str, Any]]) -> str:
    """The records as a markdown table, fastest first."""
    rows = sorted(records, key=lambda r: r["samples_per_s"], reverse=True)
    lines = [
        "| case | order | batch | workers | samples/s | GB/s | stall | vs torch | vs ceiling |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = " (truncated)" if r.get("truncated") else ""
        lines.append(
            f"| {r['case']}{mark} | {r['order']} | {r['batch_size']} | {r['num_workers']} "
            f"| {r['samples_per_s']:,.0f} | {r['gb_per_s']:.2f} | {r['stall_fraction']:.2f} "
            f"| {_ratio(r.get('ratio_to_torch'))} | {_ratio(r.get('ratio_to_ceiling'))} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _report_text(records: Sequence[Mapping[str, Any]]) -> str:
    first = records[0]
    d, m = first.get("dataset") or {}, first.get("machine") or {}
    torch_case = next((r["torch_case"] for r in records if r.get("torch_case")), None)
    ceiling = sorted({r["ceiling_case"] for r in records if r.get("ceiling_case")})
    gpu = f", GPU {m.get('gpu')}" if m.get("gpu") else ""
    total_mb = (d.get("total_bytes") or 0) / 1e6
    load = m.get("load_avg_1m")
    parts = [
        "# gpuloader bench\n",
        f"Dataset: {d.get('type', '?')} of {_fmt(d.get('samples'), ',')} samples x "
        f"{_fmt(d.get('sample_bytes'), ',')} B ({total_mb:,.0f} MB), storage "
        f"{d.get('storage', 'n/a')}; device {first.get('device')}, compute "
        f"{first.get('compute_ms')} ms/batch; {_fmt(first.get('samples'), ',')} samples per "
        f"case, median of {first.get('repeats')} repeat(s).\n",
        f"Machine: {m.get('cpu_count', '?')} CPUs ({m.get('cpu_model', '?')}), "
        f"{m.get('ram_gb', '?')} GB RAM{gpu}; torch {m.get('torch', '?')}, numpy "
        f"{m.get('numpy', '?')}, h5py {m.get('h5py', '?')}; 1-min load average "
        f"{_fmt(load, '.2f')}.\n",
        markdown(records),
        f"\n'vs torch': samples/s over the fastest torch per-sample case ({torch_case}). "
        f"'vs ceiling': over the raw case of the same order ({', '.join(ceiling) or 'n/a'}); "
        "raw reads are single-threaded, so a multi-threaded loader can exceed 1x. "
        "'stall': share of the window the consumer waited for data.\n",
    ]
    return "\n".join(parts)


def _plot(records: Sequence[Mapping[str, Any]], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {path.name} ({_PLOT_HINT})",
              file=sys.stderr)
        return None
    rows = sorted(records, key=lambda r: r["samples_per_s"])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4))
    values = [r["samples_per_s"] for r in rows]
    bars = ax.barh([r["case"] for r in rows], values,
                   color=[_COLORS.get(r["loader"], "#999999") for r in rows])
    for bar, r in zip(bars, rows):
        ratio = r.get("ratio_to_torch")
        note = f" {r['gb_per_s']:.2f} GB/s" + (f", {ratio:.1f}x torch" if ratio else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, note, va="center",
                fontsize=8)
    ax.set_xlabel("samples / s (median)")
    ax.set_xlim(0, max(values) * 1.35 if values and max(values) > 0 else 1)
    first = rows[0]
    ax.set_title(f"batch {first['batch_size']}, device {first['device']}, "
                 f"compute {first['compute_ms']} ms", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
