"""Planning batch sizes from free memory: the sizer behind ``batch_size="auto"`` and the
learned cost model.  Pure arithmetic, unit-testable without devices; the figures come from the
probes in probes.py.

NOTE(batch-sizing): ``plan_batch_size(free, cfg, learned)`` returns, in this order:

=====  ======================================================================================
1      ``staging = staging_bytes_per_sample * ring_slots`` (the staging ring holds every slot);
       ``step, fixed = learned.per_sample, learned.intercept`` when ``learned`` has a fit,
       else ``sample_bytes, 0``
2      ``size = (floor(free * memory_fraction) - ceil(fixed)) // (staging + ceil(step))``
       (no memory bound when that cost is 0)
3      step cost unknown (``sample_bytes == 0``, no fit) and ``max_batch_size is None``:
       ``size = min(size, unknown_cost_cap // staging)`` (the 1 GiB staging cap)
3b     ``pinned_host_bytes`` given (a CUDA device's pinned host ring): every slot's pinned
       block, rounded up to a power of two (NOTE(pinned-rounding) in buffers.py), must fit:
       ``size = min(size, pow2_floor(pinned_host_bytes // ring_slots) //
       staging_bytes_per_sample)``
4      ``size >= 8``: round down to a multiple of 8
5      clamp to ``[min_batch_size, max_batch_size]`` (explicit bounds win over the rounding)
6      ``min(size, dataset_len)``, then at least 1
=====  ======================================================================================

Each step is non-decreasing in ``free``, so the result is too.  Whenever the result is above
``min_batch_size``, ``result * (staging + step) + fixed <= free * memory_fraction``.
``free`` must count the memory the batches may use, including the staging ring's own bytes if
it is already allocated.
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

from gpuloader.checks import as_int, int_at_least
from gpuloader.costmodel import ShapeCostModel
from gpuloader.errors import ArgumentError, ArgumentTypeError, describe
from gpuloader.probes import MemoryProbe

__all__ = ["SizerConfig", "SizingOptions", "plan_batch_size", "CostModel", "FreeMemory",
           "validate_memory_fraction", "validate_sample_bytes", "validate_batch_bounds"]

#: Staging-ring cap (bytes) while the per-sample step cost is unknown, see NOTE(batch-sizing).
UNKNOWN_COST_CAP = 1 << 30


def validate_memory_fraction(memory_fraction: object) -> float:
    """``memory_fraction`` as a float in ``(0, 1]``: the share of free memory sizing plans for."""
    accepted = "a number in (0, 1], the share of free memory batches may use"
    if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, numbers.Real):
        raise ArgumentTypeError(
            f"memory_fraction must be {accepted}, got "
            f"{type(memory_fraction).__name__} {describe(memory_fraction)}"
        )
    value = float(memory_fraction)
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise ArgumentError(f"memory_fraction must be {accepted}, got {describe(memory_fraction)}")
    return value


def validate_sample_bytes(sample_bytes: object) -> int:
    """``sample_bytes`` as an int >= 0: extra bytes one sample costs in the step (0: unknown)."""
    return int_at_least(
        "sample_bytes",
        sample_bytes,
        0,
        "an int >= 0 of bytes one sample costs in the training step (0 if unknown)",
    )


def validate_batch_bounds(
    min_batch_size: object, max_batch_size: object
) -> Tuple[int, Optional[int]]:
    """``(min_batch_size, max_batch_size)``: positive ints with min <= max; max may be None."""
    low = int_at_least("min_batch_size", min_batch_size, 1, "a positive int")
    if max_batch_size is None:
        return low, None
    high = int_at_least("max_batch_size", max_batch_size, 1, "a positive int or None")
    if high < low:
        raise ArgumentError(
            f"max_batch_size must be None or >= min_batch_size={low}, got max_batch_size={high}"
        )
    return low, high


@dataclass(frozen=True)
class SizerConfig:
    """Inputs of ``plan_batch_size`` that do not change between plans (see NOTE(batch-sizing)).

    Bytes throughout.  ``staging_bytes_per_sample``: one sample over all fields;
    ``ring_slots``: how many batch-sized staging slots exist at once.
    Pass fields by keyword.
    """

    staging_bytes_per_sample: int
    ring_slots: int
    dataset_len: int
    memory_fraction: float = 0.8
    sample_bytes: int = 0
    min_batch_size: int = 1
    max_batch_size: Optional[int] = None
    unknown_cost_cap: int = UNKNOWN_COST_CAP
    pinned_host_bytes: Optional[int] = None  # host memory the pinned ring may take (CUDA)

    def __post_init__(self) -> None:
        values = {
            "staging_bytes_per_sample": int_at_least(
                "staging_bytes_per_sample", self.staging_bytes_per_sample, 0, "an int >= 0"
            ),
            "ring_slots": int_at_least("ring_slots", self.ring_slots, 1, "a positive int"),
            "dataset_len": int_at_least("dataset_len", self.dataset_len, 0, "an int >= 0"),
            "memory_fraction": validate_memory_fraction(self.memory_fraction),
            "sample_bytes": validate_sample_bytes(self.sample_bytes),
            "unknown_cost_cap": int_at_least(
                "unknown_cost_cap", self.unknown_cost_cap, 1, "a positive int of bytes"
            ),
        }
        values["min_batch_size"], values["max_batch_size"] = validate_batch_bounds(
            self.min_batch_size, self.max_batch_size
        )
        for name, value in values.items():
            object.__setattr__(self, name, value)


def plan_batch_size(
    free_bytes: int, cfg: SizerConfig, learned: Optional["CostModel"] = None
) -> int:
    """Batch size for ``free_bytes`` of free memory, following NOTE(batch-sizing).

    Negative ``free_bytes`` counts as 0.  ``learned`` replaces ``cfg.sample_bytes`` once it has a
    fit.
    """
    free = max(0, as_int("free_bytes", free_bytes, "an int of bytes"))
    staging = cfg.staging_bytes_per_sample * cfg.ring_slots
    fit = learned.fit if learned is not None else None
    fitted = fit is not None
    if fit is not None:
        step, fixed = math.ceil(fit[0]), math.ceil(fit[1])
    else:
        step, fixed = cfg.sample_bytes, 0
    cost = staging + step
    if cost > 0:
        size = max(0, math.floor(free * cfg.memory_fraction) - fixed) // cost
    elif fixed > free * cfg.memory_fraction:  # even the fixed part does not fit
        size = 0
    else:  # nothing scales with the batch: memory sets no bound
        size = sys.maxsize
    if not fitted and cfg.sample_bytes == 0 and cfg.max_batch_size is None and staging > 0:
        size = min(size, cfg.unknown_cost_cap // staging)
    if cfg.pinned_host_bytes is not None and cfg.staging_bytes_per_sample > 0:
        per_slot = max(0, cfg.pinned_host_bytes) // cfg.ring_slots
        block = 1 << (per_slot.bit_length() - 1) if per_slot > 0 else 0
        size = min(size, block // cfg.staging_bytes_per_sample)
    if size >= 8:
        size -= size % 8
    size = max(size, cfg.min_batch_size)
    if cfg.max_batch_size is not None:
        size = min(size, cfg.max_batch_size)
    return max(1, min(size, cfg.dataset_len))


def warn_whole_dataset(size: int, dataset_len: int, device: object) -> None:
    """NOTE(auto-whole-dataset): ``batch_size="auto"`` without ``max_batch_size`` sizes batches
    from memory alone, which on a CPU (or a large GPU) can be the whole dataset: one optimizer
    step per epoch, which changes what the model learns.  Say so once, at construction."""
    if dataset_len > 1 and size >= dataset_len:
        warnings.warn(
            f'batch_size="auto" chose {size}: every sample of the dataset in one batch on '
            f"{device or 'cpu'} (memory allows it), so one optimizer step per epoch. Pass "
            "max_batch_size= to bound it, or keep the optimization batch fixed with "
            "loader.accumulate(global_batch_size)", UserWarning, stacklevel=4)


def check_budget_fits(budget: int, cfg: SizerConfig) -> None:
    """ArgumentError when an explicit ``memory_budget`` cannot hold ``min_batch_size`` samples
    (staging slots plus ``sample_bytes`` each): "auto" would otherwise plan a batch over the
    budget it was given, silently."""
    per_sample = cfg.staging_bytes_per_sample * cfg.ring_slots + cfg.sample_bytes
    need = math.ceil(per_sample * cfg.min_batch_size / cfg.memory_fraction)
    if budget < need:
        raise ArgumentError(
            f"memory_budget={budget} bytes cannot hold min_batch_size={cfg.min_batch_size} "
            f"sample(s): one costs {per_sample:,} bytes ({cfg.staging_bytes_per_sample:,} in "
            f"each of {cfg.ring_slots} staging slots + sample_bytes {cfg.sample_bytes:,}), and "
            f"memory_fraction is {cfg.memory_fraction}; pass memory_budget >= {need:,}")


class CostModel:
    """A training step's peak memory versus batch size, for fixed-size rows: the shape-aware
    model of costmodel.py at length 1 (``peak = intercept + per_sample * batch_size``), fitted
    robustly as NOTE(robust-cost-fit) says -- a high quantile of each size's recent peaks, sizes
    far above the fit of the others left out of the slope, the line on or above every size
    (an under-estimate costs an OOM, an over-estimate only a slightly smaller batch), and the
    excess of a size not seen for a while decaying, so one transient (cudnn autotuning a new
    shape) does not lower every later plan.

    ``observe(batch_size, peak_bytes)`` records a measured peak (bytes the step needed beyond
    what was allocated before it); the ``max_points`` most recently seen sizes are kept
    (bounded memory).  Not thread-safe; the loader owns one.
    """

    def __init__(self, *, max_points: int = 64) -> None:
        points = int_at_least("max_points", max_points, 2, "an int >= 2")
        self.shapes = ShapeCostModel(quadratic=False, max_shapes=points)

    def __repr__(self) -> str:
        return f"CostModel(per_sample={self.per_sample}, intercept={self.intercept})"

    def observe(self, batch_size: int, peak_bytes: int) -> None:
        """Record that a step on ``batch_size`` samples peaked at ``peak_bytes`` bytes."""
        size = int_at_least("batch_size", batch_size, 1, "a positive int")
        self.shapes.observe(size, 1, peak_bytes)

    def reset(self) -> None:
        """Forget every observation (e.g. after the model or optimizer changed)."""
        self.shapes.reset()

    @property
    def fit(self) -> Optional[Tuple[float, float]]:
        """``(per_sample, intercept)`` in bytes, or None before two distinct sizes are seen."""
        learned = self.shapes.learned
        return None if learned is None else (learned.per_token, learned.fixed)

    @property
    def has_fit(self) -> bool:
        """True once two distinct batch sizes have been observed."""
        return self.fit is not None

    @property
    def per_sample(self) -> Optional[float]:
        """Bytes each extra sample adds to the step's peak; None before a fit."""
        fit = self.fit
        return None if fit is None else fit[0]

    @property
    def intercept(self) -> Optional[float]:
        """Bytes the step needs whatever the batch size; None before a fit."""
        fit = self.fit
        return None if fit is None else fit[1]

    def predict_max_batch(self, free_bytes: int, fraction: float = 0.8) -> Optional[int]:
        """Largest batch whose predicted step peak fits ``free_bytes * fraction`` (may be 0).

        None before a fit, and when the peak does not grow with the batch (memory sets no bound).
        """
        share = validate_memory_fraction(fraction)
        free = max(0, as_int("free_bytes", free_bytes, "an int of bytes"))
        if self.shapes.learned is None:
            return None
        return self.shapes.max_batch(1, math.floor(free * share))


