"""``gpuloader demo --text``: the sequence-model path on built-in defaults, start to end.

It converts the Python standard library's ``*.py`` sources into byte tokens cut at 512 bytes
(once; cached like the other demo data, NOTE(demo-cache) in demo.py, under
``<cache>/text-<source hash>-L512/``), then trains the built-in ``bytelm`` through
``gpuloader.train`` -- the same run ``gpuloader train examples/text.yaml`` makes, fewer steps --
with ``batch_size="auto"``: ``max_tokens`` planned from free memory and ``token_bytes``, steps
of ``global_tokens`` tokens, every step under ``oom_guard``.  It prints the loss per byte
against the corpus' unigram entropy, tokens/s, the live ``max_tokens`` and the OOM count.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

__all__ = ["TEXT_CONFIG", "text_corpus", "main"]

#: Bytes per sample: longer source files become consecutive samples of at most this many.
MAX_LENGTH = 512

#: The demo's run (``data.path`` and ``output`` are filled in): examples/text.yaml with steps
#: of half the tokens and fewer of them, to finish in about a minute on two CPU cores.
TEXT_CONFIG: Dict[str, Any] = {
    "loader": {"batch_size": "auto", "token_bytes": 32768},
    "model": {"name": "bytelm", "d_model": 64, "layers": 2, "heads": 4},
    "train": {"epochs": 1, "global_tokens": 2048, "lr": 0.005, "optimizer": "adamw",
              "val_fraction": 0.01, "seed": 0},
}


def text_corpus(source: Optional[str] = None, *, cache_dir: Optional[str] = None,
                rebuild: bool = False, log: Callable[[str], None] = lambda _m: None) -> Path:
    """The Megatron prefix of ``source``'s ``*.py`` files as byte tokens (default: the standard
    library's sources), built when missing or unreadable; reused otherwise."""
    from gpuloader.demo import cache_root
    from gpuloader.errors import ArgumentError
    from gpuloader.ragged_convert import text_to_tokens
    from gpuloader.sources.binidx import is_binidx, read_index

    folder = Path(source or sysconfig.get_paths()["stdlib"]).resolve()
    if not folder.is_dir() or not any(folder.glob("*.py")):
        raise ArgumentError(f"--text-source {folder}: expected a folder holding *.py files")
    key = hashlib.sha1(str(folder).encode()).hexdigest()[:10]
    root = cache_root(cache_dir) / f"text-{key}-L{MAX_LENGTH}"
    prefix = root / "tokens"
    if not rebuild and is_binidx(prefix):
        try:
            read_index(Path(str(prefix) + ".idx"))
            return prefix
        except Exception:  # a truncated or foreign index: rebuild it
            log(f"rebuilding {root} (unreadable index)")
    log(f"converting {folder}/*.py to byte tokens in {root}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=str(root.parent)))
    try:
        text_to_tokens(folder, tmp / "tokens.bin", glob="*.py", max_length=MAX_LENGTH)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return prefix


def _samples(prefix: Path) -> int:
    from gpuloader.dataset import open_dataset

    ds = open_dataset(prefix)
    try:
        return max(3, len(ds))  # a small corpus validates on two samples at least
    finally:
        ds.close()


def main(args: argparse.Namespace) -> int:
    """Run the text demo; returns the exit status."""
    from gpuloader import train
    from gpuloader.config import from_dict

    started = time.perf_counter()
    say = print
    prefix = text_corpus(args.text_source, cache_dir=args.cache_dir, rebuild=args.rebuild,
                         log=say)
    with tempfile.TemporaryDirectory(prefix="gpuloader-text-demo-") as out:
        raw = {section: dict(values) for section, values in TEXT_CONFIG.items()}
        raw["data"] = {"path": str(prefix)}
        raw["loader"]["device"] = args.device
        raw["train"]["max_steps"] = args.text_steps
        raw["train"]["val_fraction"] = max(raw["train"]["val_fraction"], 2 / _samples(prefix))
        raw["output"] = out
        cfg = from_dict(raw)
        say(f"gpuloader demo --text: bytelm (d_model 64, 2 layers) on {prefix} (byte tokens, "
            f"samples of at most {MAX_LENGTH}), batch_size auto with token_bytes "
            f"{cfg.loader.token_bytes}, {cfg.train.global_tokens} tokens per step, "
            f"{args.text_steps} steps")
        records = train.run(cfg, progress=not args.quiet)
    if not records:
        say("no step ran (an empty corpus?)")
        return 1
    r = records[-1]
    say("")
    say(f"loss per byte, last {r['recent_steps']} steps: {r['recent_loss']:.3f} nats "
        f"(validation {r.get('val_loss', float('nan')):.3f}); unigram entropy of the corpus: "
        f"{r['unigram_entropy']:.3f} nats/byte -- below it, the model uses context")
    say(f"{r['tokens']:,} tokens in {r['step']} steps, {r['tokens_per_s']:,.0f} tokens/s on "
        f"{r['device']}; max_tokens {r['max_tokens']} (planned from free memory, at most "
        f"{cfg.train.global_tokens}); {r['oom_count']} OOMs")
    say(f"total {time.perf_counter() - started:.0f} s. Next: gpuloader train examples/text.yaml "
        "(README: Training sequence models with automatic token budgets)")
    return 0
