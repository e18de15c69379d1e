"""Adaptive batches: the live batch size, and surviving out-of-memory errors with it.

``AdaptiveBatch`` owns everything that decides how many samples the next batch holds: the size
controller (shrink on out-of-memory, grow back: NOTE(grow-back) in sizing.py), the learned cost
model, re-planning from it, agreement across ranks, and rolling an epoch cursor back.  The
epoch iterators read its ``current`` size; ``OomGuard``, ``Step`` and ``accumulate`` drive it.
None of them knows the loader: they take the epoch tracker (epoch.py) and this object.

NOTE(exactly-once): a batch counts as consumed once delivered.  When ``oom_guard`` rolls a step
back, the epoch cursor is rewound to the start of the failed batch (or, inside ``accumulate``
with an optimizer, of the whole step), so those samples come again — split into smaller
batches — and nothing read ahead at the old size is delivered.  ``state_dict`` therefore counts
every delivered batch that was not rolled back.
"""
from __future__ import annotations

import gc
import traceback
import warnings
from typing import Any, Callable, Iterator, Optional, Tuple

import numpy as np
import torch

from gpuloader.allocator import StepMemory
from gpuloader.checks import int_at_least
from gpuloader.epoch import EpochCursor, EpochTracker
from gpuloader.errors import ArgumentError, ArgumentTypeError, add_note, describe
from gpuloader.planning import (CostModel, FreeMemory, SizerConfig, SizingOptions,
                                check_budget_fits, plan_batch_size)
from gpuloader.sizing import SizeController
from gpuloader.stats import LoaderStats
from gpuloader.tokenplan import TokenPlanner
from gpuloader.world import World

REPLAN_STEPS = 16  # successful guarded steps between re-plans from the learned cost
_CPU_OOM_MARKERS = ("can't allocate memory", "not enough memory", "out of memory")


