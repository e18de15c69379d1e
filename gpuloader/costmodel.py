"""The learned memory cost of a training step as a function of the batch shape.

A batch of ``B`` samples padded to length ``L`` (fixed-size rows: ``L = 1``) costs the step

    peak(B, L) = a + b * B * L + c * B * L**2          (bytes)

``a``: what the step needs whatever the batch (workspaces, the loss's scalars); ``b``: bytes per
padded token (activations, logits); ``c``: bytes per token per unit of length (attention scores
that grow with the square of the length; 0 for fixed rows).  ``StepCost`` holds one such
``(a, b, c)`` and answers the planning questions; ``ShapeCostModel`` learns it from the peaks of
guarded steps and from the shapes that ran out of memory.

NOTE(robust-cost-fit): how ``ShapeCostModel`` turns observations into a ``StepCost``:

=====  ======================================================================================
1      each shape ``(B, L)`` keeps its last ``peaks_per_shape`` peaks; its value is their
       ``quantile`` (nearest rank, so the maximum until about ``1 / (1 - quantile)`` peaks are
       kept): a one-off spike at a repeated shape -- cudnn autotuning the shape's first step --
       stops counting once the shape has run a few more times.  Only the ``max_shapes`` most
       recently seen shapes are kept (bounded memory).
2      ``b`` and ``c`` are a least-squares fit over the shapes' values, both clamped >= 0
       (``c`` only with ``quadratic=True`` and >= 2 lengths, then from >= 3 shapes -- before,
       the prior plans; with one length ``c`` is 0 and ``b`` carries it).  With
       >= 5 shapes, a shape further above the fit of the *other* shapes than 4x the median of
       that distance is left out (a transient would otherwise tilt the slopes).  The fit goes
       through the origin -- fixed part 0, the per-token parts carry the cost, conservative
       for larger batches -- unless the token counts span ``MIN_TOKEN_SPAN`` and a fixed
       part cuts the squared error by more than ``ORIGIN_TOLERANCE``: planned batches all
       peak near the budget, and from such shapes a large fixed part with slopes near 0 fits
       about as well as the truth -- and would plan unbounded batches.  For the same reason
       the fit with a fixed part is, from 4 shapes whose residuals are not 0, a ridge
       regression that pulls the fixed part towards 0 (``FIXED_PRIOR_SHARE``); exact data
       is fitted exactly.
3      ``a`` is raised until the fit lies on or above every shape -- except that once a shape
       has not been seen for ``half_life`` observations, its excess above the least-squares
       fit halves every further ``half_life``, so one old transient does not lower every
       later plan.
4      out-of-memory shapes: a failed step at ``(B_f, L_f)`` with ``limit`` bytes available
       scales ``b`` and ``c`` up until ``peak(B_f, L_f) >= limit`` (``>= 2 * limit`` where
       the cost is a guess -- the prior, or a length longer than measured while only one
       length is: corrected like a batch size after an OOM, halved); and no plan for a length
       ``L >= L_f`` reaches ``B_f`` samples (cost grows with both B and L).  A success at a
       shape that dominates a failure (``B >= B_f`` and ``L >= L_f``) -- memory was freed --
       forgets it, as does ``forget_failures()``.
=====  ======================================================================================

Until two shapes of different token counts (three, over two lengths or more, with
``quadratic=True``) have been seen the model plans from the costliest observed shape per token,
and before any step from the prior ``StepCost(0, token_bytes, 0)`` (``token_bytes``: bytes one
padded token costs, given by the user; 0: unknown, and plans are unbounded -- the caller
applies its own cap); either is raised by step 4.
"""
from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Deque, List, Optional, Sequence, Tuple

import numpy as np

from gpuloader.checks import int_at_least
from gpuloader.errors import ArgumentError, describe

__all__ = ["StepCost", "ShapeCostModel"]

Shape = Tuple[int, int]  # (batch, length)

