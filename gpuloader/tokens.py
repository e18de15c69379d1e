"""The DataLoader's variable-length options, checked, and the token-budget epochs they make.

``RaggedOptions.check`` validates ``max_tokens``, ``pad_value``, ``pad_to_multiple_of``,
``packed`` and ``bucket_window`` against the dataset; ``TokenEpochs`` turns an epoch into an
order of dataset positions plus the planned batch ends (NOTE(length-buckets) in batching.py)
and cuts the next batch at the live budget (NOTE(token-budget)).

NOTE(agreed-split): distributed ranks must step the same number of times.  The plan gives each
rank the same number of planned batches; while the live budget is below the planning budget
(after an out-of-memory rollback) every rank cuts what is left of its current planned batch into
the same number of parts, ``min(max over ranks of the parts its budget needs, min over ranks of
its samples left)`` (two collectives, once per planned batch, only while shrunk).  A rank needing
fewer parts halves its largest; one needing more than the smallest rank has samples cuts evenly
by count (its parts then exceed the budget, as a lone over-long sample does).

NOTE(token-plan): an epoch's batches are planned once, with the planning budget ``plan_tokens``
(the ``max_tokens`` given, or the one a resumed state was planned with), as a pure function of
(seed, epoch, rank, world size, lengths, plan_tokens, bucket_window).  The live budget
(``loader.max_tokens``, shrunk by ``oom_guard``) only splits planned batches further: the next
batch is the longest prefix of what is left of the planned batch that fits the live budget.
Every batch is thus a consecutive span of a fixed order, so the cursor, rollback and O(1)
resume of NOTE(cursor) in epoch.py hold unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from gpuloader.batching import (TokenBudget, boundaries, bucket, cut, default_bucket_window,
                                shard_batches)
from gpuloader.checks import int_at_least
from gpuloader.errors import ArgumentError, ArgumentTypeError, describe
from gpuloader.order import epoch_order
from gpuloader.padding import RaggedLayout
from gpuloader.sources.base import Source
from gpuloader.sources.ragged import ragged_names
from gpuloader.tokenplan import TokenPlanner, staging_bytes_per_token


def _positive(name: str, value: object, *, allow_none: bool) -> Optional[int]:
    if value is None and allow_none:
        return None
    return int_at_least(name, value, 1, f"a positive int{' or None' if allow_none else ''}")


@dataclass(frozen=True)
class RaggedOptions:
    """The checked variable-length options of one loader (see DataLoader's docstring)."""

    max_tokens: Optional[int]
    pad_value: Any
    multiple: int
    packed: bool
    bucket_window: Optional[int]
    max_samples: Optional[int]

    @staticmethod
    def check(fields: Optional[Sequence[str]], ragged: Sequence[str], *, max_tokens: Any,
              pad_value: Any, pad_to_multiple_of: Any, packed: Any, bucket_window: Any,
              batch_size: Any, dtypes: Optional[dict] = None) -> Optional["RaggedOptions"]:
        """The options for a dataset with ``ragged`` fields (None for a fixed-size dataset,
        after refusing options that only apply to ragged ones).  ``fields`` is None when the
        dataset cannot be read in batches (then ragged options are refused too)."""
        max_tokens = _positive("max_tokens", max_tokens, allow_none=True)
        multiple = _positive("pad_to_multiple_of", pad_to_multiple_of, allow_none=False)
        window = _positive("bucket_window", bucket_window, allow_none=True)
        if not isinstance(packed, (bool, np.bool_)):
            raise ArgumentTypeError(f"packed must be a bool, got {describe(packed)}")
        given = [f"{name}={describe(value)}" for name, value, default in (
            ("max_tokens", max_tokens, None), ("pad_to_multiple_of", multiple, 1),
            ("packed", bool(packed), False), ("bucket_window", window, None),
            ("pad_value", pad_value, 0)) if value != default]
        if not ragged:
            if given:
                what = ("a dataset with a variable-length (ragged) field read in batches "
                        "(gl.Ragged, a Megatron .bin/.idx, NAME.values.npy + "
                        "NAME.offsets.npy, an HDF5 values/offsets group)")
                have = f"its fields {list(fields)} are fixed-size" if fields is not None else \
                    "this dataset is not an ArrayDataset (or a Subset of one)"
                raise ArgumentError(f"{given[0]} needs {what}; {have}; use batch_size= for "
                                    f"fixed-size samples")
            return None
        if batch_size is None:
            raise no_batch_size(ragged)
        for name, dtype in (dtypes or {}).items():
            try:
                ok = np.array(pad_value).astype(dtype) == np.array(pad_value)
            except (TypeError, ValueError, OverflowError):
                ok = False
            if not bool(ok):
                raise ArgumentError(f"pad_value={describe(pad_value)} cannot be stored in "
                                    f"ragged field {name!r} of dtype {np.dtype(dtype)}; give a "
                                    f"value that dtype holds exactly, e.g. pad_value=0")
        cap = None if batch_size == "auto" or (max_tokens is not None and batch_size == 1) \
            else int(batch_size)
        return RaggedOptions(max_tokens, pad_value, multiple, bool(packed), window, cap)


def no_batch_size(ragged: Sequence[str]) -> ArgumentError:
    """The error for ``batch_size=None`` (no batching) on a dataset with ``ragged`` fields."""
    return ArgumentError(
        f"batch_size=None on a dataset with ragged fields {list(ragged)}: ragged samples are "
        f'batched by gpuloader; give batch_size="auto" (max_tokens planned from free memory '
        f"and token_bytes=), or max_tokens=<int> (padded tokens per batch) with an int "
        f"batch_size capping samples per batch (1, the default: no cap), or an int batch_size "
        f"alone (padded batches of that many samples)")


def planning_lengths(source: Source, index_map: Optional[np.ndarray]) -> np.ndarray:
    """Per dataset position: the longest of the sample's ragged fields (int64)."""
    names = ragged_names(source.fields)
    lengths = source.lengths(names[0])  # type: ignore[attr-defined]
    for name in names[1:]:
        lengths = np.maximum(lengths, source.lengths(name))  # type: ignore[attr-defined]
    return lengths if index_map is None else lengths[index_map]


class TokenEpochs:
    """Epoch plans and live cuts for one loader (NOTE(token-plan)).

    ``lengths``: per dataset position (:func:`planning_lengths`); ``plan_tokens``: the
    planning budget (None: fixed-size spans of ``max_samples``, in the plain order).
    """

    def __init__(self, options: RaggedOptions, lengths: np.ndarray) -> None:
        self.options = options
        self.lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        self.plan_tokens = options.max_tokens
        #: batch_size="auto": per-shape caps from memory (NOTE(shape-caps) in tokenplan.py).
        self.planner: Optional[TokenPlanner] = None
        self._last: Optional[Tuple[tuple, Tuple[np.ndarray, np.ndarray]]] = None  # one plan

    def budget(self, tokens: int) -> TokenBudget:
        """A TokenBudget of ``tokens`` with this loader's rounding and sample cap."""
        return TokenBudget(int(tokens), self.options.multiple, self.options.max_samples)

    def agree(self, sizing: Any) -> None:
        """Wire ``batch_size="auto"``'s planner into the live size ``sizing`` (AdaptiveBatch):
        epochs are planned with its budget, agreed over ranks (the minimum)."""
        if self.planner is not None:
            self.plan_tokens = sizing.current
            sizing.planner = self.planner
            sizing.reference_length = self.reference_length()

    def reference_length(self) -> int:
        """The shortest sample's padded length: where ``auto`` re-plans the token budget, the
        most padded tokens any batch may then hold (a token costs least there); the shape caps
        (NOTE(shape-caps) in tokenplan.py) bound the batches of longer samples."""
        if len(self.lengths) == 0:
            return 1
        return self.budget(1).padded(int(self.lengths.min()))

    def window(self) -> int:
        """Samples per bucket window (``bucket_window`` or NOTE(length-buckets)'s default)."""
        if self.options.bucket_window is not None:
            return self.options.bucket_window
        return default_bucket_window(self.lengths, self.budget(self.plan_tokens or 1))

    def plan(self, kind: str, *, seed: int, epoch: int, rank: int, world_size: int,
             drop_last: bool, block_length: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(order of dataset positions, planned batch ends)`` of rank ``rank``'s epoch."""
        assert self.plan_tokens is not None
        key = (kind, seed, epoch, rank, world_size, drop_last, block_length, self.plan_tokens)
        if self._last is not None and self._last[0] == key:  # len(loader), then iter(loader)
            return self._last[1]
        n = len(self.lengths)
        full = epoch_order(kind, n, seed=seed, epoch=epoch, block_length=block_length)
        budget = self.budget(self.plan_tokens)
        if kind == "sequential":
            order, ends = full, boundaries(self.lengths, budget)
        else:
            order, ends = bucket(full, self.lengths, budget, window=self.window(), seed=seed,
                                 epoch=epoch)
        planned = shard_batches(order, ends, rank=rank, world_size=world_size,
                                drop_last=drop_last)
        self._last = (key, planned)
        return planned

    def plan_epoch(self, order: Any, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`plan` for an EpochOrder (epoch.py): its kind, seed, ranks and drop_last."""
        return self.plan(order.kind, seed=order.seed or 0, epoch=epoch, rank=order.world.rank,
                         world_size=order.world.world_size, drop_last=order.drop_last,
                         block_length=order.block_length)

    def epoch_spans(self, order: Any, epoch: int,
                    step: Optional[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(order, planned ends, planning lengths in that order)`` of ``epoch`` for an
        EpochOrder; ``step`` (an accumulate step) is refused: it counts samples."""
        if step is not None:
            raise ArgumentError("accumulate() counts samples; it cannot be combined with "
                                "max_tokens, whose batches hold varying sample counts")
        positions, ends = self.plan_epoch(order, epoch)
        return positions, ends, self.lengths[positions]

    def state_dict(self) -> dict:
        """``{"plan_tokens"}``: the budget this loader's epochs are planned with, and under
        ``batch_size="auto"`` ``"planner"``, the shape caps (tokenplan.py)."""
        state: dict = {"plan_tokens": self.plan_tokens}
        if self.planner is not None:
            state["planner"] = self.planner.state_dict()
        return state

    @staticmethod
    def check_state(state: object) -> None:
        """Raise unless ``state`` is :meth:`state_dict` output."""
        if not isinstance(state, dict) or "plan_tokens" not in state:
            raise ArgumentError(f"state['tokens'] must be a dict with 'plan_tokens' (from "
                                f"DataLoader.state_dict()), got {describe(state)}")
        _positive("state['tokens']['plan_tokens']", state["plan_tokens"], allow_none=False)

    def load_state_dict(self, state: dict) -> None:
        """Plan epochs with the saved budget, so a resumed epoch has the same batches."""
        self.plan_tokens = int(state["plan_tokens"])
        if self.planner is not None and state.get("planner") is not None:
            self.planner.load_state_dict(state["planner"])

    def parts(self, order_lengths: np.ndarray, pos: int, stop: int, live: int,
              world: Any) -> List[int]:
        """Ends of the batches that cover ``[pos, stop)`` (what is left of one planned batch)
        at the live budget ``live`` -- NOTE(agreed-split) over the ranks of ``world`` (None:
        one process)."""
        budget = self.budget(live)
        ends: List[int] = []
        p = pos
        while p < stop:
            p = self._capped(order_lengths, p, cut(order_lengths, p, stop, budget))
            ends.append(p)
        shrunk = self.planner is not None and self.planner.active
        if world is None or world.world_size == 1 or not world.use_collectives or \
                self.plan_tokens is None or (live >= self.plan_tokens and not shrunk):
            return ends  # a planned batch fits its plan budget: one part on every rank
        need, samples = len(ends), stop - pos
        count = min(-world.min(-need), world.min(samples))
        return _split_in(pos, stop, ends, count)


    def _capped(self, order_lengths: np.ndarray, start: int, end: int) -> int:
        """``end`` lowered so the batch ``[start, end)`` holds no more samples than the
        planner's cap for its padded length (NOTE(shape-caps)); at least one sample."""
        if self.planner is None or end - start <= 1:
            return end
        running = np.maximum.accumulate(order_lengths[start:end])
        m = self.options.multiple
        caps = self.planner.caps(np.maximum(1, -(-running // m) * m))
        if caps is None:
            return end
        fits = np.arange(1, end - start + 1) <= caps  # True, then False: caps only fall
        return start + max(1, int(np.count_nonzero(fits)))

    def span_shape(self, order_lengths: np.ndarray, start: int, length: int) -> Tuple[int, int]:
        """``(samples, padded length)`` of the batch ``[start, start + length)`` of an order."""
        longest = int(order_lengths[start:start + length].max()) if length > 0 else 1
        return length, self.budget(1).padded(longest)


def _split_in(pos: int, stop: int, ends: List[int], count: int) -> List[int]:
    """``count`` ends of non-empty consecutive parts of ``[pos, stop)``: ``ends`` if it has that
    many; else its largest parts halved until there are enough; else even parts by count."""
    if len(ends) > count:
        return [pos + ((stop - pos) * (i + 1)) // count for i in range(count)]
    ends = list(ends)
    while len(ends) < count:
        starts = [pos] + ends[:-1]
        k = max(range(len(ends)), key=lambda i: ends[i] - starts[i])
        ends.insert(k, starts[k] + (ends[k] - starts[k]) // 2)
    return ends


def layout_for(fields: dict, source: Source, options: RaggedOptions) -> RaggedLayout:
    """The RaggedLayout of a loader's batches (lengths indexed by source row)."""
    lengths = {n: source.lengths(n) for n in ragged_names(fields)}  # type: ignore[attr-defined]
    return RaggedLayout(fields, lengths, packed=options.packed, pad_value=options.pad_value,
                        multiple=options.multiple)


def max_rows(lengths: np.ndarray, options: RaggedOptions, live: Optional[int]) -> int:
    """Most samples one batch can hold: the cap, the dataset, and budget // shortest."""
    n = max(1, len(lengths))
    rows = n if options.max_samples is None else min(n, options.max_samples)
    if live is not None:
        shortest = max(1, -(-int(lengths.min()) // options.multiple) * options.multiple) \
            if len(lengths) else 1
        rows = min(rows, max(1, live // shortest))
    return rows



@dataclass(frozen=True)
class RaggedWiring:
    """What a loader over ragged fields is built with: options, batch layout, token epochs
    (None without ``max_tokens``: fixed-size spans, padded) and buffer rows per batch key."""

    options: RaggedOptions
    layout: RaggedLayout
    epochs: Optional[TokenEpochs]
    capacity: dict

    @staticmethod
    def build(dataset: Any, view: Any, *, batch_size: Any, sampler: Any, batch_sampler: Any,
              collate_fn: Any, planner: Optional[Callable[[int], TokenPlanner]] = None,
              max_samples: Optional[int] = None, **options: Any) -> Optional["RaggedWiring"]:
        """Check the options (``max_tokens``, ``pad_value``, ``pad_to_multiple_of``,
        ``packed``, ``bucket_window``) against ``dataset`` and its fast-path ``view`` (None
        when the dataset is not read in batches); None for fixed-size datasets.  Under
        ``batch_size="auto"``, ``planner(staging bytes per token)`` makes the TokenPlanner
        that plans ``max_tokens`` (at most the one given; ``max_samples`` caps samples)."""
        fields = view.fields if view is not None else None
        ragged = ragged_names(fields) if fields is not None else []
        ragged_fields = getattr(getattr(dataset, "dataset", dataset), "ragged_fields", None)
        if view is None and batch_size is None and ragged_fields:
            raise no_batch_size(ragged_fields)
        if view is None and getattr(dataset, "ragged_fields", None):
            raise ArgumentError(
                f"the dataset's ragged fields {dataset.ragged_fields} need gpuloader's batched "
                f"reads, which are off for it (a worker_init_fn with num_workers > 0, or a "
                f"subclass overriding __getitem__); drop those to load it")
        checked = RaggedOptions.check(fields, ragged, batch_size=batch_size,
                                      dtypes={n: fields[n].dtype for n in ragged}, **options)
        if checked is None:
            return None
        if collate_fn is not None:
            raise ArgumentError("collate_fn cannot be combined with ragged fields: gpuloader "
                                "pads or packs them itself (NAME + NAME_lengths, or packed=True "
                                "for NAME + NAME_offsets); drop collate_fn")
        if checked.max_tokens is not None and (sampler is not None or batch_sampler is not None):
            raise ArgumentError("max_tokens plans its own batches and cannot be combined with "
                                "sampler/batch_sampler; use shuffle=/order= instead")
        lengths = planning_lengths(view.source, view.index_map)
        layout = layout_for(fields, view.source, checked)
        made = None
        if batch_size == "auto":
            made, checked = _plan_auto(layout, lengths, checked, planner, max_samples)
        epochs = TokenEpochs(checked, lengths) if checked.max_tokens is not None else None
        if epochs is not None:
            epochs.planner = made
        longest = layout.padded(int(lengths.max())) if len(lengths) else 1
        tokens = checked.max_tokens or (checked.max_samples or 1) * max(1, longest)
        rows = max_rows(lengths, checked, checked.max_tokens)
        return RaggedWiring(checked, layout, epochs, layout.capacity(tokens, rows))


def _plan_auto(layout: RaggedLayout, lengths: np.ndarray, options: RaggedOptions,
               make: Optional[Callable[[int], TokenPlanner]],
               max_samples: Optional[int]) -> Tuple[TokenPlanner, RaggedOptions]:
    """The planner of ``batch_size="auto"`` and the options with the ``max_tokens`` it planned
    (NOTE(auto-tokens) in tokenplan.py); the ring is sized for it once."""
    if make is None:
        raise ArgumentError('batch_size="auto" on ragged fields needs a memory probe')
    shortest = layout.padded(int(lengths.min())) if len(lengths) else 1
    planner = make(staging_bytes_per_token(layout.fields, layout.ragged, shortest))
    whole = max(1, len(lengths)) * max(1, layout.padded(int(lengths.max())) if len(lengths)
                                       else 1)
    cap = whole if options.max_tokens is None else min(whole, options.max_tokens)
    planner.capacity = planner.plan(cap=cap)
    longest = layout.padded(int(lengths.max())) if len(lengths) else 1
    if planner.budgeted and planner.capacity < longest:
        raise ArgumentError(
            f"memory_budget={planner.budgeted} bytes cannot hold the longest sample "
            f"({longest} padded tokens): it plans max_tokens={planner.capacity} at "
            f"token_bytes={planner.token_bytes} plus {planner.staging_per_token} staging bytes "
            f"per token in each of {planner.ring_slots} slots; raise memory_budget or lower "
            f"token_bytes")
    return planner, replace(options, max_tokens=planner.capacity, max_samples=max_samples)
