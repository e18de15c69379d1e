"""Epochs: the order an epoch visits, its cursor, and which epoch runs (or stopped) where.

NOTE(cursor): an epoch is an order (positions -> sample indices of this rank's shard) and a
cursor.  ``position`` counts the samples delivered and not rolled back; batches are consecutive
spans of the order starting at the cursor.  An out-of-memory rollback rewinds the cursor to the
start of the failed batch (or of the accumulate step) and drops every batch read ahead, so the
next batches re-deliver exactly those samples at the new size.  ``state_dict`` saves the cursor,
which makes resume O(1): the order is recomputed from (seed, epoch, rank, world size).
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np

from gpuloader.checks import as_int, index_array, int_at_least
from gpuloader.errors import ArgumentError
from gpuloader.order import EpochOrder, resolve_seed, shard_size
from gpuloader.world import World


class EpochCursor:
    """Position of one epoch: ``position`` samples delivered and not rolled back, the span of
    the last delivered batch, and ``finished`` once the epoch ran out.

    ``on_abandon(epoch, position, last_start, last_length)`` is called if the iterator is
    dropped before the epoch ends (``EpochTracker`` keeps those numbers).  ``keep_alive`` holds
    the loader whose readers this epoch uses — never called, only held, so
    ``next(iter(DataLoader(...)))`` works as with torch (NOTE(no-cycles) in loader.py).
    Subclasses implement ``_next``, ``rewind`` and ``close``.

    NOTE(one-consumer): an epoch's iterator is consumed by one thread at a time; a ``next()``
    while another thread is inside one raises ValueError, like torch's "generator already
    executing", instead of handing both the same position (duplicated samples).
    ``_workers`` and ``_pin_memory_thread`` mirror torch's iterator attributes that code in the
    wild reads to check worker exit: the fast path has no worker processes of torch's to report.
    """

    _workers: list = []
    _pin_memory_thread: Optional[object] = None

    def __init__(self, epoch: int, start: int) -> None:
        self.epoch = epoch
        self.position = start
        self.finished = False
        self.last_start = start
        self.last_length = 0
        self.on_abandon: Optional[Callable[[int, int, int, int], None]] = None
        self.keep_alive: object = None
        self._busy = threading.Lock()

    def __iter__(self) -> "EpochCursor":
        return self

    def __next__(self) -> Any:
        if not self._busy.acquire(blocking=False):  # NOTE(one-consumer)
            raise ValueError("generator already executing: one gpuloader iterator is being "
                             "consumed from two threads at once; give each thread its own "
                             "loader, or hand batches from one thread to the others")
        try:
            return self._next()
        finally:
            self._busy.release()

    def _next(self) -> Any:
        raise NotImplementedError

    def rewind(self, position: int) -> None:
        """Continue from ``position`` (<= the cursor), dropping what was read ahead."""
        raise NotImplementedError

    def close(self) -> None:
        """End the epoch early; read-ahead batches are forgotten."""
        raise NotImplementedError

    def __del__(self) -> None:
        if not self.finished and self.on_abandon is not None:
            try:
                self.on_abandon(self.epoch, self.position, self.last_start, self.last_length)
            except Exception:  # interpreter shutdown: the tracker may be half torn down
                pass


class StoppedEpoch(EpochCursor):
    """What is left of an epoch whose iterator was dropped before its end: its cursor, enough
    for ``state_dict()`` and for ``oom_guard`` to roll back its last batch.  Nothing is
    re-delivered from it; ``iter(loader)`` starts the next epoch."""

    def __init__(self, epoch: int, position: int, last_start: int, last_length: int) -> None:
        super().__init__(epoch, position)
        self.last_start, self.last_length = last_start, last_length

    def rewind(self, position: int) -> None:
        self.position = position

    def close(self) -> None:
        self.finished = True


class EpochTracker:
    """Which epoch runs next and from which position, and the epoch in progress.

    The running epoch's iterator is referred to weakly: dropping it (a ``break``) ends its
    epoch, and the tracker keeps the ``StoppedEpoch`` it left.  Lifetime: one per loader.
    """

    def __init__(self) -> None:
        self.epoch = 0       # the epoch the next iteration runs
        self.position = 0    # ... from this position (a loaded state's, else 0)
        self._live: Optional["weakref.ref[EpochCursor]"] = None
        self._stopped: Optional[StoppedEpoch] = None

    @property
    def active(self) -> Optional[EpochCursor]:
        """The iterator of the epoch in progress while someone holds it; after it was dropped
        unfinished, the StoppedEpoch it left; else None."""
        live = self._live() if self._live is not None else None
        return live if live is not None else self._stopped

    def end(self) -> None:
        """Close the epoch in progress (if any) and forget the one that stopped."""
        active = self.active
        if active is not None:
            active.close()
        self._live = None
        self._stopped = None

    def begin(self, iterator: EpochCursor) -> None:
        """``iterator`` started its epoch: the next iteration runs the epoch after it."""
        self.epoch, self.position = iterator.epoch + 1, 0
        iterator.on_abandon = self._abandoned
        self._live = weakref.ref(iterator)
        self._stopped = None

    def _abandoned(self, epoch: int, position: int, last_start: int, last_length: int) -> None:
        self._stopped = StoppedEpoch(epoch, position, last_start, last_length)

    def set_epoch(self, epoch: int) -> None:
        """Run ``epoch`` next; a loaded state's position is kept when it is that epoch."""
        epoch = int_at_least("epoch", epoch, 0, "an int >= 0")
        if epoch != self.epoch:
            self.position = 0
        self.epoch = epoch

    def state_dict(self) -> Dict[str, int]:
        """``{"epoch", "position"}``: where the epoch in progress stands, else the next one."""
        active = self.active
        if active is not None and not active.finished:
            return {"epoch": active.epoch, "position": active.position}
        return {"epoch": self.epoch, "position": self.position}

    @staticmethod
    def check_state(state: Dict[str, Any]) -> None:
        """Raise unless ``state`` holds an int ``epoch`` and ``position``, both >= 0 — checked
        when loading, not at the next iteration, where a negative or fractional position would
        silently skip or garble samples."""
        missing = [k for k in ("epoch", "position") if k not in state]
        if missing:
            raise ArgumentError(f"state['cursor'] is missing {', '.join(map(repr, missing))}; "
                                "pass the dict gpuloader.DataLoader.state_dict() returned")
        for key in ("epoch", "position"):
            int_at_least(f"state['cursor'][{key!r}]", state[key], 0, "an int >= 0")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue at a checked state's epoch and position (see :meth:`check_state`)."""
        self.end()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class OrderSpec:
    """What the order of every epoch of one loader is made from (NOTE(epoch-order) in
    order.py): ``kind`` ("sequential", "shuffle", "block") with ``seed``, sharded over
    ``world``; or, when given, a user's ``sampler`` (its own order, kept exactly).

    ``length`` returns the dataset's length (None for a dataset without one); ``block_length``
    is the storage block of the "block" order.  ``seed`` is None when torch's sampler makes the
    order (generic path).
    """

    def __init__(self, kind: str, seed: Optional[int], world: World, *,
                 length: Callable[[], Optional[int]], block_length: int, drop_last: bool,
                 sampler: Any = None) -> None:
        self.kind = kind
        self.seed = seed
        self.world = world
        self.length = length
        self.block_length = block_length
        self.drop_last = drop_last
        self.sampler = sampler

    @classmethod
    def make(cls, order: Optional[str], *, shuffle: Optional[bool], seed: Optional[int],
             generator: Any, world: World, dataset: Any, own: bool, block_length: int,
             drop_last: bool, sampler: Any, batch_sampler: Any) -> "OrderSpec":
        """A loader's order from its arguments.  The seed is drawn once per loader when
        gpuloader makes the order (``own``: the fast path or distributed=True; or seed/order
        given); otherwise torch's sampler (and its use of torch's RNG) is left alone: seed
        None."""
        kind = order or ("shuffle" if shuffle else "sequential")
        drawn: Optional[int] = None
        if own or seed is not None or order is not None:
            # Only a random order of gpuloader's own draws a seed: sequential orders and user
            # samplers do not depend on it, and drawing would shift torch's global RNG for the
            # rest of the program (torch's DataLoader draws nothing at construction).
            random_order = kind != "sequential" and sampler is None and batch_sampler is None
            drawn = resolve_seed(seed, generator) if seed is not None or random_order else 0
            if seed is None and world.use_collectives:
                # Every rank must shard the same order, but a drawn seed comes from each rank's
                # own RNG (often seeded per rank): agree on one (one collective, at construction).
                drawn = world.min(drawn)
        return cls(kind, drawn, world,
                   length=lambda: len(dataset) if hasattr(dataset, "__len__") else None,
                   block_length=block_length, drop_last=drop_last, sampler=sampler)

    def shard_len(self) -> int:
        """Samples this rank visits per epoch."""
        n = self.shard_total()
        if self.world.world_size == 1:
            return n
        return shard_size(n, self.world.world_size, self.drop_last)

    def shard_total(self) -> int:
        """Samples in the dataset (the length of a sized dataset)."""
        n = self.length()
        assert n is not None, "only sized datasets have an order"
        return n

    def positions(self, epoch: int) -> Tuple[Union[np.ndarray, EpochOrder], bool]:
        """(order of dataset positions, sort each batch by index?) for ``epoch`` on this rank:
        an O(1)-memory EpochOrder (order.py) of gpuloader's own, or a user sampler's array."""
        if self.sampler is not None:
            return index_array(self.sampler, "sampler"), False
        order = EpochOrder(self.kind, self.shard_total(), seed=self.seed, epoch=epoch,
                           rank=self.world.rank, world_size=self.world.world_size,
                           block_length=self.block_length, drop_last=self.drop_last)
        # Random orders are sorted within each batch (one coalesced read); the sequential order
        # keeps the dataset's own order, so a Subset's batches equal torch's.
        return order, self.kind != "sequential"

    def state_dict(self) -> Dict[str, Any]:
        """``{"kind", "seed", "world_size", "dataset_len"}`` (see DataLoader's docstring)."""
        return {"kind": self.kind, "seed": self.seed, "world_size": self.world.world_size,
                "dataset_len": self.length()}

    def check_state(self, state: Dict[str, Any]) -> None:
        """Raise ArgumentError / ArgumentTypeError unless :meth:`state_dict` output ``state``
        fits this order: same kind, world size and dataset length; the seed an int or None."""
        missing = [k for k in ("kind", "seed", "world_size", "dataset_len") if k not in state]
        if missing:
            raise ArgumentError(f"state['order'] is missing {', '.join(map(repr, missing))}; "
                                "pass the dict gpuloader.DataLoader.state_dict() returned")
        if state["seed"] is not None:
            as_int("state['order']['seed']", state["seed"], "an int or None")
        if state["world_size"] != self.world.world_size:
            raise ArgumentError(
                f"state was saved with world_size={state['world_size']} but this loader runs "
                f"with world_size={self.world.world_size}; resume with the same number of ranks "
                "or start the epoch over (set_epoch)")
        n = self.length()
        if state["dataset_len"] is not None and state["dataset_len"] != n:
            raise ArgumentError(f"state was saved for a dataset of {state['dataset_len']} "
                                f"samples, but this loader's dataset has {n}")
        if state["kind"] != self.kind:
            raise ArgumentError(f"state was saved with order={state['kind']!r}, but this "
                                f"loader uses order={self.kind!r}")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Take the seed of a checked state (None: torch's sampler makes the order)."""
        self.seed = None if state["seed"] is None else int(state["seed"])