#: The fit keeps a fixed part only when the fit through the origin has more than this many
#: times its squared error (NOTE(robust-cost-fit) step 2).
ORIGIN_TOLERANCE = 1.5

#: ... and only when the kept shapes' token counts span at least this factor.
MIN_TOKEN_SPAN = 1.1

#: The fixed part's prior scale, as a share of the mean peak: with noisy peaks the fit with a
#: fixed part is a ridge regression of it towards 0, weighted by the plain fit's mean squared
#: residual over this scale squared (NOTE(robust-cost-fit) step 2).
FIXED_PRIOR_SHARE = 0.1

#: Before a fit, a failed shape must be predicted to need this many times the memory it had:
#: the prior is a guess, so it is corrected like a batch size after an OOM (halved), not inched.
PRIOR_FAILURE_MARGIN = 2.0


def _count(name: str, value: object, low: int) -> int:
    return int_at_least(name, value, low, "a positive int" if low == 1 else None)


def _largest_fitting(fixed: float, per_sample: float, budget: int) -> Optional[int]:
    """Largest ``n >= 0`` with ``fixed + n * per_sample <= budget``; None when ``per_sample`` is 0
    and the fixed part fits (memory sets no bound)."""
    room = budget - fixed
    if per_sample <= 0.0:
        return None if room >= 0 else 0
    if room < 0:
        return 0
    n = math.floor(room / per_sample)
    # the division rounds either way: settle on the exact boundary of ``fixed + n * per_sample``
    while n > 0 and fixed + n * per_sample > budget:
        n -= 1
    while fixed + (n + 1) * per_sample <= budget:
        n += 1
    return n


@dataclass(frozen=True)
class StepCost:
    """``peak(B, L) = fixed + per_token * B * L + per_token_length * B * L**2`` bytes (module
    docstring).  Fields are floats >= 0."""

    fixed: float = 0.0
    per_token: float = 0.0
    per_token_length: float = 0.0

    def sample_bytes(self, length: int) -> float:
        """Bytes one sample padded to ``length`` adds to the step."""
        return self.per_token * length + self.per_token_length * length * length

    def peak(self, batch: int, length: int = 1) -> float:
        """Predicted peak bytes of a step on ``batch`` samples padded to ``length``."""
        return self.fixed + batch * self.sample_bytes(length)

    def max_batch(self, length: int, budget_bytes: int) -> Optional[int]:
        """Largest batch of samples padded to ``length`` whose predicted peak is at most
        ``budget_bytes`` (may be 0); None when the cost does not grow with the batch."""
        return _largest_fitting(self.fixed, self.sample_bytes(length), budget_bytes)

    def scaled(self, factor: float) -> "StepCost":
        """The same fixed part with the per-sample part multiplied by ``factor``."""
        return StepCost(self.fixed, self.per_token * factor, self.per_token_length * factor)


@dataclass
class _ShapeRecord:
    peaks: Deque[int]
    last_seen: int


@dataclass(frozen=True)
class _Failure:
    batch: int
    length: int
    limit: Optional[int]


