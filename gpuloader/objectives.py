"""What one training step optimizes: the optimizers and losses a config names, and the
objective of one micro-batch for fixed-size rows (``RowObjective``) and for next-token
prediction on a ragged token field (``NextTokenObjective``).  ``gpuloader.train`` runs either
through the same loop (guards, accumulation, checkpoints, resume).

An objective's ``micro(batch, weight)`` runs forward and backward on one micro-batch and returns
a ``Part``: the loss summed over what it counts (samples, or predicted tokens), that count, and
the samples and real tokens it held.  ``finish(count)`` completes the step's gradient once all
its micro-batches ran; ``evaluate(batch)`` is ``micro`` without gradients (validation).

NOTE(token-mean): next-token training minimises the mean loss per predicted token of each
optimizer step, exactly, however the step is cut into micro-batches: each micro-batch
back-propagates its *summed* loss, and ``finish`` divides the step's gradient by the number of
predictions it held.  (A sample of ``n`` tokens makes ``n - 1`` predictions, so weights by real
tokens -- what ``accumulate(global_tokens=...)`` gives -- would be off by the first token of each
sample; dividing once by the exact count is the same thing without that error.)  Padding makes
no prediction and adds nothing (NOTE(causal-padding) in bytelm.py).  An out-of-memory rollback
zeroes the gradient and the step's counts start again with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from gpuloader.bytelm import next_token_loss
from gpuloader.errors import ConfigError

__all__ = ["make_optimizer", "make_loss", "class_labels", "prepare_targets", "prepare_inputs",
           "infer_outputs", "Part", "RowObjective", "NextTokenObjective"]


def make_optimizer(name: str, params: Any, lr: float,
                   weight_decay: Optional[float] = None) -> torch.optim.Optimizer:
    """``adamw``, ``adam`` or ``sgd`` (momentum 0.9) over ``params``."""
    extra = {} if weight_decay is None else {"weight_decay": weight_decay}
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, **extra)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **extra)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, **extra)
    raise ConfigError(f"train.optimizer: unknown optimizer {name!r}; valid optimizers: "
                      "adamw, adam, sgd")


def make_loss(name: str) -> nn.Module:
    """``cross_entropy``, ``mse`` or ``bce_with_logits`` (mean over the batch)."""
    losses = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss,
              "bce_with_logits": nn.BCEWithLogitsLoss}
    if name not in losses:
        raise ConfigError(f"train.loss: unknown loss {name!r}; valid losses: "
                          f"{', '.join(losses)}")
    return losses[name]()


def class_labels(loss: str, spec: Any) -> bool:
    """True when ``cross_entropy`` targets of this FieldSpec are class indices (integers, or
    floats holding integers, one per sample) rather than per-class probabilities."""
    return loss == "cross_entropy" and (len(spec.shape) == 0 or tuple(spec.shape) == (1,))


def prepare_targets(loss: str, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Targets in the dtype and shape ``loss`` needs for outputs ``out``: int64 class indices
    of shape ``(B,)`` for cross_entropy labels; float32 shaped like ``out`` otherwise."""
    if loss == "cross_entropy" and (y.dim() == 1 or (y.dim() == 2 and y.shape[1] == 1)):
        return y.reshape(-1).long()
    y = y.float()
    if y.shape != out.shape and y.numel() == out.numel():
        y = y.reshape(out.shape)
    return y


def prepare_inputs(x: torch.Tensor) -> torch.Tensor:
    """Inputs as float32 (the built-in row models' parameter dtype)."""
    return x if x.dtype == torch.float32 else x.float()


def infer_outputs(cfg: Any, spec: Any, labels: Optional[Tuple[int, int]]) -> int:
    """``model.outputs`` when the config leaves it out: classes (largest label + 1) for
    cross_entropy labels, else the number of target values per sample."""
    if labels is None:
        return int(math.prod(spec.shape)) if spec.shape else 1
    if labels[1] < 0:
        raise ConfigError(f"model.outputs: cannot infer the number of classes: field "
                          f"{cfg.data.targets!r} holds no non-negative labels; set model.outputs")
    return labels[1] + 1


@dataclass(frozen=True)
class Part:
    """What one micro-batch contributed: ``loss_sum`` (a float64 0-d tensor on the device,
    detached) over ``count`` units (samples or predicted tokens), ``samples`` and real
    ``tokens`` (0 for fixed-size rows)."""

    loss_sum: torch.Tensor
    count: int
    samples: int
    tokens: int = 0