def is_oom_error(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and the CPU allocator's out-of-memory RuntimeError."""
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(exc, (oom_type, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _CPU_OOM_MARKERS)


def planned_size(free: FreeMemory, config: SizerConfig, world: World,
                 cost_model: Optional[CostModel] = None) -> int:
    """The size ``batch_size="auto"`` picks now (NOTE(batch-sizing) in planning.py), agreed
    (the minimum) over distributed ranks — a collective when ``world`` has several ranks."""
    learned = cost_model if cost_model is not None and cost_model.has_fit else None
    return world.min(plan_batch_size(free(), config, learned))


class AdaptiveBatch:
    """The live batch size of one loader and everything that changes it.

    ``target``: the size to hold (an int the user gave, or the plan for "auto"); batches never
    exceed it, which is what the staging ring is allocated for (``capacity``).  ``options``,
    ``config`` (made on first use: it may read a sample) and ``free`` plan sizes from memory;
    ``world`` agrees sizes over ranks (setting it re-wires the controller, so a World built
    directly in tests takes effect); ``stats`` counts rollbacks; ``device`` is where steps run
    (the cost model learns only from CUDA steps).

    Lifetime: one per loader, across epochs.  Holds no reference to the loader
    (NOTE(no-cycles) in loader.py).
    """

    def __init__(self, target: int, *, auto: bool, options: SizingOptions,
                 config: Callable[[], SizerConfig], free: FreeMemory, world: World,
                 stats: LoaderStats, device: Optional[torch.device], tokens: bool = False) -> None:
        #: NOTE(token-budget-size): with ``tokens`` the live size is ``max_tokens`` (padded
        #: tokens per batch), not samples: an out-of-memory error halves it (the failed batch's
        #: samples come again, cut at the new budget), and a batch of one sample that fails
        #: cannot shrink.  The cost model learns from sample counts only, so it stays idle.
        self.tokens = tokens
        self.auto = auto
        self.options = options
        self._make_config = config
        self._config: Optional[SizerConfig] = None
        self.free = free
        self.stats = stats
        self.device = device
        self.capacity = target  # the staging ring holds batches of at most this many samples
        self.cost_model = CostModel()
        self.controller = SizeController(target, floor=min(options.min_batch_size, target),
                                         free_bytes=free)
        self.world = world
        #: Set by ``accumulate`` while a step runs: where that step's samples start.
        self.step_start: Optional[int] = None
        #: batch_size="auto" on ragged fields: the per-shape planner (tokenplan.py) and the
        #: padded length the token budget is re-planned at (the shortest sample's).
        self.planner: Optional[TokenPlanner] = None
        self.reference_length: Optional[int] = None
        self._guarded_steps = 0  # successful oom_guard steps (NOTE(learned-cost))
        self._warned_unzeroed = False

    @classmethod
    def make(cls, batch_size: object, *, options: SizingOptions,
             config: Callable[[], SizerConfig], free: FreeMemory, world: World,
             stats: LoaderStats, device: Optional[torch.device], budget: Optional[int] = None,
             max_tokens: Optional[int] = None) -> "AdaptiveBatch":
        """The live size of a loader built with ``batch_size`` (an int, or "auto": planned now,
        a collective across ranks) — or, with ``max_tokens``, of its token budget.  Under
        "auto" a memory ``budget`` too small for one sample is an error."""
        auto = batch_size == "auto"
        if auto and budget is not None and max_tokens is None:
            check_budget_fits(budget, config())
        target = planned_size(free, config(), world) if auto else int(batch_size)  # type: ignore
        if max_tokens is not None:  # the live size is max_tokens (NOTE(token-budget-size))
            target = world.min(max_tokens) if auto else max_tokens  # ranks plan alike
        return cls(target, auto=auto, options=options, config=config, free=free, world=world,
                   stats=stats, device=device, tokens=max_tokens is not None)

    @property
    def world(self) -> World:
        """The ranks sizes are agreed over (NOTE(agreed-growth) in sizing.py)."""
        return self._world

    @world.setter
    def world(self, world: World) -> None:
        self._world = world
        self.controller.agree = world.min if world.use_collectives else None

    @property
    def config(self) -> SizerConfig:
        """The sizer's inputs (NOTE(batch-sizing)), made once, when first needed."""
        if self._config is None:
            self._config = self._make_config()
        return self._config

    @property
    def current(self) -> int:
        """Samples in the next batch."""
        return self.controller.current

    def plan(self) -> int:
        """The size planned from free memory now (with the learned cost once it has a fit)."""
        return planned_size(self.free, self.config, self.world, self.cost_model)

    def roll_back(self, cursor: EpochCursor, start: int, length: int, *,
                  whole_step: bool, shape: Optional[Tuple[int, int]] = None) -> None:
        """After an out-of-memory error in the batch ``[start, start + length)`` (of ``shape``
        ``(samples, padded length)`` for ragged batches): shrink (agreed over ranks) and rewind
        ``cursor`` to ``start`` — or to the start of the running ``accumulate`` step with
        ``whole_step`` (NOTE(exactly-once)).  ValueError when the batch is already at the
        smallest size."""
        rewind_to = self.step_start if whole_step and self.step_start is not None else start
        predicted = None
        if self.planner is not None:  # "auto" tokens: halve that shape (NOTE(shape-caps))
            batch, padded = shape if shape is not None else (length, 1)
            if batch <= 1 and self.world.world_size > 1:
                batch = 2  # another rank failed: this rank's one sample stays one
            self.planner.on_oom(batch, padded)
            self.stats.add_rollback(cursor.position - rewind_to)
            cursor.rewind(rewind_to)
            return
        if self.tokens:  # NOTE(token-budget-size)
            if length <= 1 and self.world.world_size == 1:  # ranks converge to the floor
                raise ValueError("a batch of one sample does not fit in memory (max_tokens "
                                 "cannot split it further)")
            length = self.controller.current
        elif self.cost_model.has_fit:
            predicted = self.cost_model.predict_max_batch(self.free(),
                                                          self.options.memory_fraction)
        self.controller.on_oom(max(1, length), predicted)
        self.controller.current = self.world.min(self.controller.current)
        self.stats.add_rollback(cursor.position - rewind_to)
        cursor.rewind(rewind_to)

    def step_succeeded(self, size: int, shape: Optional[Tuple[int, int]] = None,
                       peak: Optional[int] = None) -> None:
        """A guarded step of ``size`` samples finished: the size may grow after a cooldown.

        NOTE(learned-cost): with ``batch_size="auto"`` on CUDA, once the cost model has a fit of
        peak step memory against batch size, every ``REPLAN_STEPS`` successful steps the target
        is re-planned from it (never above ``capacity``), replacing the guess.  The step count
        is the same on every rank, so the agreeing collective stays matched.
        """
        self.controller.on_success(self.controller.current if self.tokens else size)
        self._guarded_steps += 1
        if self.planner is not None:
            batch, padded = shape if shape is not None else (size, 1)
            self.planner.on_success(batch, padded, peak)
            if self.auto and self._guarded_steps % REPLAN_STEPS == 0 and \
                    self.reference_length is not None:
                tokens = self.planner.replan(self.reference_length)  # None before a fit
                own = self.capacity if tokens is None else min(self.capacity, tokens)
                # a collective on every rank: the step count is the same everywhere
                self.controller.set_target(self.world.min(own))
            return
        if self.auto and self.cost_model.has_fit and self._guarded_steps % REPLAN_STEPS == 0:
            self.controller.set_target(min(self.capacity, self.plan()))

    def warn_unzeroed(self) -> None:
        """Warn (once per loader) that a step was rolled back with nothing to zero: gradients
        its ``backward`` had accumulated before running out of memory stay, so the samples it
        re-delivers would count twice."""
        if self._warned_unzeroed:
            return
        self._warned_unzeroed = True
        warnings.warn("gpuloader: oom_guard() rolled a step back but has nothing to zero: "
                      "gradients the failed step had already accumulated are kept, so its "
                      "re-delivered samples count twice. Pass the optimizer (or the model): "
                      "loader.oom_guard(optimizer)", UserWarning, stacklevel=3)

    def learn(self, size: int, peak_bytes: int) -> None:
        """A guarded step of ``size`` samples needed ``peak_bytes`` beyond what it started with."""
        if not self.tokens:  # NOTE(token-budget-size)
            self.cost_model.observe(size, max(0, peak_bytes))

    def state_dict(self) -> dict:
        """The size and the controller's cooldown (see DataLoader's docstring)."""
        return self.controller.state_dict()

    @staticmethod
    def check_state(state: object) -> None:
        """Raise unless ``state`` is :meth:`state_dict` output (positive int size and cooldown)."""
        if not isinstance(state, dict) or not {"current", "cooldown"} <= set(state):
            raise ArgumentError(f"state['sizing'] must be a dict with 'current' and 'cooldown' "
                                f"(from DataLoader.state_dict()), got {describe(state)}")
        for key in ("current", "cooldown"):
            int_at_least(f"state['sizing'][{key!r}]", state[key], 1, "an int >= 1")

    def load_state_dict(self, state: dict) -> None:
        """Restore a checked state (:meth:`check_state`), clamped to this loader's bounds."""
        self.controller.load_state_dict(state)


class OomGuard:
    """Context manager around one training step (see ``DataLoader.oom_guard``).

    ``failed`` is True after a step that was rolled back.  In a distributed job the out-of-memory
    flag is all-reduced at exit, so every rank rolls back and shrinks together.  ``sizing`` is
    None when the loader does not size its batches (batch_size=None, a batch_sampler, an
    IterableDataset): nothing can shrink then, and an out-of-memory error propagates.
    """

    def __init__(self, epochs: EpochTracker, sizing: Optional[AdaptiveBatch], world: World,
                 optimizer: Any, *, memory: Optional[StepMemory] = None) -> None:
        if optimizer is not None and not callable(getattr(optimizer, "zero_grad", None)):
            raise ArgumentTypeError(
                f"optimizer must be something with zero_grad() — the torch.optim.Optimizer or "
                f"the nn.Module being trained — or None, got {type(optimizer).__name__} "
                f"{describe(optimizer)}")
        self.epochs = epochs
        self.sizing = sizing
        self.world = sizing.world if sizing is not None else world
        self.optimizer = optimizer  # anything with zero_grad(set_to_none=...)
        self.memory = memory        # the CUDA device's allocator view; None off CUDA
        self.failed = False
        self._batch_start = 0
        self._batch_length = 0
        self._shape: Optional[Tuple[int, int]] = None

    def __enter__(self) -> "OomGuard":
        cursor = self.epochs.active
        if cursor is None:
            raise RuntimeError("oom_guard() must be used inside a loop over the loader, "
                               "after a batch was delivered")
        self._batch_start, self._batch_length = cursor.last_start, cursor.last_length
        shape_of = getattr(cursor, "span_shape", None)  # ragged batches: (samples, length)
        self._shape = shape_of(self._batch_start, self._batch_length) \
            if shape_of is not None and self._batch_length > 0 else None
        if self.memory is not None:
            self.memory.begin()  # resets torch's peak only when learning (NOTE(user-peak))
        return self

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        oom = exc is not None and is_oom_error(exc)
        if exc is not None and not oom:
            return False  # any other exception passes through untouched
        if not self.world.any(oom):
            if self.sizing is not None:
                peak = self._learn_cost(self.sizing)
                self.sizing.step_succeeded(self._batch_length, self._shape, peak)
            return False
        if exc is not None:
            # A live traceback pins the failed step's tensors: clear its finished frames before
            # collecting, or the memory we are about to ask for stays in use.  (The frame that
            # runs the `with` is not finished: its locals stay — run steps in a function.)
            traceback.clear_frames(tb)
        del tb
        # Gradients first, then collect and empty the cache: the re-plan in roll_back then
        # measures the memory free once all of the failed step is gone.
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        elif self.sizing is not None:
            self.sizing.warn_unzeroed()
        if self.memory is not None:
            self.memory.release()
        else:
            gc.collect()
        # The epoch's cursor, also after its iterator was dropped (a break inside the guard
        # leaves a StoppedEpoch: epoch.py).
        cursor = self.epochs.active
        try:
            if self.sizing is None or cursor is None:
                raise ValueError("this loader has no batch size to shrink (batch_size=None, a "
                                 "batch_sampler, or an IterableDataset)")
            self.sizing.roll_back(cursor, self._batch_start, self._batch_length,
                                  whole_step=self.optimizer is not None, shape=self._shape)
        except ValueError as too_small:
            if exc is None:
                raise torch.cuda.OutOfMemoryError(
                    f"gpuloader: another rank ran out of memory at the smallest batch size "
                    f"({too_small})") from None
            add_note(exc, f"gpuloader: cannot retry with a smaller batch: {too_small}. Lower "
                          "the model's memory use, or set PYTORCH_CUDA_ALLOC_CONF="
                          "expandable_segments:True to reduce fragmentation.")
            return False
        self.failed = True
        return True

    def _learn_cost(self, sizing: AdaptiveBatch) -> Optional[int]:
        # Memory the step left allocated (optimizer state made by the first step, gradients kept
        # until the next zero_grad, ...) is not a per-step cost: every later plan's free-memory
        # probe already sees it as used.  Counting it would inflate the fit — on the slope when
        # the two batch sizes seen are close (say 256 and an epoch's tail of 250, the first
        # step's Adam state / 6 per sample) — and collapse the re-planned "auto" size.
        # StepMemory.step_peak leaves it out; it is None unless learning (batch_size="auto").
        peak = self.memory.step_peak() if self.memory is not None else None
        if peak is not None and self._batch_length > 0 and self._shape is None:
            sizing.learn(self._batch_length, peak)
        return peak


class Step:
    """One optimizer step of ``accumulate``: yields ``(batch, weight)`` micro-batches.

    ``size`` is the step's sample count; weights are ``len(batch) / size`` and sum to 1 over the
    micro-batches that were not rolled back.  With ``tokens`` (cumulative tokens of the epoch's
    order, ``tokens[i]`` before position ``i``) weights are the batch's share of the step's
    tokens instead, so a per-token mean loss times the weight sums to the step's per-token mean.
    """

    def __init__(self, sizing: AdaptiveBatch, iterator: Any, start: int, size: int,
                 tokens: Optional[np.ndarray] = None) -> None:
        self.sizing = sizing
        self.start = start
        self.size = size
        self._it = iterator
        self._tokens = tokens

    def __iter__(self) -> Iterator[Any]:
        end = self.start + self.size
        self.sizing.step_start = self.start
        try:
            while self._it.position < end:
                batch = next(self._it)
                yield batch, self._weight(self._it.last_start, self._it.last_length)
        finally:
            self.sizing.step_start = None


    def _weight(self, start: int, length: int) -> float:
        cum = self._tokens
        if cum is None or cum[self.start + self.size] == cum[self.start]:  # no tokens: samples
            return length / self.size
        return float(cum[start + length] - cum[start]) / float(
            cum[self.start + self.size] - cum[self.start])


def accumulate_tokens(sizing: AdaptiveBatch, iterator: Any,
                      global_tokens: int) -> Iterator[Step]:
    """Steps of about ``global_tokens`` tokens over a token-budget epoch (NOTE(token-steps))."""
    lengths, ends = iterator.token_plan()
    cum = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
    step_ends = token_step_ends(cum, ends, global_tokens)
    start = iterator.position  # NOTE(resumed-step)
    for end in step_ends[np.searchsorted(step_ends, start, side="right"):]:
        yield Step(sizing, iterator, start, int(end) - start, tokens=cum)
        if iterator.position < end:  # the caller left the step early
            return
        start = int(end)
    iterator.close()


def token_step_ends(cum: np.ndarray, planned_ends: np.ndarray, global_tokens: int) -> np.ndarray:
    """NOTE(token-steps): an ``accumulate(global_tokens=N)`` step is a run of consecutive planned
    batches (NOTE(token-plan) in tokens.py) holding at most ``N`` real (unpadded) tokens -- at
    least one planned batch -- grouped greedily from the epoch's start, so the steps are a pure
    function of the plan and a resumed epoch has the same steps.  Micro-batches, the planned
    batches cut at the live budget and shape caps, never straddle a step's end."""
    out = []
    step_start, last = 0, None
    for end in planned_ends.tolist():
        if last is not None and cum[end] - cum[step_start] > global_tokens:
            out.append(last)
            step_start = last
        last = end
    if last is not None:
        out.append(last)
    return np.asarray(out, dtype=np.int64)


def check_global_batch_size(global_batch_size: object) -> int:
    """``global_batch_size`` as a positive int (the samples of one ``accumulate`` step)."""
    return int_at_least("global_batch_size", global_batch_size, 1, "a positive int")


def check_accumulate(global_batch_size: object,
                     global_tokens: object) -> Tuple[Optional[int], Optional[int]]:
    """``(global_batch_size, global_tokens)`` checked: exactly one given, a positive int."""
    if (global_batch_size is None) == (global_tokens is None):
        raise ArgumentError(f"accumulate() takes exactly one of global_batch_size (samples per "
                            f"step) and global_tokens= (tokens per step), got "
                            f"global_batch_size={describe(global_batch_size)} and "
                            f"global_tokens={describe(global_tokens)}")
    if global_tokens is not None:
        return None, int_at_least("global_tokens", global_tokens, 1, "a positive int")
    return check_global_batch_size(global_batch_size), None


def accumulate(sizing: AdaptiveBatch, iterator: Any, global_batch_size: int, *,
               drop_last: bool) -> Iterator[Step]:
    """Steps of exactly ``global_batch_size`` samples over ``iterator`` (an epoch whose batches
    never straddle a multiple of it); the last may be smaller unless ``drop_last``.
    Micro-batches are sized by ``sizing`` (NOTE(exactly-once))."""
    total = iterator.total
    if drop_last:
        total -= total % global_batch_size
    # NOTE(resumed-step): resumed mid-step, the first step is what is left of the interrupted
    # one (its earlier micro-batches were delivered, and their gradients lost, before the
    # checkpoint): it starts at the resume point, so an out-of-memory rollback never rewinds
    # past it -- the generic path cannot replay samples it never read, and the fast path would
    # deliver them twice -- and its weights sum to 1 over the samples it has.
    start = iterator.position
    while start < total:
        boundary = (start // global_batch_size + 1) * global_batch_size
        size = min(boundary, total) - start
        yield Step(sizing, iterator, start, size)
        if iterator.position < start + size:  # the caller left the step early
            return
        start += size
    # Every step was taken: the epoch is over, as after a plain loop's StopIteration, so
    # state_dict() points at the next epoch (not at the end of this one, which a resume would
    # replay as an empty epoch).  Also ends the read-ahead past a drop_last tail.
    iterator.close()
