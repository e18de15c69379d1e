"""gpuloader.DataLoader: torch's DataLoader plus batched reads, device staging and sized batches.

Two paths share one class.  The *fast path* (ArrayDataset, TensorDataset, and Subsets of them)
reads each batch with one sorted gather into preallocated buffers on background threads (see
fastpath.py).  The *generic path* (any other dataset) runs torch's own machinery — samplers,
worker processes, default_collate — and adds device transfer, live batch sizes, ``oom_guard``,
``accumulate``, ``stats`` and ``state_dict`` on top (see generic.py).  This module only checks
arguments, picks the path and wires the stages: the live size is AdaptiveBatch's
(adaptive.py), the epochs are EpochTracker's and OrderSpec's (epoch.py).

Batch lifetime: batches on the CPU are the caller's to keep.  Batches on a CUDA device are views
of staging slots and stay valid until ``prefetch_depth + 1`` more batches have been drawn
(NOTE(slot-lifetime) in buffers.py); ``reuse_buffers=False`` gives fresh tensors instead.
Use them on the stream current when they were drawn, or ``record_stream`` another stream
(NOTE(stream-rule) in streams.py).

NOTE(no-cycles): nothing a loader owns refers back to it — not its samplers, sizing, packers or
epoch tracker — so ``del loader`` frees it (and stops its reader threads and worker processes)
at once, as with torch, without waiting for the cycle collector.  The iterator of a running
epoch does hold its loader (``EpochCursor.keep_alive``), so ``next(iter(DataLoader(...)))``
works.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, Iterator, Optional, TypeVar, Union

import torch
import torch.utils.data as tud

from gpuloader import adaptive
from gpuloader.adaptive import AdaptiveBatch, planned_size
from gpuloader.allocator import StepMemory
from gpuloader.arguments import (BatchSize, check_batch_size, check_combination,
                                 check_state_layout)
from gpuloader.buffers import ring_slots
from gpuloader.checks import check_loader_options, int_at_least
from gpuloader.devices import DeviceArg, resolve_device
from gpuloader.epoch import EpochTracker, OrderSpec
from gpuloader.ecosystem import FrameworkHooks
from gpuloader.errors import ArgumentError
from gpuloader.fastpath import FastEpochIterator, FastPath
from gpuloader.generic import (GenericEpochIterator, OrderSampler, SizedBatchSampler,
                               replace_guarded, sizer_config, start_generic_epoch)
from gpuloader.planning import CostModel, FreeMemory, SizingOptions, warn_whole_dataset
from gpuloader.probes import probe_for, validate_memory_budget
from gpuloader.stats import LoaderStats
from gpuloader.streams import StreamCopier, use_on_stream
from gpuloader.tokenplan import check_token_bytes_use, planner_factory, validate_token_bytes
from gpuloader.tokens import RaggedWiring, TokenEpochs
from gpuloader.views import ArrayView, array_view
from gpuloader.world import World

T_co = TypeVar("T_co", covariant=True)
STATE_VERSION = 3  # 2: orders computed per span (order.ORDER_VERSION 2); 3: nested by owner


class DataLoader(FrameworkHooks, tud.DataLoader[T_co]):
    """A drop-in ``torch.utils.data.DataLoader`` (same arguments, same batches) that also reads
    array datasets in batches, stages them on a device, and sizes batches from free memory.

    gpuloader's options are keyword-only and change nothing but speed at their defaults:

    - ``device``: None keeps batches on the CPU (like torch); "cuda", "cuda:N", "cpu", "auto".
    - ``order``: "sequential", "shuffle" or "block" (chunk-local shuffle); default from shuffle.
    - ``prefetch_depth``: batches read ahead on the fast path (any num_workers), default 2.
    - ``reader_threads``: fast-path reader threads (default: half the CPUs, 1 to 4).
    - ``memory_fraction``, ``memory_budget`` (bytes), ``sample_bytes`` (bytes one sample costs in
      the step), ``min_batch_size``, ``max_batch_size``: how ``batch_size="auto"`` is sized.
      On a dataset with a ragged field "auto" plans ``max_tokens``; ``token_bytes`` (bytes one
      padded token costs in the step) plays the part of ``sample_bytes`` (tokenplan.py).
    - ``seed``: the order's seed (default: drawn once from ``generator`` or torch's RNG).
    - ``distributed``: shard every epoch over the initialised torch.distributed group.
    - ``reuse_buffers``: device batches are views of staging slots (see the module docstring).

    ``loader.batch_size`` is always the current size, an int, also under "auto".

    ``state_dict()`` is plain data (JSON-safe), nested by owner, format version 3::

        {"version": 3,
         "cursor": {"epoch": int, "position": int},   # samples of that epoch consumed
         "order":  {"kind": "sequential" | "shuffle" | "block", "seed": int | None,
                    "world_size": int, "dataset_len": int | None},
         "sizing": {"current": int, "cooldown": int} | None}   # None: sizes are not gpuloader's

    ``load_state_dict`` refuses other versions (1: orders were materialised permutations, so a
    resume would deliver other samples; 2: the same orders, not yet nested by owner), another
    world size, dataset length or order kind, with a message saying which.
    """

    def __init__(self, dataset: tud.Dataset, batch_size: BatchSize = 1,
                 shuffle: Optional[bool] = None, sampler: Any = None, batch_sampler: Any = None,
                 num_workers: int = 0, collate_fn: Any = None, pin_memory: bool = False,
                 drop_last: bool = False, timeout: float = 0, worker_init_fn: Any = None,
                 multiprocessing_context: Any = None, generator: Optional[torch.Generator] = None,
                 *, prefetch_factor: Optional[int] = None, persistent_workers: bool = False,
                 pin_memory_device: str = "", in_order: bool = True,
                 device: DeviceArg = None, order: Optional[str] = None, prefetch_depth: int = 2,
                 reader_threads: Optional[int] = None, memory_fraction: float = 0.8,
                 memory_budget: Optional[int] = None, sample_bytes: int = 0,
                 min_batch_size: int = 1, max_batch_size: Optional[int] = None,
                 seed: Optional[int] = None, distributed: bool = False,
                 reuse_buffers: bool = True, max_tokens: Optional[int] = None,
                 pad_value: Any = 0, pad_to_multiple_of: int = 1, packed: bool = False,
                 bucket_window: Optional[int] = None, token_bytes: int = 0) -> None:
        batch_size = check_batch_size(batch_size)
        check_loader_options(num_workers=num_workers, prefetch_depth=prefetch_depth,
                             reuse_buffers=reuse_buffers)
        auto = batch_size == "auto"
        check_combination(dataset, auto, shuffle, sampler, batch_sampler, order, distributed)
        super().__init__(dataset, 1 if auto else batch_size, shuffle, sampler, batch_sampler,
                         num_workers, collate_fn, pin_memory, drop_last, timeout, worker_init_fn,
                         multiprocessing_context, generator, prefetch_factor=prefetch_factor,
                         persistent_workers=persistent_workers,
                         pin_memory_device=pin_memory_device, in_order=in_order)
        self._user_collate = collate_fn
        self._user_sampler = sampler
        self._user_batch_sampler = batch_sampler
        self.device = resolve_device(device)
        self.prefetch_depth = int_at_least("prefetch_depth", prefetch_depth, 0, "an int >= 0")
        # Default: half the cores (at most 4), leaving the rest to torch's compute threads;
        # numpy's gather holds the GIL, so more readers mostly add contention.
        self.reader_threads = (min(4, max(1, (os.cpu_count() or 1) // 2))
                               if reader_threads is None else
                               int_at_least("reader_threads", reader_threads, 1,
                                            "a positive int or None"))
        self.memory_budget = validate_memory_budget(memory_budget)
        options = SizingOptions(memory_fraction, sample_bytes, min_batch_size, max_batch_size)
        self.memory_fraction, self.sample_bytes = options.memory_fraction, options.sample_bytes
        self.min_batch_size, self.max_batch_size = options.min_batch_size, options.max_batch_size
        self.reuse_buffers = bool(reuse_buffers)
        self.token_bytes = validate_token_bytes(token_bytes)
        self._world = World.detect(bool(distributed), device=self.device)
        self._stats = LoaderStats()
        self._lock = threading.RLock()
        self._epochs = EpochTracker()
        self._base_seed_drawn = False
        self._closed = False
        self._copier: Optional[StreamCopier] = None  # generic path to a CUDA device
        # Guarded steps' view of the CUDA allocator; learns step peaks only under "auto".
        self._memory = StepMemory(self.device, learn=batch_size == "auto") \
            if self.device is not None and self.device.type == "cuda" else None
        self._view: Optional[ArrayView] = None
        if batch_size is not None and not isinstance(dataset, tud.IterableDataset) and not (
                num_workers > 0 and worker_init_fn is not None):
            self._view = array_view(dataset)
        self._free = FreeMemory(probe_for(self.device or torch.device("cpu"), self.memory_budget))
        self._ragged = RaggedWiring.build(
            dataset, self._view, batch_size=batch_size, sampler=sampler,
            batch_sampler=batch_sampler, collate_fn=collate_fn, max_tokens=max_tokens,
            pad_value=pad_value, pad_to_multiple_of=pad_to_multiple_of, packed=packed,
            bucket_window=bucket_window, max_samples=max_batch_size,
            planner=planner_factory(self._free, options, self.token_bytes,
                                    ring_slots(self.prefetch_depth), self.memory_budget))
        check_token_bytes_use(self.token_bytes, batch_size, ragged=self._ragged is not None)
        self._tokens = self._ragged.epochs if self._ragged is not None else None
        self._order = OrderSpec.make(
            order, shuffle=shuffle, seed=seed, generator=generator, world=self._world,
            dataset=dataset, own=self._view is not None or distributed,
            block_length=self._view.block_length if self._view is not None else 1,
            drop_last=self.drop_last, sampler=sampler, batch_sampler=batch_sampler)
        if self._order.seed is not None and self._view is None and sampler is None and \
                batch_sampler is None:
            replace_guarded(self, "sampler", OrderSampler(self._order))
        self._sizer_config = sizer_config(dataset, self._view, self._order, ring_slots(
            self.prefetch_depth), options, self._memory is not None)
        # The live size, unless torch's batch_sampler, the dataset, or batch_size=None set the
        # sizes (torch's batch_size is None with a batch_sampler).
        self._sizing = None if batch_size is None or isinstance(dataset, tud.IterableDataset) \
            or batch_sampler is not None else AdaptiveBatch.make(
                batch_size, options=options, config=self._sizer_config, free=self._free,
                world=self._world, stats=self._stats, device=self.device,
                budget=self.memory_budget,
                max_tokens=self._tokens.options.max_tokens if self._tokens is not None else None)
        if self._tokens is not None and self._sizing is not None:
            self._tokens.agree(self._sizing)  # NOTE(auto-tokens) in tokenplan.py
        elif self._sizing is not None and self._sizing.auto and max_batch_size is None:
            warn_whole_dataset(self._sizing.current, len(dataset), self.device)
        if self._view is None and self._sizing is not None and batch_sampler is None:
            # Replace torch's fixed-size BatchSampler by one that reads the live size, so
            # out-of-memory shrinking and "auto" apply to the generic path too.
            replace_guarded(self, "batch_sampler",
                             SizedBatchSampler(self.sampler, self._sizing, drop_last))
        self._fast: Optional[FastPath] = None
        if self._view is not None:
            cuda = self.device is not None and self.device.type == "cuda"
            self._fast = FastPath(
                self._view, sizing=self._sizing, stats=self._stats, free=self._free,
                budgeted=self.memory_budget is not None, device=self.device,
                prefetch_depth=self.prefetch_depth, reader_threads=self.reader_threads,
                num_workers=num_workers, context=self.multiprocessing_context,
                pin=bool(self.pin_memory) and torch.cuda.is_available() and not cuda,
                reuse_buffers=self.reuse_buffers, collate=collate_fn, ragged=self._ragged)

    # ------------------------------------------------------------------ live attributes
    @property  # type: ignore[override]
    def batch_size(self) -> Optional[int]:
        """The current batch size (an int even under "auto"), or None without batching."""
        sizing = getattr(self, "_sizing", None)  # torch's __init__ reads it before it exists
        if getattr(self, "_tokens", None) is not None:
            return self._tokens.options.max_samples  # a cap (None: none); sizes vary
        if sizing is not None:
            return sizing.current
        return getattr(self, "_torch_batch_size", None)

    @batch_size.setter
    def batch_size(self, value: Optional[int]) -> None:
        # Reached only from torch's __init__: afterwards torch's __setattr__ refuses batch_size.
        self._torch_batch_size = value

    @property
    def order(self) -> str:
        """The order's kind: "sequential", "shuffle" or "block"."""
        return self._order.kind

    @property
    def seed(self) -> Optional[int]:
        """The order's seed (None when torch's sampler makes the order)."""
        return self._order.seed

    @property
    def world(self) -> World:
        """The ranks this loader shards over and agrees sizes with."""
        return self._world

    @world.setter
    def world(self, world: World) -> None:
        self._world = self._order.world = world
        if self._sizing is not None:
            self._sizing.world = world

    @property
    def cost_model(self) -> Optional[CostModel]:
        """Peak step memory learned against batch size (None when sizes are not gpuloader's)."""
        return self._sizing.cost_model if self._sizing is not None else None

    @property
    def max_tokens(self) -> Optional[int]:
        """The live token budget (padded tokens per batch; ``oom_guard`` shrinks it), or None
        when batches are not sized by tokens."""
        return self._sizing.current if self._tokens is not None and self._sizing else None

    def plan_batch_size(self) -> int:
        """The size ``batch_size="auto"`` picks now, agreed (minimum) over distributed ranks."""
        if self._sizing is not None:
            return self._sizing.plan()
        return planned_size(self._free, self._sizer_config(), self._world)

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run ``epoch`` (its order depends on it, as with
        DistributedSampler).  Setting the epoch a loaded state resumes keeps its position."""
        self._epochs.set_epoch(epoch)
        if self._user_sampler is not None and hasattr(self._user_sampler, "set_epoch"):
            self._user_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        return self._start_epoch(None)

    def _start_epoch(self, step: Optional[int]) -> Union[FastEpochIterator,
                                                         GenericEpochIterator]:
        """Start the next epoch; with ``step``, batches never straddle a multiple of it."""
        if self._closed:
            raise RuntimeError("this gpuloader.DataLoader was closed; create a new one")
        with self._lock:
            self._epochs.end()
            if self._fast is not None:
                self._fast.drain()  # reads of an epoch whose iterator was dropped mid-way
            epoch, start = self._epochs.epoch, self._epochs.position
            iterator: Union[FastEpochIterator, GenericEpochIterator]
            if self._fast is not None:
                iterator = self._fast_iterator(epoch, start, step)
            else:
                iterator = self._generic_iterator(epoch, start, step)
            # Only once the epoch really started: if starting it raised (a state that does not
            # fit, a dataset error while replaying up to ``start``), the loaded state stays.
            iterator.keep_alive = self  # NOTE(no-cycles)
            self._epochs.begin(iterator)
            return iterator

    def _draw_torch_base_seed(self) -> None:
        """Draw from torch's RNG as torch's iterator does at each epoch start (one int64 from
        ``generator`` or the global RNG; once with persistent workers): samplers sharing it, and
        the rest of the program, see the numbers they would with torch's DataLoader."""
        if self.persistent_workers and self._base_seed_drawn:
            return
        self._base_seed_drawn = True
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)

    def _generic_iterator(self, epoch: int, start: int,
                          step: Optional[int]) -> GenericEpochIterator:
        if self._copier is None and self.device is not None and self.device.type == "cuda":
            self._copier = StreamCopier(self.device)
        return start_generic_epoch(super().__iter__, self.sampler, self.batch_sampler, epoch,
                                   start, step, sizing=self._sizing, copy=self._copier,
                                   stats=self._stats, keep_workers=self.persistent_workers)

    def _fast_iterator(self, epoch: int, start: int, step: Optional[int]) -> FastEpochIterator:
        # torch calls iter(batch_sampler) before it draws its base seed, and iterates a sampler
        # (through its lazy BatchSampler) after: keep that order of RNG use.
        batches = iter(self._user_batch_sampler) if self._user_batch_sampler is not None \
            else None
        self._draw_torch_base_seed()
        order, sort = self._order.positions(epoch)
        boundaries = order_lengths = None
        if self._tokens is not None:  # NOTE(token-plan) in tokens.py
            order, boundaries, order_lengths = self._tokens.epoch_spans(self._order, epoch, step)
        assert self._fast is not None
        return self._fast.epoch(epoch, order, start, sort=sort, step=step, batches=batches,
                                drop_last=self.drop_last and batches is None,
                                boundaries=boundaries, order_lengths=order_lengths)

    # ------------------------------------------------------------------ torch API
    def __len__(self) -> int:
        if self._view is None and self._sizing is None:
            return super().__len__()
        if self._user_batch_sampler is not None:
            return len(self._user_batch_sampler)
        if self._tokens is not None:  # the planned batches (oom_guard may split some)
            return len(self._tokens.plan_epoch(self._order, self._epochs.epoch)[1])
        n = self._order.shard_len() if self._user_sampler is None else len(self._user_sampler)
        size = self.batch_size or 1
        return n // size if self.drop_last else -(-n // size)

    # ------------------------------------------------------------------ gpuloader API
    def stats(self) -> Dict[str, Any]:
        """Counters since construction (or ``stats_reset()``): samples, batches, bytes,
        seconds waited / reading / copying, stall fraction, rates, batch-size history,
        ``max_tokens`` (the live token budget, None unless batching by tokens), and
        ``oom_count``, the out-of-memory rollbacks."""
        snap = self._stats.snapshot()
        snap["path"] = self.path
        snap["batch_size"], snap["max_tokens"] = self.batch_size, self.max_tokens
        # NOTE(user-peak) in allocator.py: the peak torch would report without guard resets.
        snap["max_memory_allocated"] = self._memory.max_memory_allocated() \
            if self._memory is not None else None
        return snap

    @property
    def path(self) -> str:
        """NOTE(paths): "fast" (batched reads of an array dataset, read ahead by gpuloader) or
        "generic" (torch's own fetching through ``__getitem__``/``__getitems__``)."""
        return "fast" if self._view is not None else "generic"

    def __repr__(self) -> str:
        size = "auto" if self._sizing is not None and self._sizing.auto else self.batch_size
        return (f"gpuloader.DataLoader({type(self.dataset).__name__}, path={self.path!r}, "
                f"batch_size={size!r}, device={self.device}, num_workers={self.num_workers})")

    def stats_reset(self) -> None:
        """Start a new measurement window for :meth:`stats`."""
        self._stats.reset()

    def state_dict(self) -> Dict[str, Any]:
        """Where this loader stands, in O(1) plain data (format: the class docstring).

        A batch counts as consumed once delivered, unless ``oom_guard`` rolled it back; batches
        read ahead but not delivered are not consumed.
        """
        return {"version": STATE_VERSION, "cursor": self._epochs.state_dict(),
                "order": self._order.state_dict(),
                "sizing": self._sizing.state_dict() if self._sizing is not None else None,
                "tokens": self._tokens.state_dict() if self._tokens is not None else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` output: the next iteration continues that epoch.
        Everything is checked before anything changes."""
        check_state_layout(state, STATE_VERSION)
        EpochTracker.check_state(state["cursor"])
        self._order.check_state(state["order"])
        sizing = state["sizing"] if self._sizing is not None else None
        if sizing is not None:
            AdaptiveBatch.check_state(sizing)
        tokens = state.get("tokens") if self._tokens is not None else None
        if tokens is not None:
            TokenEpochs.check_state(tokens)
        with self._lock:
            if tokens is not None:
                self._tokens.load_state_dict(tokens)  # type: ignore[union-attr]
            self._epochs.load_state_dict(state["cursor"])
            self._order.load_state_dict(state["order"])
            if sizing is not None:
                self._sizing.load_state_dict(sizing)  # type: ignore[union-attr]

    def oom_guard(self, optimizer: Any = None) -> adaptive.OomGuard:
        """Context manager around one training step: on out-of-memory, zero the gradients of
        ``optimizer`` (anything with ``zero_grad``: the optimizer, or the model), free memory,
        shrink the batch size and re-deliver the failed samples.  Run the step in a function,
        so the failed step's activations die with its frame (README)."""
        return adaptive.OomGuard(self._epochs, self._sizing, self._world, optimizer,
                                 memory=self._memory)

    def record_stream(self, batch: Any, stream: Any) -> None:
        """Let CUDA ``stream`` use ``batch``, just drawn, besides the stream current at the
        draw (NOTE(stream-rule) in streams.py); call it on that stream.  No-op off CUDA."""
        if self.device is not None and self.device.type == "cuda":
            res = self._fast.resources if self._fast is not None else None
            use_on_stream(batch, stream, device=self.device,
                          ring=res.device_ring if res is not None else None)

    def accumulate(self, global_batch_size: Optional[int] = None, *,
                   global_tokens: Optional[int] = None) -> Iterator[adaptive.Step]:
        """Steps of exactly ``global_batch_size`` samples -- or, on a token budget, of at most
        ``global_tokens`` real tokens (NOTE(token-steps)) -- made of memory-sized micro-batches;
        each step yields ``(batch, weight)``, weights summing to 1 (token shares with
        ``global_tokens``, so a per-token mean loss times the weight is exact)."""
        size, tokens = adaptive.check_accumulate(global_batch_size, global_tokens)
        if self._sizing is None:
            raise ArgumentError("accumulate() needs batches gpuloader sizes; this loader was "
                                "built with batch_size=None, a batch_sampler, or an "
                                "IterableDataset")
        if tokens is not None and self._tokens is None:
            raise ArgumentError(f"accumulate(global_tokens={tokens}) needs a token budget: "
                                'max_tokens= or batch_size="auto" on a dataset with a ragged '
                                "field; use global_batch_size for fixed-size samples")
        if tokens is not None:
            yield from adaptive.accumulate_tokens(self._sizing, self._start_epoch(None), tokens)
            return
        yield from adaptive.accumulate(self._sizing, self._start_epoch(size), size,
                                       drop_last=self.drop_last)

    def close(self) -> None:
        """Stop reader threads and worker processes; idempotent.  The loader cannot be
        iterated afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._epochs.end()
            if self._fast is not None:
                self._fast.close()
            iterator = getattr(self, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            self._iterator = None

    def __enter__(self) -> "DataLoader[T_co]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone already
            pass
