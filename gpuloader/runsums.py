"""What a training run adds up: an epoch's running sums (checkpointed), the sums of a stretch
of steps, and the loss of the last few steps.  Used by train.py."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

import torch

__all__ = ["EpochSums", "Stretch", "Recent", "RECENT_STEPS"]

#: Optimizer steps the ``recent_loss`` of a record averages over.
RECENT_STEPS = 50


@dataclasses.dataclass
class EpochSums:
    """Running sums of one epoch (kept in checkpoints, NOTE(train-resume)).  ``count``: what
    the loss is averaged over (samples, or predicted tokens: NOTE(token-mean) in
    objectives.py); ``tokens``: real tokens trained on (0 for fixed-size rows)."""

    loss_sum: float = 0.0
    samples: int = 0
    steps: int = 0
    bytes: int = 0
    wait_s: float = 0.0
    elapsed_s: float = 0.0
    oom_count: int = 0
    batch_sizes: List[int] = dataclasses.field(default_factory=list)
    resumed: bool = False
    count: int = 0
    tokens: int = 0

    def state(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class Recent:
    """Loss sum and count of each of the last ``RECENT_STEPS`` optimizer steps (across epochs),
    kept on the device (no synchronisation per step): the loss the model has *now*, which an
    epoch's mean -- dragged up by its first steps -- is not.  Checkpointed, so resume is exact."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros((RECENT_STEPS, 2), dtype=torch.float64, device=device)
        self.steps = 0

    def add(self, loss_sum: torch.Tensor, count: int) -> None:
        self.sums[self.steps % RECENT_STEPS, 0] = loss_sum
        self.sums[self.steps % RECENT_STEPS, 1] = count
        self.steps += 1

    def fields(self) -> Dict[str, Any]:
        loss, count = self.sums.sum(dim=0).tolist()
        return {"recent_loss": loss / count if count else None,
                "recent_steps": min(self.steps, RECENT_STEPS)}

    def state(self) -> Dict[str, Any]:
        return {"sums": self.sums.cpu().tolist(), "steps": self.steps}

    def load(self, state: Dict[str, Any]) -> None:
        self.sums.copy_(torch.tensor(state["sums"], dtype=torch.float64))
        self.steps = int(state["steps"])


class Stretch:
    """Sums over some micro-batches (a step, or the steps since the last fold): the loss stays
    on the device (no synchronisation per step), the counts on the host."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = self.samples = self.tokens = 0

    def add(self, part: Any) -> None:
        self.loss_sum += part.loss_sum
        self.count += part.count
        self.samples += part.samples
        self.tokens += part.tokens
