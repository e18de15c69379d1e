"""The files of a training run's output folder: atomic checkpoints, the metrics.jsonl log
(one JSON line per finished epoch) and the split a checkpoint recorded (NOTE(train-resume) and
NOTE(train-split) in train.py say what they hold and when they are written)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def append_metrics(path: Path, records: List[Dict[str, Any]]) -> None:
    if not records:
        return
    with open(path, "a", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def recorded_split(ckpt: Path) -> Optional[Dict[str, int]]:
    """The train/validation split a checkpoint recorded (NOTE(train-split)); None for a
    checkpoint of a run without validation or one written before splits were recorded."""
    with contextlib.suppress(Exception):  # unreadable: restore() reports it properly
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        split = state.get("split") if isinstance(state, dict) else None
        if isinstance(split, dict):
            return {k: int(split[k]) for k in ("rows", "val_rows", "seed")}
    return None