class ShapeCostModel:
    """Learns ``StepCost`` from guarded steps following NOTE(robust-cost-fit).

    ``observe(batch, length, peak)`` after a step that fit; ``observe_oom(batch, length,
    limit_bytes=...)`` after one that ran out of memory; ``max_batch(length, budget)`` and
    ``max_tokens(length, budget)`` plan.  Bytes throughout; ``half_life`` counts observations.
    Not thread-safe; one per loader, for the loader's lifetime (``reset()`` when the model or
    optimizer changes).
    """

    def __init__(self, *, token_bytes: int = 0, quadratic: bool = True, max_shapes: int = 64,
                 peaks_per_shape: int = 16, quantile: float = 0.9, half_life: int = 64,
                 max_failures: int = 16) -> None:
        self.token_bytes = int_at_least("token_bytes", token_bytes, 0,
                                         "an int >= 0 of bytes one padded token costs")
        self.quadratic = bool(quadratic)
        self.max_shapes = _count("max_shapes", max_shapes, 2)
        self.peaks_per_shape = _count("peaks_per_shape", peaks_per_shape, 1)
        self.half_life = _count("half_life", half_life, 1)
        self.max_failures = _count("max_failures", max_failures, 1)
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or \
                not 0.0 < quantile <= 1.0:
            raise ArgumentError(f"quantile must be a number in (0, 1], got {quantile!r}")
        self.quantile = float(quantile)
        self._shapes: "OrderedDict[Shape, _ShapeRecord]" = OrderedDict()
        self._failures: "OrderedDict[Shape, _Failure]" = OrderedDict()
        self._clock = 0
        self._fit: Optional[StepCost] = None
        self._stale = False

    def __repr__(self) -> str:
        return (f"ShapeCostModel(shapes={len(self._shapes)}, failures={len(self._failures)}, "
                f"learned={self.learned})")

    # ---------------------------------------------------------------- recording
    def observe(self, batch: int, length: int, peak_bytes: int) -> None:
        """Record that a step on ``batch`` samples padded to ``length`` peaked at
        ``peak_bytes`` bytes (beyond what was allocated before it)."""
        shape = (_count("batch", batch, 1), _count("length", length, 1))
        peak = int_at_least("peak_bytes", peak_bytes, 0, "an int >= 0 of bytes")
        self._clock += 1
        record = self._shapes.pop(shape, None)
        if record is None:
            record = _ShapeRecord(deque(maxlen=self.peaks_per_shape), self._clock)
        record.peaks.append(peak)
        record.last_seen = self._clock
        self._shapes[shape] = record
        while len(self._shapes) > self.max_shapes:
            self._shapes.popitem(last=False)
        for key, failure in list(self._failures.items()):
            if shape[0] >= failure.batch and shape[1] >= failure.length:
                del self._failures[key]  # a larger step fits now: memory was freed
        self._stale = True

    def observe_oom(self, batch: int, length: int = 1, *,
                    limit_bytes: Optional[int] = None) -> None:
        """Record that a step on ``batch`` samples padded to ``length`` ran out of memory, with
        ``limit_bytes`` bytes available to it when known (NOTE(robust-cost-fit) step 4)."""
        shape = (_count("batch", batch, 1), _count("length", length, 1))
        limit = None if limit_bytes is None else int_at_least(
            "limit_bytes", limit_bytes, 0, "an int >= 0 of bytes, or None")
        previous = self._failures.pop(shape, None)
        if previous is not None and previous.limit is not None and limit is not None:
            limit = max(limit, previous.limit)
        self._failures[shape] = _Failure(shape[0], shape[1], limit)
        while len(self._failures) > self.max_failures:
            self._failures.popitem(last=False)
        self._stale = True

    def forget_failures(self) -> None:
        """Drop every out-of-memory bound (e.g. when much more memory is free than at them)."""
        self._failures.clear()
        self._stale = True

    def reset(self) -> None:
        """Forget everything learned (e.g. after the model or optimizer changed)."""
        self._shapes.clear()
        self._failures.clear()
        self._fit = None
        self._stale = False

    def state_dict(self) -> dict:
        """Everything learned, as plain data (for checkpoints): the kept shapes with their
        peaks and ages, the failures and the observation clock.  The options are not included:
        a model built with the same options and ``load_state_dict`` plans identically."""
        return {
            "clock": self._clock,
            "shapes": [[b, n, list(r.peaks), r.last_seen] for (b, n), r in self._shapes.items()],
            "failures": [[f.batch, f.length, f.limit] for f in self._failures.values()],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (kept within this model's ``max_shapes``,
        ``peaks_per_shape`` and ``max_failures``)."""
        try:
            clock = int(state["clock"])
            shapes = [(int(b), int(n), [int(p) for p in peaks], int(seen))
                      for b, n, peaks, seen in state["shapes"]]
            failures = [(int(b), int(n), None if limit is None else int(limit))
                        for b, n, limit in state["failures"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArgumentError(f"state must be ShapeCostModel.state_dict() output, got "
                                f"{describe(state)} ({type(exc).__name__}: {exc})") from None
        self.reset()
        self._clock = clock
        for batch, length, peaks, seen in shapes[-self.max_shapes:]:
            self._shapes[(batch, length)] = _ShapeRecord(
                deque(peaks, maxlen=self.peaks_per_shape), seen)
        for batch, length, limit in failures[-self.max_failures:]:
            self._failures[(batch, length)] = _Failure(batch, length, limit)
        self._stale = True

    # ---------------------------------------------------------------- the cost
    @property
    def learned(self) -> Optional[StepCost]:
        """The cost fitted from observed steps (raised by failures); None before two shapes of
        different token counts were seen."""
        if self._stale:
            fit = self._solve()
            lengths = {n for _, n in self._shapes}
            # one length measured: the L**2 term is unknown, so longer lengths are a guess
            beyond = max(lengths) if self.quadratic and len(lengths) == 1 else None
            self._fit = None if fit is None else self._respect_failures(fit, 1.0, beyond=beyond)
            self._stale = False
        return self._fit

    @property
    def cost(self) -> StepCost:
        """The cost plans use: ``learned``; before a fit, the costliest observed shape per
        token (no fixed part: conservative for larger batches) -- a measurement beats the
        guess; before any step, the prior from ``token_bytes``.  Raised by failures."""
        learned = self.learned
        if learned is not None:
            return learned
        if self._shapes:
            per_token = max(self._value(r) / (b * n) for (b, n), r in self._shapes.items())
            longest = max(n for _, n in self._shapes)
            return self._respect_failures(StepCost(0.0, per_token, 0.0), 1.0, beyond=longest)
        prior = StepCost(0.0, float(self.token_bytes), 0.0)
        return self._respect_failures(prior, PRIOR_FAILURE_MARGIN)

    @property
    def failures(self) -> List[Tuple[int, int, Optional[int]]]:
        """The remembered out-of-memory shapes, oldest first: ``(batch, length, limit_bytes)``."""
        return [(f.batch, f.length, f.limit) for f in self._failures.values()]

    def predict(self, batch: int, length: int = 1) -> float:
        """Predicted peak bytes of a step on ``batch`` samples padded to ``length``."""
        return self.cost.peak(_count("batch", batch, 1), _count("length", length, 1))

    # ---------------------------------------------------------------- planning
    def max_batch(self, length: int, budget_bytes: int) -> Optional[int]:
        """Largest batch of samples padded to ``length`` that fits ``budget_bytes``: predicted
        peak within the budget and below every failed shape of length <= ``length``.  May be 0;
        None when nothing bounds it (no cost known and no failure)."""
        length = _count("length", length, 1)
        budget = max(0, int(budget_bytes))
        size = self.cost.max_batch(length, budget)
        for failure in self._failures.values():
            if failure.length <= length:
                bound = failure.batch - 1
                size = bound if size is None else min(size, bound)
        return size

    def max_tokens(self, length: int, budget_bytes: int) -> Optional[int]:
        """Padded tokens (``B * L``) of the largest batch of ``length``-long samples that fits
        ``budget_bytes``: the token budget at a reference length.  None when unbounded."""
        size = self.max_batch(length, budget_bytes)
        return None if size is None else size * int(length)

    # ---------------------------------------------------------------- fitting
    def _value(self, record: _ShapeRecord) -> float:
        ordered = sorted(record.peaks)
        rank = max(1, math.ceil(self.quantile * len(ordered) - 1e-9))
        return float(ordered[rank - 1])

    def _solve(self) -> Optional[StepCost]:
        shapes = list(self._shapes.items())
        tokens = np.array([b * l for (b, l), _ in shapes], dtype=np.float64)
        if len(np.unique(tokens)) < 2:
            return None
        lengths = np.array([l for (_, l), _ in shapes], dtype=np.float64)
        values = np.array([self._value(r) for _, r in shapes])
        ages = np.array([self._clock - r.last_seen for _, r in shapes], dtype=np.float64)
        squares = tokens * lengths
        several_lengths = len(np.unique(lengths)) >= 2
        if self.quadratic and several_lengths and len(shapes) < 3:
            return None  # a line through two lengths says nothing of the L**2 term: the prior
        use_c = self.quadratic and several_lengths
        columns = [tokens, squares] if use_c else [tokens]
        keep = np.ones(len(shapes), dtype=bool)
        coef = self._fit_slopes(columns, values, keep)
        if len(shapes) >= 5:  # step 2's outliers
            deleted = _deleted_residuals(columns, values)
            # the tolerance keeps rounding noise of an exact fit from counting as an outlier
            spread = float(np.median(np.abs(deleted))) + 1e-9 * float(np.abs(values).max())
            keep = deleted <= 4.0 * spread
            # never leave out so much that the L**2 term loses the lengths that determine it
            if keep.sum() >= 2 and not keep.all() and (
                    not use_c or len(np.unique(lengths[keep])) >= 2):
                coef = self._fit_slopes(columns, values, keep)
        residual = values - _evaluate(coef, columns)
        decay = np.power(0.5, np.maximum(0.0, ages - self.half_life) / self.half_life)
        above = np.where(residual > 0, residual * decay, residual)
        fixed = max(0.0, coef[0] + float(above.max()))
        return StepCost(_snap(fixed), _snap(coef[1]), _snap(coef[2]) if use_c else 0.0)

    @staticmethod
    def _fit_slopes(columns: List[np.ndarray], values: np.ndarray,
                    keep: np.ndarray) -> List[float]:
        """NOTE(robust-cost-fit) step 2: the non-negative least-squares fit, through the origin
        unless a fixed part explains the kept shapes clearly better."""
        origin, origin_error = _nonnegative_fit(columns, values, keep, intercept=False)
        tokens = columns[0][keep]
        if tokens.max() < MIN_TOKEN_SPAN * tokens.min():
            return origin
        full, full_error = _nonnegative_fit(columns, values, keep)
        if full_error > 0 and keep.sum() >= 4:  # noisy peaks: keep the fixed part from
            # soaking them up (with fewer shapes the residual says nothing of the noise)
            prior = FIXED_PRIOR_SHARE * float(np.mean(values[keep]))
            ridge = full_error / int(keep.sum()) / max(prior, 1.0) ** 2
            full, full_error = _nonnegative_fit(columns, values, keep, ridge=ridge)
        return origin if origin_error <= ORIGIN_TOLERANCE * full_error else full

    def _respect_failures(self, cost: StepCost, margin: float, *,
                          beyond: Optional[int] = None) -> StepCost:
        """``cost`` with its per-sample part raised until every failed shape with a known limit
        is predicted to need at least ``margin`` times that limit -- ``PRIOR_FAILURE_MARGIN``
        times for shapes longer than ``beyond`` (the cost there is a guess)."""
        for failure in self._failures.values():
            if failure.limit is None:
                continue
            guessed = beyond is not None and failure.length > beyond
            needed = failure.limit * (PRIOR_FAILURE_MARGIN if guessed else margin)
            predicted = cost.peak(failure.batch, failure.length)
            if predicted >= needed:
                continue
            variable = predicted - cost.fixed
            if variable > 0:
                cost = cost.scaled((needed - cost.fixed) / variable)
            else:  # nothing to scale: spread the missing bytes over the failed shape's tokens
                cost = StepCost(cost.fixed, (needed - cost.fixed) / (failure.batch
                                                                     * failure.length),
                                cost.per_token_length)
        return cost


def _snap(value: float) -> float:
    """``value`` rounded to a whole number when it is one but for float rounding (relative
    1e-9): least squares leaves such noise even on exact data, and a planner rounding
    ``3145728.0000000005`` bytes up would plan one sample short."""
    whole = round(value)
    return float(whole) if abs(value - whole) <= 1e-9 * max(1.0, abs(value)) else float(value)


def _deleted_residuals(columns: List[np.ndarray], values: np.ndarray) -> np.ndarray:
    """Each row's value minus its prediction by the plain least-squares fit of the other rows.

    Unlike the residual of a fit over all rows, this exposes a transient at a shape that alone
    decides a coefficient (the fit would pass through it).  From the hat matrix
    (``residual / (1 - leverage)``); rows of leverage near 1 -- at most three -- are refitted.
    """
    design = np.column_stack([np.ones(len(values))]
                             + [c / max(1.0, float(np.abs(c).max())) for c in columns])
    inverse = np.linalg.pinv(design)
    leverage = np.einsum("ij,ji->i", design, inverse)
    residual = values - design @ (inverse @ values)
    out = residual / np.maximum(1.0 - leverage, 1e-2)
    for row in np.flatnonzero(leverage > 0.99):
        others = np.arange(len(values)) != row
        solution, *_ = np.linalg.lstsq(design[others], values[others], rcond=None)
        out[row] = values[row] - float(design[row] @ solution)
    return out


def _evaluate(coef: Sequence[float], columns: List[np.ndarray]) -> np.ndarray:
    out = np.full(columns[0].shape, coef[0])
    for weight, column in zip(coef[1:], columns):
        out = out + weight * column
    return out


def _nonnegative_fit(columns: List[np.ndarray], values: np.ndarray, keep: np.ndarray, *,
                     intercept: bool = True, ridge: float = 0.0) -> Tuple[List[float], float]:
    """``([intercept, slopes...], squared error)`` (always three coefficients) of the
    least-squares fit of ``values`` over the ``keep`` rows with every slope >= 0: the best of
    the fits over each subset of the columns whose slopes come out non-negative (at most two
    columns, so at most four fits).  ``intercept=False`` fits through the origin; ``ridge``
    adds ``ridge * intercept**2`` to what is minimised (the error returned leaves it out)."""
    rows = int(keep.sum())
    target = np.append(values[keep], 0.0)
    best: Optional[Tuple[float, List[float], float]] = None
    for mask in range(1 << len(columns)):
        chosen = [i for i in range(len(columns)) if mask >> i & 1]
        if not chosen and not intercept:
            continue
        scales = [max(1.0, float(np.abs(columns[i][keep]).max())) for i in chosen]
        parts = [columns[i][keep] / s for i, s in zip(chosen, scales)]
        design = np.column_stack(([np.ones(rows)] if intercept else []) + parts)
        penalty = np.zeros((1, design.shape[1]))
        if intercept:
            penalty[0, 0] = math.sqrt(ridge)
        solution, *_ = np.linalg.lstsq(np.vstack([design, penalty]), target, rcond=None)
        found = [float(v) / s for v, s in zip(solution[1 if intercept else 0:], scales)]
        if any(v < 0 for v in found):
            continue
        coef = [float(solution[0]) if intercept else 0.0, 0.0, 0.0]
        for i, slope in zip(chosen, found):
            coef[1 + i] = slope
        error = float(np.sum((values[keep] - design @ solution) ** 2))
        objective = error + ridge * coef[0] ** 2
        if best is None or objective < best[0] * (1 - 1e-12):
            best = (objective, coef, error)
    if best is None:  # through the origin, every slope came out negative: nothing grows
        return [0.0, 0.0, 0.0], float(np.sum(values[keep] ** 2))
    return best[1], best[2]
