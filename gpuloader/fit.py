"""Does this model fit this data?  Checks ``gpuloader train`` runs before its first step, and the
seeded train/validation split.

NOTE(train-fit): every mismatch between the config's model, loss and data becomes one
ConfigError line naming the config key, the field, and its shape/dtype — before any training:

- ``data.inputs`` naming one integer per sample (labels, not features);
- ``train.loss: mse`` against one integer per sample (class labels);
- cross-entropy labels that are negative or not fewer than ``model.outputs``;
- a model that cannot take one real batch of the inputs (a dry forward pass of two samples), or
  whose output the loss cannot take with the real targets.

NOTE(train-split): ``train.val_fraction`` takes a seeded random sample of rows for validation
(``numpy.random.default_rng(seed).permutation``), not the last rows: class-sorted files would
otherwise validate on one class.  The split is a pure function of (rows, validation rows, seed);
the checkpoint records those three numbers, so ``--resume`` rebuilds the same split even when the
config's seed changed.  Both index lists are sorted (storage order), so reads stay coalesced.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from gpuloader.errors import ConfigError

__all__ = ["Split", "split_rows", "label_range", "check_fields", "check_labels", "dry_run"]

_LABEL_BLOCK_ROWS = 1 << 20


class Split:
    """Train and validation row indices (sorted int64 arrays) of a seeded random split."""

    def __init__(self, rows: int, val_rows: int, seed: int) -> None:
        self.rows, self.val_rows, self.seed = int(rows), int(val_rows), int(seed)
        if self.val_rows == 0:
            self.train = np.arange(self.rows, dtype=np.int64)
            self.val = np.empty(0, dtype=np.int64)
            return
        perm = np.random.default_rng(self.seed).permutation(self.rows)
        self.val = np.sort(perm[:self.val_rows]).astype(np.int64)
        self.train = np.sort(perm[self.val_rows:]).astype(np.int64)

    def state(self) -> Dict[str, int]:
        """What the checkpoint records (NOTE(train-split))."""
        return {"rows": self.rows, "val_rows": self.val_rows, "seed": self.seed}


def split_rows(rows: int, val_fraction: float, seed: int) -> Split:
    """The split ``train.val_fraction`` asks for; ConfigError when a side would be empty."""
    val_rows = int(math.floor(rows * val_fraction))
    train_rows = rows - val_rows
    if train_rows < 1 or (val_fraction > 0 and val_rows < 1):
        raise ConfigError(f"train.val_fraction: {val_fraction} of {rows} rows leaves "
                          f"{train_rows} to train and {val_rows} to validate; both need at "
                          "least one")
    return Split(rows, val_rows, seed)


def label_range(ds: Any, name: str) -> Tuple[int, int]:
    """(smallest, largest) value of field ``name``, read in blocks of rows (bounded memory).
    (0, -1) for an empty dataset."""
    spec = ds.fields[name]
    low, high = 0, -1
    n = len(ds)
    for start in range(0, n, _LABEL_BLOCK_ROWS):
        idx = np.arange(start, min(n, start + _LABEL_BLOCK_ROWS), dtype=np.int64)
        buf = np.empty((len(idx),) + tuple(spec.shape), dtype=spec.dtype)
        ds.source.read_into(idx, {name: buf})
        lo, hi = int(np.min(buf)), int(np.max(buf))
        low, high = (lo, hi) if start == 0 else (min(low, lo), max(high, hi))
    return low, high


def _describe(name: str, spec: Any) -> str:
    return f"{name!r} ({spec.dtype}, per-sample shape {tuple(spec.shape)})"


def _integral(spec: Any) -> bool:
    return np.issubdtype(np.dtype(spec.dtype), np.integer) or np.dtype(spec.dtype) == np.bool_


def check_fields(cfg: Any, fields: Any) -> None:
    """The checks that need only the field specs (NOTE(train-fit))."""
    inputs, targets = cfg.data.inputs, cfg.data.targets
    x, y = fields[inputs], fields[targets]
    if _integral(x) and len(x.shape) == 0:
        raise ConfigError(f"data.inputs: field {_describe(inputs, x)} holds one integer per "
                          f"sample, which looks like labels, not model inputs; set data.inputs "
                          f"to the feature field (fields: {', '.join(fields)})")
    loss = cfg.train.loss
    if loss == "mse" and _integral(y) and len(y.shape) == 0:
        raise ConfigError(f"train.loss: mse regresses float targets, but data.targets "
                          f"{_describe(targets, y)} holds integers (class labels?); use "
                          "loss: cross_entropy for classes, or store float targets")


def check_labels(cfg: Any, outputs: int, low: int, high: int) -> None:
    """Cross-entropy labels in ``[low, high]`` must be class indices below ``outputs``."""
    targets = cfg.data.targets
    if low < 0:
        raise ConfigError(f"data.targets: field {targets!r} holds the label {low}; "
                          "cross_entropy needs class indices 0..classes-1")
    if high >= outputs:
        raise ConfigError(f"model.outputs: {outputs} is fewer than the classes in data.targets "
                          f"{targets!r} (labels 0..{high}, so {high + 1} classes); set "
                          f"model.outputs: {high + 1}, or leave it out to infer it")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def dry_run(cfg: Any, ds: Any, model: torch.nn.Module, loss_fn: Any, device: torch.device,
            *, prepare_inputs: Any, prepare_targets: Any, outputs: Optional[int]) -> None:
    """One forward pass and loss on two real samples (no gradients, model in eval mode, then
    back to train mode); ConfigError naming the config key and the data when either fails."""
    inputs, targets = cfg.data.inputs, cfg.data.targets
    rows = min(2, len(ds))
    batch = ds.read_batch(np.arange(rows, dtype=np.int64))
    x = prepare_inputs(batch[inputs].to(device))
    y = batch[targets].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                out = model(x)
            except Exception as exc:  # any failure of the user's model is a config mismatch
                raise ConfigError(
                    f"model.name: {cfg.model.name} cannot take data.inputs "
                    f"{_describe(inputs, ds.fields[inputs])} (a batch of shape "
                    f"{tuple(x.shape)}): {_first_line(exc)}") from None
            if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != rows:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ConfigError(f"model.name: {cfg.model.name} returned {shape} for a batch "
                                  f"of {rows}; expected a tensor of shape ({rows}, outputs)")
            if outputs is not None and cfg.train.loss == "cross_entropy" and \
                    (out.dim() != 2 or out.shape[1] != outputs):
                raise ConfigError(f"model.name: {cfg.model.name} returned shape "
                                  f"{tuple(out.shape)} for a batch of {rows}; cross_entropy "
                                  f"with model.outputs {outputs} needs ({rows}, {outputs})")
            try:
                loss_fn(out, prepare_targets(cfg.train.loss, y, out))
            except Exception as exc:  # shape or dtype mismatch between output and targets
                raise ConfigError(
                    f"train.loss: {cfg.train.loss} cannot compare the model's output "
                    f"{tuple(out.shape)} with data.targets {_describe(targets, ds.fields[targets])}"
                    f": {_first_line(exc)}") from None
    finally:
        model.train(was_training)