class RowObjective:
    """Fixed-size rows: ``loss(model(x), y)`` averaged over samples; under ``accumulate`` each
    micro-batch's mean is weighted by its share of the step's samples."""

    unit = "sample"

    def __init__(self, model: nn.Module, loss: str, inputs: str, targets: str, *,
                 labels: bool) -> None:
        self.model, self.loss_name, self.inputs, self.targets = model, loss, inputs, targets
        self.loss_fn = make_loss(loss)
        self.labels = labels  # cross_entropy on class indices: accuracy is counted too

    def _loss(self, batch: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        x = prepare_inputs(batch[self.inputs])
        out = self.model(x)
        target = prepare_targets(self.loss_name, batch[self.targets], out)
        return self.loss_fn(out, target), out, target, int(x.shape[0])

    def micro(self, batch: Any, weight: Optional[float]) -> Part:
        """Forward and backward of one micro-batch (``weight``: None outside accumulate).

        The activations (``out``, the graph behind the loss) are locals of this frame, which an
        out-of-memory error leaves: ``oom_guard`` can free them before it re-plans."""
        loss, _, _, b = self._loss(batch)
        (loss * weight if weight is not None else loss).backward()
        return Part(loss.detach().double() * b, b, b)

    def finish(self, count: int) -> None:
        """The weights already averaged the step's gradient."""

    def evaluate(self, batch: Any) -> Tuple[Part, Optional[torch.Tensor]]:
        """The loss sum (and correct predictions, for class labels) of one batch."""
        loss, out, target, b = self._loss(batch)
        correct = (out.argmax(dim=1) == target).sum() if self.labels else None
        return Part(loss.double() * b, b, b), correct


class NextTokenObjective:
    """A ragged token field: ``model(tokens, lengths)`` gives logits ``(B, L, V)`` whose
    position ``t`` predicts token ``t + 1``; the loss is the cross-entropy per predicted token
    (NOTE(token-mean)).  Tokens stay integers (never cast to float)."""

    unit = "token"

    def __init__(self, model: nn.Module, field: str) -> None:
        self.model, self.field = model, field

    def _sum(self, batch: Any) -> Part:
        tokens, lengths = batch[self.field], batch[self.field + "_lengths"]
        # Counted before the forward pass: on CUDA this waits only for the lengths' copy, not
        # for the model, so the backward is queued without a stall.
        real, nonempty = torch.stack([lengths.sum(), (lengths > 0).sum()]).tolist()
        total = next_token_loss(self.model(tokens, lengths), tokens, lengths, reduction="sum")
        return Part(total.double(), int(real - nonempty), int(tokens.shape[0]), int(real))

    def micro(self, batch: Any, weight: Optional[float]) -> Part:
        """Forward and backward of the summed loss; ``weight`` is not needed (NOTE(token-mean))."""
        part = self._sum(batch)
        part.loss_sum.backward()
        return replace(part, loss_sum=part.loss_sum.detach())

    def finish(self, count: int) -> None:
        """Divide the step's summed gradient by its ``count`` predictions (NOTE(token-mean))."""
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(max(1, count))

    def evaluate(self, batch: Any) -> Tuple[Part, Optional[torch.Tensor]]:
        return self._sum(batch), None

    def dry_run(self, ds: Any, device: torch.device, model_name: str) -> None:
        """One forward pass and loss on two real samples (the shortest with a prediction),
        padded as the loader pads them, without gradients; ConfigError naming model.name and the
        field when the model cannot take them."""
        from gpuloader.loader import DataLoader

        lengths = ds.lengths(self.field)
        usable = np.flatnonzero(lengths >= 2)  # a sample of one token predicts nothing
        pool = usable if len(usable) else np.arange(len(ds))
        rows = pool[np.argsort(lengths[pool], kind="stable")[:2]]  # the shortest: cheap
        subset = torch.utils.data.Subset(ds, sorted(rows.tolist()))
        with DataLoader(subset, batch_size=max(1, len(rows)), shuffle=False,
                        device=device) as loader:
            batch = next(iter(loader))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self._sum(batch)
        except Exception as exc:  # any failure of the model on real data is a config mismatch
            line = (str(exc).strip().splitlines() or [""])[0]
            raise ConfigError(f"model.name: {model_name} cannot predict the next token of "
                              f"data.inputs {self.field!r} (a padded batch of shape "
                              f"{tuple(batch[self.field].shape)}): {type(exc).__name__}: "
                              f"{line}") from None
        finally:
            self.model.train(was_training)


def record_fields(unit: str, sums: Any, extra: Dict[str, Any]) -> Dict[str, Any]:
    """Per-token figures of an epoch record (nothing for rows)."""
    if unit != "token":
        return {}
    return {"tokens": sums.tokens, "predictions": sums.count,
            "tokens_per_s": sums.tokens / sums.elapsed_s if sums.elapsed_s > 0 else 0.0,
            **extra}