@dataclass(frozen=True)
class SizingOptions:
    """The loader's options for ``batch_size="auto"`` and out-of-memory shrinking, checked:
    ``memory_fraction`` (share of free memory to plan for), ``sample_bytes`` (bytes one sample
    costs in the step, 0: unknown) and the bounds ``min_batch_size`` / ``max_batch_size``."""

    memory_fraction: float = 0.8
    sample_bytes: int = 0
    min_batch_size: int = 1
    max_batch_size: Optional[int] = None

    def __post_init__(self) -> None:
        fraction = validate_memory_fraction(self.memory_fraction)
        sample_bytes = validate_sample_bytes(self.sample_bytes)
        low, high = validate_batch_bounds(self.min_batch_size, self.max_batch_size)
        for name, value in (("memory_fraction", fraction), ("sample_bytes", sample_bytes),
                            ("min_batch_size", low), ("max_batch_size", high)):
            object.__setattr__(self, name, value)  # normalised values of a frozen dataclass

    def config(self, *, staging_bytes_per_sample: int, ring_slots: int, dataset_len: int,
               pinned_host_bytes: Optional[int] = None) -> SizerConfig:
        """The sizer's inputs for a dataset and ring of these dimensions."""
        return SizerConfig(staging_bytes_per_sample=staging_bytes_per_sample,
                           ring_slots=ring_slots, dataset_len=dataset_len,
                           memory_fraction=self.memory_fraction, sample_bytes=self.sample_bytes,
                           min_batch_size=self.min_batch_size,
                           max_batch_size=self.max_batch_size,
                           pinned_host_bytes=pinned_host_bytes)


@dataclass
class FreeMemory:
    """Memory free for batches now, in bytes: ``probe``'s figure plus ``held``, the bytes of the
    staging ring once it is allocated — the plan counts the ring as part of each batch's cost, so
    its own bytes are free for it (NOTE(batch-sizing)).  The loader sets ``held``; it stays 0
    with a fixed ``memory_budget``, which already is what batches may use."""

    probe: MemoryProbe
    held: int = 0

    def __call__(self) -> int:
        return self.probe.read().free + self.held
