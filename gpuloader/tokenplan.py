"""Token budgets from memory: ``batch_size="auto"`` on a dataset with a ragged field.

``TokenPlanner`` plans ``max_tokens`` (padded tokens per batch) once, from free memory, and then
caps each batch by its shape: how many samples of padded length ``L`` one step may hold.  Bytes
throughout; lengths are padded lengths (after ``pad_to_multiple_of``).

NOTE(auto-tokens): the planning budget is ``T = floor(free * memory_fraction) //
(token_bytes + staging_per_token * ring_slots)``, where ``staging_per_token`` bounds what one
padded token takes in a staging slot (its ragged fields' bytes, plus the sample's fixed fields
and int64 lengths spread over the shortest sample's tokens).  The staging ring is allocated once
for ``T``; ``token_bytes=0`` (unknown) caps the ring at ``UNKNOWN_COST_CAP`` bytes.  Then
``T * token_bytes + ring bytes <= free * memory_fraction``: every planned batch fits.

NOTE(shape-caps): the number of samples of length ``L`` one batch may hold is the minimum of

- the learned cost (costmodel.py, once fitted from guarded CUDA steps):
  ``max_batch(L, step budget)``, the step budget being ``free * memory_fraction`` less the
  ring's bytes;
- each out-of-memory record ``(L_f, good, bad)`` with ``L_f <= L``: ``good`` samples at
  ``L_f``, scaled to ``L`` by the cost per sample (``s(L_f) / s(L)`` with the learned cost, else
  ``(L_f / L) ** 2``, the worst case of an attention step -- never over-optimistic); and for
  ``L < L_f``, until a cost is learned, the larger of the same padded tokens as ``good``
  samples at ``L_f`` (a sample's cost falls at most in proportion to its length) and the most
  samples a step has run with at a length ``>= L`` (they fit).  So the retry of a failed batch
  whose longest sample moved out of it is smaller, and a budget planned from a
  ``token_bytes`` far too low is corrected for short batches by the first failure of a long
  one.  Once a cost is learned, a record no longer bounds shorter lengths: the learned cost
  does (fitted on or above the steps that ran); short samples cost less per token where the
  ``L**2`` term says so, and the same-token bound, or ``good`` scaled down from a long length
  where it is a small integer, would hold a short bucket far below what fits.

The live ``max_tokens`` is re-planned from the learned cost at the shortest sample's padded
length (tokens.py ``reference_length``), where a token costs least; the caps above bound
longer batches, so each batch is planned by its shape, not one budget for all.

An out-of-memory error on ``B`` samples of length ``L`` records ``bad = B`` and ``good = B // 2``
at ``L``.  Every ``cooldown`` successful guarded steps (16 at first) each record whose ``good``
has run (a step with that many samples at ``L`` or longer: evidence, not just time) grows by
bisection towards its ``bad`` (never reaching it, stopping within ``good / GROWTH_RESOLUTION``
of it): long buckets grow back.  An out-of-memory error on a grown size (more samples at ``L``
than ever ran there), or any after a growth pass, returns every record to the size that ran
rather than halving it (as NOTE(grow-back) in sizing.py does for rows); one after a growth pass
doubles the cooldown, so growth attempts get rarer and the errors they cost stay few.

Caps change only at these two events, which happen on the same step on every rank (the OOM
flag is all-reduced; the success count and the cooldown -- doubled by a rule that reads no
per-rank record -- are the same everywhere), so the cuts of NOTE(agreed-split) in tokens.py
stay matched: ``revision`` counts the changes, and ``active`` turns the agreement on after the
first OOM, or at the first event after step peaks are measured (learned caps differ between
ranks even without an OOM).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from gpuloader.checks import int_at_least
from gpuloader.costmodel import ShapeCostModel, StepCost
from gpuloader.errors import ArgumentError, describe
from gpuloader.planning import UNKNOWN_COST_CAP
from gpuloader.sizing import INITIAL_COOLDOWN

#: Out-of-memory records kept (the oldest go first); lengths are few after padding.
MAX_RECORDS = 256
#: A record stops growing within ``good / GROWTH_RESOLUTION`` of its failed size: a probe
#: closer to it would risk another failure to win a few percent.
GROWTH_RESOLUTION = 8


def validate_token_bytes(token_bytes: object) -> int:
    """``token_bytes`` as an int >= 0: bytes one padded token costs in the step (0: unknown)."""
    return int_at_least("token_bytes", token_bytes, 0,
                        "an int >= 0 of bytes one padded token costs in the training step "
                        "(0 if unknown)")


def check_token_bytes_use(token_bytes: int, batch_size: object, *, ragged: bool) -> None:
    """ArgumentError when ``token_bytes`` is given where it sizes nothing: it plans
    ``batch_size="auto"`` on a dataset with a ragged field only."""
    if token_bytes and (not ragged or batch_size != "auto"):
        raise ArgumentError(f'token_bytes={token_bytes} sizes batch_size="auto" on a dataset '
                            f"with a ragged field; this loader has batch_size={batch_size!r} "
                            f"and {'ragged' if ragged else 'fixed-size'} fields (use "
                            f"sample_bytes= for fixed-size samples)")


def staging_bytes_per_token(fields: Dict[str, object], ragged: List[str], shortest: int) -> int:
    """Bytes one padded token takes in a staging slot (NOTE(auto-tokens)): the ragged fields'
    token bytes plus, per sample, the fixed fields and an int64 length per ragged field, spread
    over the ``shortest`` padded sample (a batch holds at most ``tokens // shortest`` rows)."""
    per_token = sum(fields[n].sample_nbytes for n in ragged)  # type: ignore[attr-defined]
    per_sample = sum(s.sample_nbytes for n, s in fields.items()  # type: ignore[attr-defined]
                     if n not in ragged) + 8 * len(ragged)
    return per_token + -(-per_sample // max(1, shortest))


@dataclass
class _Record:
    """Out-of-memory history at one padded length: ``good`` samples are planned, ``bad`` failed,
    ``safe`` is the last ``good`` before a growth attempt."""

    good: int
    bad: int
    safe: int


class TokenPlanner:
    """Plans ``max_tokens`` and per-shape caps for one loader (module docstring).

    ``free``: bytes free for batches now (planning.FreeMemory); ``memory_fraction``;
    ``token_bytes`` (the prior of the cost model); ``staging_per_token`` and ``ring_slots``
    (the staging ring); ``budgeted``: the ``memory_budget`` given, if any.  Lifetime: one per loader, across epochs.  Not thread-safe: the
    consumer thread drives it (cuts, ``oom_guard``).
    """

    def __init__(self, *, free: Callable[[], int], memory_fraction: float, token_bytes: int,
                 staging_per_token: int, ring_slots: int,
                 budgeted: Optional[int] = None) -> None:
        self.free = free
        self.budgeted = budgeted  # the memory_budget given (bytes), for error messages
        self.memory_fraction = memory_fraction
        self.token_bytes = token_bytes
        self.staging_per_token = max(1, staging_per_token)
        self.ring_slots = max(1, ring_slots)
        self.cost_model = ShapeCostModel(token_bytes=token_bytes, quadratic=True)
        self.capacity = 0  # tokens the staging ring holds (set by ``plan``)
        self.cooldown = INITIAL_COOLDOWN
        self.revision = 0
        self.active = False
        self._successes = 0
        self._grown = False  # a growth pass ran since the last out-of-memory error
        self._measured = False  # a step's peak was measured (the cost is being learned)
        self._records: Dict[int, _Record] = {}
        self._ran: Dict[int, int] = {}   # padded length -> most samples a step ran with
        self._seen: Dict[int, int] = {}  # ``_ran`` as of the last refresh (what caps use)
        self._learned: Optional[StepCost] = None
        self._step_budget = 0

    # ------------------------------------------------------------------ planning
    def plan(self, *, cap: Optional[int] = None) -> int:
        """The token budget memory allows now (NOTE(auto-tokens)), at most ``cap``, at least 1."""
        room = int(self.free() * self.memory_fraction)
        ring = self.staging_per_token * self.ring_slots
        tokens = max(0, room) // (self.token_bytes + ring)
        if self.token_bytes == 0:
            tokens = min(tokens, UNKNOWN_COST_CAP // ring)
        if cap is not None:
            tokens = min(tokens, cap)
        return max(1, tokens)

    def ring_bytes(self) -> int:
        """Bytes of the staging ring sized for ``capacity`` tokens."""
        return self.staging_per_token * self.ring_slots * self.capacity

    def step_budget(self) -> int:
        """Bytes a step may use now: the planned share of free memory less the ring."""
        return max(0, int(self.free() * self.memory_fraction) - self.ring_bytes())

    def replan(self, reference_length: int) -> Optional[int]:
        """Tokens at ``reference_length`` the learned cost allows (None before a fit)."""
        if self.cost_model.learned is None:
            return None
        tokens = self.cost_model.max_tokens(reference_length, self.step_budget())
        return None if tokens is None else max(1, tokens)

    def caps(self, lengths: np.ndarray) -> Optional[np.ndarray]:
        """Most samples a batch padded to each of ``lengths`` may hold (NOTE(shape-caps)), or
        None when nothing caps them."""
        if self._learned is None and not self._records:
            return None
        lengths = np.maximum(1, np.asarray(lengths, dtype=np.float64))
        out = np.full(lengths.shape, np.inf)
        if self._learned is not None:
            per = self._learned.per_token * lengths + self._learned.per_token_length * lengths ** 2
            room = self._step_budget - self._learned.fixed
            with np.errstate(divide="ignore"):
                out = np.where(per > 0, np.floor(max(0.0, room) / per), np.inf)
        frontier = self._frontier(lengths)
        for length, record in self._records.items():
            scale = self._per_sample(float(length)) / self._per_sample(lengths)
            if self._measured_cost():  # shorter: the fit bounds them (it saw them run)
                bound = np.where(lengths >= length, np.floor(record.good * scale), np.inf)
            else:
                shorter = np.maximum(np.floor(record.good * length / lengths), frontier)
                bound = np.where(lengths >= length, np.floor(record.good * scale), shorter)
            out = np.minimum(out, bound)
        return np.maximum(1.0, out)

    def _most_run(self, length: int) -> int:
        """The most samples a step has run with at ``length`` or longer (0: none)."""
        return max((b for n, b in self._ran.items() if n >= length), default=0)

    def _frontier(self, lengths: np.ndarray) -> np.ndarray:
        """Per length: the most samples a step ran with at that length or longer (it fits
        shorter samples too); 0 where none ran."""
        if not self._seen:
            return np.zeros(lengths.shape)
        known = np.array(sorted(self._seen), dtype=np.float64)
        most = np.maximum.accumulate(np.array([self._seen[int(n)] for n in known])[::-1])[::-1]
        at = np.searchsorted(known, lengths, side="left")
        return np.where(at < len(known), most[np.minimum(at, len(known) - 1)], 0.0)

    def _measured_cost(self) -> bool:
        learned = self._learned
        return learned is not None and (learned.per_token > 0 or learned.per_token_length > 0)

    def _per_sample(self, lengths: object) -> object:
        if self._measured_cost():
            return self._learned.sample_bytes(lengths)  # type: ignore[union-attr]
        return np.square(lengths)  # the worst case: attention grows with L**2

    def refresh(self) -> None:
        """Take the learned cost and the step budget that caps use until the next event."""
        self._learned = self.cost_model.learned
        # learned caps differ between ranks (each fits its own steps): agree on the splits
        # (NOTE(agreed-split)) from the first event after peaks are measured, on every rank
        self.active = self.active or self._measured
        self._seen = dict(self._ran)
        self._step_budget = self.step_budget() if self._learned is not None else 0
        self.revision += 1

    # ------------------------------------------------------------------ events
    def on_oom(self, batch: int, length: int) -> None:
        """A step on ``batch`` samples padded to ``length`` ran out of memory: halve that shape
        (ValueError when it held one sample: nothing smaller exists)."""
        if batch <= 1:
            raise ValueError(f"a batch of one sample of {length} tokens does not fit in memory "
                             "(a token budget cannot split it further)")
        self.cost_model.observe_oom(batch, length)
        record = self._records.get(length)
        grown = record is not None and batch > record.safe  # more than ever ran at ``length``
        if self._grown or grown:  # a growth failed: every record returns to its last good size
            for each in self._records.values():
                each.good = each.safe
        if self._grown:  # the same on every rank (NOTE(agreed-split)): so is the cooldown
            self.cooldown *= 2
            self._grown = False
        self._records.pop(length, None)
        # a grown size failed: back to the size that ran; else memory shrank: halve
        good = record.safe if grown else max(1, batch // 2)  # type: ignore[union-attr]
        if record is not None:
            good = min(good, record.safe)
        self._records[length] = _Record(good=good, bad=batch if record is None
                                        else min(batch, record.bad), safe=good)
        while len(self._records) > MAX_RECORDS:
            del self._records[next(iter(self._records))]
        self.active = True
        self._successes = 0
        self.refresh()

    def on_success(self, batch: int, length: int, peak_bytes: Optional[int]) -> None:
        """A guarded step of ``batch`` samples padded to ``length`` fit, peaking at
        ``peak_bytes`` (None: not measured); every ``cooldown`` steps the caps grow back."""
        if peak_bytes is not None and batch > 0:
            self.cost_model.observe(batch, max(1, length), max(0, peak_bytes))
            self._measured = True  # every rank measures alike (all on CUDA)
        self._ran[length] = max(batch, self._ran.get(length, 0))
        if len(self._ran) > MAX_RECORDS:  # keep the longest lengths: they bound the most
            del self._ran[min(self._ran)]
        self._successes += 1
        if self._successes < self.cooldown:
            return
        self._successes = 0
        # a growth pass ran: set on every rank alike (records differ between ranks, the steps
        # of these events do not), so cooldowns -- and the steps caps change at -- stay matched
        self._grown = bool(self._records)
        for length, record in self._records.items():
            if self._most_run(length) < record.good:
                continue  # not tried yet: neither known to fit nor to fail, so no growth
            record.safe = record.good  # it ran: it fits
            if record.bad - record.good > max(1, record.good // GROWTH_RESOLUTION):
                record.good = (record.good + record.bad) // 2
        self.refresh()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain data: the records, cooldown, success count, the largest batch run per length
        and the learned cost's state."""
        return {"records": [[n, r.good, r.bad, r.safe] for n, r in self._records.items()],
                "cooldown": self.cooldown, "successes": self._successes,
                "active": self.active, "grown": self._grown,
                "ran": [[n, b] for n, b in self._ran.items()],
                "cost_model": self.cost_model.state_dict()}

    def load_state_dict(self, state: object) -> None:
        """Restore :meth:`state_dict` output."""
        try:
            records = {int(n): _Record(int(g), int(b), int(s))
                       for n, g, b, s in state["records"]}  # type: ignore[index]
            cooldown = int(state["cooldown"])  # type: ignore[index]
            successes = int(state["successes"])  # type: ignore[index]
            active = bool(state["active"])  # type: ignore[index]
            grown = bool(state["grown"])  # type: ignore[index]
            ran = {int(n): int(b) for n, b in state["ran"]}  # type: ignore[index]
            self.cost_model.load_state_dict(state["cost_model"])  # type: ignore[index]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArgumentError(f"state['tokens']['planner'] must be TokenPlanner.state_dict() "
                                f"output, got {describe(state)} ({exc})") from None
        self._records, self.cooldown = records, max(1, cooldown)
        self._successes, self.active = successes, active
        self._grown, self._ran = grown, ran
        self.refresh()


def planner_factory(free: Callable[[], int], options: object, token_bytes: int,
                    ring_slots: int,
                    memory_budget: Optional[int]) -> Callable[[int], TokenPlanner]:
    """What RaggedWiring.build calls under ``batch_size="auto"``: a TokenPlanner for a given
    number of staging bytes per token.  Holds no loader (NOTE(no-cycles) in loader.py)."""
    def make(staging_per_token: int) -> TokenPlanner:
        return TokenPlanner(free=free, memory_fraction=options.memory_fraction,  # type: ignore
                            token_bytes=token_bytes, staging_per_token=staging_per_token,
                            ring_slots=ring_slots, budgeted=memory_budget)
    return make
