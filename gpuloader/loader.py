"""gpuloader.DataLoader: torch's DataLoader plus batched reads, device staging and sized batches.

Two paths share one class.  The *fast path* (ArrayDataset, TensorDataset, and Subsets of them)
reads each batch with one sorted gather into preallocated buffers on background threads (see
fastpath.py).  The *generic path* (any other dataset) runs torch's own machinery — samplers,
worker processes, default_collate — and adds device transfer, live batch sizes, ``oom_guard``,
``accumulate``, ``stats`` and ``state_dict`` on top (see generic.py).

Batch lifetime: batches on the CPU are the caller's to keep.  Batches on a CUDA device are views
of staging slots and stay valid until ``prefetch_depth + 1`` more batches have been drawn
(NOTE(slot-lifetime) in buffers.py); ``reuse_buffers=False`` gives fresh tensors instead.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Dict, Iterator, Optional, TypeVar, Union

import numpy as np
import torch
import torch.utils.data as tud

from gpuloader import adaptive
from gpuloader.buffers import DeviceRing, HostRing
from gpuloader.devices import DeviceArg, resolve_device
from gpuloader.ecosystem import LIGHTNING_HINT, FrameworkHooks
from gpuloader.errors import ArgumentError, ArgumentTypeError, describe
from gpuloader.epoch import EpochCursor
from gpuloader.fastpath import INLINE_BATCH_BYTES, FastEpochIterator, FastResources
from gpuloader.generic import (GenericEpochIterator, OrderSampler, SizedBatchSampler,
                               sample_nbytes_of)
from gpuloader.memory import (CostModel, SizerConfig, plan_batch_size, probe_for,
                              validate_batch_bounds, validate_memory_budget,
                              validate_memory_fraction, validate_sample_bytes)
from gpuloader.order import EpochOrder, check_order, resolve_seed
from gpuloader.processes import ProcessReaderPool, needs_processes
from gpuloader.readers import ReaderPool
from gpuloader.sizing import SizeController
from gpuloader.stats import LoaderStats
from gpuloader.streams import StreamCopier
from gpuloader.views import ArrayView, array_view
from gpuloader.world import World

T_co = TypeVar("T_co", covariant=True)
BatchSize = Union[int, str, None]
STATE_VERSION = 2  # 2: orders computed per span (order.ORDER_VERSION 2)
REPLAN_STEPS = 16  # successful guarded steps between re-plans from the learned cost


class _BatchSizeTypeError(ArgumentTypeError, ValueError):
    """A batch_size of the wrong type: a TypeError as gpuloader's errors are, and the
    ValueError torch's DataLoader raises for it, so ``except ValueError`` code keeps working."""


def _check_batch_size(batch_size: object) -> BatchSize:
    if batch_size is None or (isinstance(batch_size, str) and batch_size == "auto"):
        return batch_size  # type: ignore[return-value]
    # Each message starts with torch's own (BatchSampler's), which drop-in callers may match.
    torch_message = ("batch_size should be a positive integer value, but got "
                     f"batch_size={batch_size}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise _BatchSizeTypeError(f'{torch_message}; batch_size must be a positive int, None, '
                                  f'or "auto"; got {describe(batch_size)}')
    if batch_size <= 0:
        raise ArgumentError(f'{torch_message}; batch_size must be a positive int, None, or '
                            f'"auto" (use batch_size=None to disable batching)')
    return int(batch_size)


def _check_count(name: str, value: object, low: int, accepted: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be {accepted}; got {describe(value)}")
    if value < low:
        raise ArgumentError(f"{name} must be {accepted}; got {value}")
    return int(value)


def _weak_method(method: Any) -> Any:
    """``method`` (bound to a loader) as a callable that does not keep the loader alive.

    NOTE(no-cycles): nothing a loader owns may refer back to it strongly — not its samplers,
    size controller, packers or epoch iterators' registry — so ``del loader`` frees it (and
    stops its reader threads and worker processes) at once, as with torch, without waiting for
    the cycle collector.  The iterator of a running epoch does hold its loader, so
    ``next(iter(DataLoader(...)))`` works.
    """
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        bound = ref()
        if bound is None:
            raise ReferenceError("the gpuloader.DataLoader this belongs to was deleted")
        return bound(*args)

    return call


class _StoppedEpoch(EpochCursor):
    """What is left of an epoch whose iterator was dropped before its end (NOTE(no-cycles)):
    its cursor, enough for ``state_dict()`` and for ``oom_guard`` to roll back its last batch.
    Nothing is re-delivered from it; ``iter(loader)`` starts the next epoch."""

    def __init__(self, epoch: int, position: int, last_start: int, last_length: int) -> None:
        super().__init__(epoch, position)
        self.last_start, self.last_length = last_start, last_length

    def rewind(self, position: int) -> None:
        self.position = position

    def close(self) -> None:
        self.finished = True


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
    - ``seed``: the order's seed (default: drawn once from ``generator`` or torch's RNG).
    - ``distributed``: shard every epoch over the initialised torch.distributed group.
    - ``reuse_buffers``: device batches are views of staging slots (see the module docstring).

    ``loader.batch_size`` is always the current size, an int, also under "auto".
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
                 reuse_buffers: bool = True) -> None:
        batch_size = _check_batch_size(batch_size)
        auto = batch_size == "auto"
        if auto and batch_sampler is not None:
            raise ArgumentError('batch_size="auto" is mutually exclusive with batch_sampler; '
                                "pass one or the other")
        if auto and isinstance(dataset, tud.IterableDataset):
            raise ArgumentError(f'batch_size="auto" needs a map-style dataset (it sizes batches '
                                f"from a sample's bytes and the dataset's length); got the "
                                f"IterableDataset {type(dataset).__name__}: pass an int "
                                "batch_size")
        if order is not None:
            check_order(order)
            if shuffle and order == "sequential":
                raise ArgumentError('order="sequential" contradicts shuffle=True; pass '
                                    'order="shuffle" or "block", or shuffle=False')
            if sampler is not None or batch_sampler is not None:
                raise ArgumentError(f"order={order!r} is mutually exclusive with sampler/"
                                    "batch_sampler, which already define the order")
        if distributed and (sampler is not None or batch_sampler is not None):
            raise ArgumentError("distributed=True shards gpuloader's own order and is mutually "
                                "exclusive with sampler/batch_sampler; pass a DistributedSampler "
                                f"as sampler with distributed=False instead ({LIGHTNING_HINT})")
        super().__init__(dataset, 1 if auto else batch_size, shuffle, sampler, batch_sampler,
                         num_workers, collate_fn, pin_memory, drop_last, timeout, worker_init_fn,
                         multiprocessing_context, generator, prefetch_factor=prefetch_factor,
                         persistent_workers=persistent_workers,
                         pin_memory_device=pin_memory_device, in_order=in_order)
        self._requested_batch_size = batch_size
        self._user_collate = collate_fn
        self._user_sampler = sampler
        self._user_batch_sampler = batch_sampler
        self.device = resolve_device(device)
        self.order = order or ("shuffle" if shuffle else "sequential")
        self.prefetch_depth = _check_count("prefetch_depth", prefetch_depth, 0, "an int >= 0")
        # Default: half the cores (at most 4), leaving the rest to torch's compute threads;
        # numpy's gather holds the GIL, so more readers mostly add contention.
        self.reader_threads = (min(4, max(1, (os.cpu_count() or 1) // 2))
                               if reader_threads is None else
                               _check_count("reader_threads", reader_threads, 1,
                                            "a positive int or None"))
        self.memory_fraction = validate_memory_fraction(memory_fraction)
        self.memory_budget = validate_memory_budget(memory_budget)
        self.sample_bytes = validate_sample_bytes(sample_bytes)
        self.min_batch_size, self.max_batch_size = validate_batch_bounds(min_batch_size,
                                                                         max_batch_size)
        self.reuse_buffers = bool(reuse_buffers)
        self.world = World.detect(bool(distributed), device=self.device)
        self._stats = LoaderStats()
        self._lock = threading.RLock()
        self._epoch = 0
        self._resume_position = 0
        self._active: Optional[Union[FastEpochIterator, GenericEpochIterator]] = None
        self._abandoned: Optional[_StoppedEpoch] = None  # what a dropped iterator left
        self._base_seed_drawn = False
        self._closed = False
        self._pool: Optional[ReaderPool] = None
        self._resources: Optional[FastResources] = None
        self._copier: Optional[StreamCopier] = None  # generic path to a CUDA device
        self.cost_model = CostModel()
        self._step_start: Optional[int] = None  # set by accumulate() while a step runs
        self._guarded_steps = 0  # successful oom_guard steps (NOTE(learned-cost))
        self._capacity = 0

        self._view: Optional[ArrayView] = None
        if batch_size is not None and not isinstance(dataset, tud.IterableDataset) and not (
                num_workers > 0 and worker_init_fn is not None):
            self._view = array_view(dataset)
        # The order's seed is drawn once per loader when gpuloader makes the order; the generic
        # path otherwise leaves torch's sampler (and its use of torch's RNG) untouched.
        own_order = self._view is not None or seed is not None or order is not None or distributed
        # Only a random order of gpuloader's own draws a seed: sequential orders and user
        # samplers do not depend on it, and drawing would shift torch's global RNG for the rest
        # of the program (torch's DataLoader draws nothing at construction).
        random_order = (self.order != "sequential" and sampler is None and batch_sampler is None)
        self.seed: Optional[int] = None
        if own_order:
            self.seed = resolve_seed(seed, generator) if seed is not None or random_order else 0
        if seed is None and self.seed is not None and self.world.use_collectives:
            # Every rank must shard the same order, but a drawn seed comes from each rank's own
            # RNG (often seeded per rank): agree on one (a single collective, at construction).
            self.seed = self.world.min(self.seed)
        if own_order and self._view is None and sampler is None and batch_sampler is None:
            object.__setattr__(self, "sampler", OrderSampler(weakref.proxy(self)))
        self._controller = self._make_controller(batch_size)
        if self._view is None and self._controller is not None and batch_sampler is None:
            # Replace torch's fixed-size BatchSampler by one that reads the live size, so
            # out-of-memory shrinking and "auto" apply to the generic path too.
            self._swap_batch_sampler(SizedBatchSampler(self.sampler, self._controller,
                                                       drop_last))

    # ------------------------------------------------------------------ sizing
    def _staging_bytes_per_sample(self) -> int:
        if self._view is not None:
            return self._view.sample_nbytes
        return sample_nbytes_of(self.dataset)

    def _ring_slots(self) -> int:
        return self.prefetch_depth + 2

    def _sizer_config(self) -> SizerConfig:
        return SizerConfig(staging_bytes_per_sample=self._staging_bytes_per_sample(),
                           ring_slots=self._ring_slots(), dataset_len=max(1, self._shard_len()),
                           memory_fraction=self.memory_fraction, sample_bytes=self.sample_bytes,
                           min_batch_size=self.min_batch_size, max_batch_size=self.max_batch_size)

    def _free_bytes(self) -> int:
        """Free memory for batches (bytes): the probe's figure plus the staging ring's own
        bytes once it is allocated, since the plan counts the ring as part of the cost."""
        free = probe_for(self.device or torch.device("cpu"), self.memory_budget).read().free
        res = self.__dict__.get("_resources")
        if res is not None and res.device_ring is not None and self.memory_budget is None:
            free += res.device_ring.nbytes
        return free

    def plan_batch_size(self) -> int:
        """The size ``batch_size="auto"`` picks now, agreed (minimum) over distributed ranks."""
        learned = self.cost_model if self.cost_model.has_fit else None
        return self.world.min(plan_batch_size(self._free_bytes(), self._sizer_config(), learned))

    def _make_controller(self, batch_size: BatchSize) -> Optional[SizeController]:
        if batch_size is None or isinstance(self.dataset, tud.IterableDataset) or \
                self._user_batch_sampler is not None:
            return None  # torch's batch_size is None with a batch_sampler: it sets the sizes
        target = self.plan_batch_size() if batch_size == "auto" else int(batch_size)
        self._capacity = target  # the staging ring holds batches of at most this many samples
        agree = _weak_method(self._agree_size) if self.world.use_collectives else None
        return SizeController(target, floor=min(self.min_batch_size, target),
                              free_bytes=_weak_method(self._free_bytes), agree=agree)

    def _agree_size(self, size: int) -> int:
        """The smallest ``size`` over ranks (a collective; NOTE(agreed-growth) in sizing.py).
        Looks ``self.world`` up at call time, so a World built directly in tests is used."""
        return self.world.min(size)

    def _swap_batch_sampler(self, batch_sampler: Any) -> None:
        # torch forbids setting batch_sampler after __init__; this replacement keeps its
        # meaning (same indices, same drop_last) and only lets the size change at run time.
        object.__setattr__(self, "batch_sampler", batch_sampler)

    @property  # type: ignore[override]
    def batch_size(self) -> Optional[int]:
        """The current batch size (an int even under "auto"), or None without batching."""
        controller = self.__dict__.get("_controller")
        if controller is not None:
            return controller.current
        return self.__dict__.get("_torch_batch_size")

    @batch_size.setter
    def batch_size(self, value: Optional[int]) -> None:
        self.__dict__["_torch_batch_size"] = value

    # ------------------------------------------------------------------ orders and epochs
    def _shard_len(self) -> int:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.world.world_size == 1:
            return n
        from gpuloader.order import shard_size
        return shard_size(n, self.world.world_size, self.drop_last)

    def _positions(self, epoch: int) -> tuple:
        """(order of dataset positions, sort within batch?) for ``epoch`` on this rank."""
        if self._user_sampler is not None:
            return np.fromiter((int(i) for i in self._user_sampler), dtype=np.int64), False
        n = len(self.dataset)  # type: ignore[arg-type]
        block = self._view.block_length if self._view is not None else 1
        order = EpochOrder(self.order, n, seed=self.seed, epoch=epoch, rank=self.world.rank,
                           world_size=self.world.world_size, block_length=block,
                           drop_last=self.drop_last)
        # Random orders are sorted within each batch (one coalesced read); the sequential order
        # keeps the dataset's own order, so a Subset's batches equal torch's.
        return order, self.order != "sequential"

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run ``epoch`` (its order depends on it, as with
        DistributedSampler).  Setting the epoch a loaded state resumes keeps its position."""
        epoch = _check_count("epoch", epoch, 0, "an int >= 0")
        if epoch != self._epoch:
            self._resume_position = 0
        self._epoch = epoch
        if self._user_sampler is not None and hasattr(self._user_sampler, "set_epoch"):
            self._user_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        return self._start_epoch(None)

    def _iter_steps(self, step: int) -> Union[FastEpochIterator, GenericEpochIterator]:
        """Start an epoch whose batches never straddle a multiple of ``step`` samples."""
        return self._start_epoch(step)

    def _start_epoch(self, step: Optional[int]) -> Union[FastEpochIterator,
                                                         GenericEpochIterator]:
        if self._closed:
            raise RuntimeError("this gpuloader.DataLoader was closed; create a new one")
        with self._lock:
            if self._active is not None:
                self._active.close()
            if self._pool is not None:
                self._pool.drain()  # reads of an epoch whose iterator was dropped mid-way
            self._abandoned = None
            epoch, start = self._epoch, self._resume_position
            iterator: Union[FastEpochIterator, GenericEpochIterator]
            if self._view is not None:
                iterator = self._fast_iterator(epoch, start, step)
            else:
                iterator = self._generic_iterator(epoch, start, step)
            # Only once the epoch really started: if starting it raised (a state that does not
            # fit, a dataset error while replaying up to ``start``), the loaded state stays.
            self._epoch, self._resume_position = epoch + 1, 0
            # The iterator holds its loader; the loader only refers to it weakly, so dropping
            # the iterator (break) ends the epoch's workers as in torch (NOTE(no-cycles)).
            iterator.on_abandon = self._note_abandoned
            self._active = iterator
            return iterator

    @property
    def _active(self) -> Any:
        """The iterator of the epoch in progress while someone holds it; after it was dropped
        unfinished (a break), the _StoppedEpoch it left; else None."""
        ref = self.__dict__.get("_active_ref")
        live = ref() if ref is not None else None
        return live if live is not None else self.__dict__.get("_abandoned")

    @_active.setter
    def _active(self, iterator: Optional[Union[FastEpochIterator, GenericEpochIterator]]) -> None:
        self.__dict__["_active_ref"] = weakref.ref(iterator) if iterator is not None else None

    def _note_abandoned(self, epoch: int, position: int, last_start: int,
                        last_length: int) -> None:
        """Called when an unfinished epoch's iterator is dropped: state_dict() still reports
        where it stopped, and oom_guard can still roll its last batch back."""
        self._abandoned = _StoppedEpoch(epoch, position, last_start, last_length)

    def _draw_torch_base_seed(self) -> None:
        """Consume torch's RNG as torch's own iterator does at each epoch start (one int64 from
        ``generator``, or the global RNG; once only with persistent workers), so samplers that
        draw from the same RNG — and the rest of the program — see the numbers they would
        with torch's DataLoader."""
        if self.persistent_workers and self._base_seed_drawn:
            return
        self._base_seed_drawn = True
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)

    def _generic_iterator(self, epoch: int, start: int,
                          step: Optional[int]) -> GenericEpochIterator:
        if isinstance(self.sampler, OrderSampler):
            self.sampler.epoch = epoch
        sized = isinstance(self.batch_sampler, SizedBatchSampler)
        if sized:
            self.batch_sampler.skip = start
            self.batch_sampler.step = step
        elif step is not None:
            raise ArgumentError("accumulate() needs gpuloader to form the batches; it cannot "
                                "be combined with a user batch_sampler on this dataset")
        if self._copier is None and self.device is not None and self.device.type == "cuda":
            self._copier = StreamCopier(self.device)
        iterator = GenericEpochIterator(self, super().__iter__(), epoch, start if sized else 0,
                                        copy=self._copier)
        if sized and hasattr(self.sampler, "__len__"):
            iterator.total = len(self.sampler)
        while iterator.position < start:  # deterministic samplers only: replay up to start
            next(iterator)
        return iterator

    def _fast_iterator(self, epoch: int, start: int, step: Optional[int]) -> FastEpochIterator:
        # torch calls iter(batch_sampler) before it draws its base seed, and iterates a sampler
        # (through its lazy BatchSampler) after: keep that order of RNG use.
        batch_iter = iter(self._user_batch_sampler) if self._user_batch_sampler is not None \
            else None
        self._draw_torch_base_seed()
        order, sort = self._positions(epoch)
        boundaries = None
        if step is not None:
            boundaries = np.arange(step, len(order) + step, step, dtype=np.int64)
        capacity = None
        if batch_iter is not None:
            batches = [np.asarray(list(b), dtype=np.int64) for b in batch_iter]
            order = np.concatenate(batches) if batches else np.empty(0, dtype=np.int64)
            ends = np.cumsum([len(b) for b in batches])
            boundaries = ends if boundaries is None else np.union1d(ends, boundaries)
            sort = False
            capacity = max((len(b) for b in batches), default=1)
        if start > len(order):
            raise ArgumentError(f"the loaded state's position {start} is beyond this epoch's "
                                f"{len(order)} samples; was it saved with another dataset?")
        return FastEpochIterator(self._fast_resources(capacity), epoch, order, start, sort=sort,
                                 drop_last=self.drop_last and self._user_batch_sampler is None,
                                 boundaries=boundaries)

    def _fast_resources(self, capacity: Optional[int] = None) -> FastResources:
        """The fast path's readers and rings; ``capacity`` (samples per batch) is given when a
        user batch_sampler sets the sizes (there is no controller then)."""
        res = self._resources
        if res is not None and res.host_ring is not None and capacity is not None and \
                capacity > res.host_ring.slots[0].capacity:
            # A batch sampler's batches outgrew the staging rings: replace them (rare).
            if res.device_ring is not None:
                res.device_ring.close()
            res.host_ring = HostRing(res.fields, capacity, self.prefetch_depth + 2, pin=True)
            res.device_ring = DeviceRing(res.fields, capacity, self.prefetch_depth + 2,
                                         self.device, reuse=self.reuse_buffers)
        if res is not None and isinstance(res.pool, ProcessReaderPool) and \
                capacity is not None and capacity > res.pool.capacity:
            res.pool.close()  # its shared-memory slots are too small for these batches
            res.pool = self._pool = self._make_pool(self._view, capacity)
        if res is not None:
            return res
        view = self._view
        assert view is not None
        cuda = self.device is not None and self.device.type == "cuda"
        if self._controller is not None:
            capacity = self._controller.target
        capacity = max(1, capacity or 1)
        inline = not cuda and capacity * view.sample_nbytes <= INLINE_BATCH_BYTES
        if not inline:
            self._pool = self._make_pool(view, capacity)
        host_ring = device_ring = None
        if cuda:
            host_ring = HostRing(view.fields, capacity, self.prefetch_depth + 2, pin=True)
            device_ring = DeviceRing(view.fields, capacity, self.prefetch_depth + 2, self.device,
                                     reuse=self.reuse_buffers)
        pin = bool(self.pin_memory) and torch.cuda.is_available() and not cuda
        self._resources = FastResources(
            source=view.source, fields=view.fields, index_map=view.index_map,
            pack=self._packer(), pool=self._pool, stats=self._stats,
            controller=self._controller, prefetch_depth=self.prefetch_depth, device=self.device,
            pin=pin, host_ring=host_ring, device_ring=device_ring,
            sample_nbytes=view.sample_nbytes, inline=inline)
        return self._resources

    def _make_pool(self, view: ArrayView, capacity: int) -> Union[ReaderPool, ProcessReaderPool]:
        """Reader threads, or — with num_workers > 0 and a source whose reads hold h5py's
        lock — ``num_workers`` reader processes (see processes.py)."""
        if self.num_workers > 0 and needs_processes(view.source):
            return ProcessReaderPool(view.source, view.fields, capacity, self.prefetch_depth + 2,
                                     self.num_workers, self._stats,
                                     context=self.multiprocessing_context)
        return ReaderPool(view.source, self.reader_threads, self._stats)

    def _packer(self) -> Any:
        view, collate = self._view, self._user_collate
        assert view is not None

        def pack(tensors: Dict[str, torch.Tensor]) -> Any:  # holds no loader: NOTE(no-cycles)
            if collate is None:
                return view.structure(tensors)
            return collate(view.split(tensors))

        return pack

    # ------------------------------------------------------------------ torch API
    def __len__(self) -> int:
        if self._view is None and self._controller is None:
            return super().__len__()
        if self._user_batch_sampler is not None:
            return len(self._user_batch_sampler)
        n = self._shard_len() if self._user_sampler is None else len(self._user_sampler)
        size = self.batch_size or 1
        return n // size if self.drop_last else -(-n // size)

    # ------------------------------------------------------------------ gpuloader API
    def stats(self) -> Dict[str, Any]:
        """Counters since construction (or ``stats_reset()``): samples, batches, bytes,
        seconds waited / reading / copying, stall fraction, rates, batch-size history."""
        snap = self._stats.snapshot()
        snap["batch_size"] = self.batch_size
        return snap

    def stats_reset(self) -> None:
        """Start a new measurement window for :meth:`stats`."""
        self._stats.reset()

    def state_dict(self) -> Dict[str, Any]:
        """Where this loader stands, in O(1) plain data: seed, epoch, samples consumed.

        A batch counts as consumed once delivered, unless ``oom_guard`` rolled it back; batches
        read ahead but not delivered are not consumed.
        """
        active = self._active
        if active is not None and not active.finished:
            epoch, position = active.epoch, active.position
        else:
            epoch, position = self._epoch, self._resume_position
        return {"version": STATE_VERSION, "seed": self.seed, "epoch": epoch,
                "position": position, "order": self.order, "rank": self.world.rank,
                "world_size": self.world.world_size,
                "dataset_len": len(self.dataset) if hasattr(self.dataset, "__len__") else None,
                "sizer": self._controller.state_dict() if self._controller else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` output: the next iteration continues that epoch."""
        if isinstance(state, dict) and isinstance(state.get("version"), int) and \
                state["version"] != STATE_VERSION:
            raise ArgumentError(
                f"state has version {state['version']}, but this gpuloader reads state version "
                f"{STATE_VERSION} only (its epoch orders differ, so resuming would deliver other "
                "samples); start the epoch over with set_epoch() instead")
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ArgumentError(f"state must be a dict from gpuloader.DataLoader.state_dict() "
                                f"(version {STATE_VERSION}); got {describe(state)}")
        missing = [k for k in ("seed", "epoch", "position", "order", "world_size")
                   if k not in state]
        if missing:
            raise ArgumentError(f"state is missing {', '.join(map(repr, missing))}; pass the "
                                "dict gpuloader.DataLoader.state_dict() returned")
        # Checked here, not at the next iteration: a negative or fractional position would
        # silently skip or garble samples there.
        for key in ("epoch", "position"):
            _check_count(f"state[{key!r}]", state[key], 0, "an int >= 0")
        seed = state["seed"]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ArgumentTypeError(f"state['seed'] must be an int or None; got {describe(seed)}")
        if state["world_size"] != self.world.world_size:
            raise ArgumentError(
                f"state was saved with world_size={state['world_size']} but this loader runs "
                f"with world_size={self.world.world_size}; resume with the same number of ranks "
                "or start the epoch over (set_epoch)")
        n = len(self.dataset) if hasattr(self.dataset, "__len__") else None
        if state.get("dataset_len") is not None and state["dataset_len"] != n:
            raise ArgumentError(f"state was saved for a dataset of {state['dataset_len']} "
                                f"samples, but this loader's dataset has {n}")
        if state["order"] != self.order:
            raise ArgumentError(f"state was saved with order={state['order']!r}, but this "
                                f"loader uses order={self.order!r}")
        with self._lock:
            if self._active is not None:
                self._active.close()
                self._active = None
            self._abandoned = None
            # None: a generic-path loader that leaves the order to torch's sampler
            self.seed = None if state["seed"] is None else int(state["seed"])
            self._epoch = int(state["epoch"])
            self._resume_position = int(state["position"])
            if self._controller is not None and state.get("sizer"):
                self._controller.load_state_dict(state["sizer"])

    def _roll_back(self, start: int, length: int, *, whole_step: bool) -> None:
        """Rewind the active epoch after an out-of-memory error (NOTE(exactly-once) in
        adaptive.py); raises ValueError when the batch cannot shrink further."""
        active, controller = self._active, self._controller
        if active is None or controller is None:
            raise ValueError("this loader has no batch size to shrink (batch_size=None, a "
                             "batch_sampler, or an IterableDataset)")
        rewind_to = self._step_start if whole_step and self._step_start is not None else start
        predicted = None
        if self.cost_model.has_fit:
            predicted = self.cost_model.predict_max_batch(self._free_bytes(),
                                                          self.memory_fraction)
        controller.on_oom(max(1, length), predicted)
        controller.current = self.world.min(controller.current)
        self._stats.add_rollback(active.position - rewind_to)
        active.rewind(rewind_to)

    def _step_succeeded(self, size: int) -> None:
        """A guarded step of ``size`` samples finished: the size may grow after a cooldown.

        NOTE(learned-cost): with ``batch_size="auto"`` on CUDA, once the cost model has a fit of
        peak step memory against batch size, every ``REPLAN_STEPS`` successful steps the target
        is re-planned from it (never above the staging ring's capacity), replacing the guess.
        The step count is the same on every rank, so the agreeing collective stays matched.
        """
        controller = self._controller
        if controller is None:
            return
        controller.on_success(size)
        self._guarded_steps += 1
        if (self._requested_batch_size == "auto" and self.cost_model.has_fit
                and self._guarded_steps % REPLAN_STEPS == 0):
            controller.set_target(min(self._capacity, self.plan_batch_size()))

    def oom_guard(self, optimizer: Optional[torch.optim.Optimizer] = None) -> "adaptive.OomGuard":
        """Context manager around one training step: on out-of-memory, free memory, zero the
        optimizer's gradients, shrink the batch size and re-deliver the failed samples."""
        return adaptive.OomGuard(self, optimizer)

    def accumulate(self, global_batch_size: int) -> Iterator["adaptive.Step"]:
        """Steps of exactly ``global_batch_size`` samples made of memory-sized micro-batches;
        each step yields ``(batch, weight)`` with weights summing to 1."""
        return adaptive.accumulate(self, global_batch_size)

    def close(self) -> None:
        """Stop reader threads and worker processes; idempotent.  The loader cannot be
        iterated afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._active is not None:
                self._active.close()
                self._active = None
            if self._pool is not None:
                self._pool.close()
            res = self._resources
            if res is not None and res.device_ring is not None:
                res.device_ring.close()  # no copy may still be writing into freed slots
            iterator = getattr(self, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            self.__dict__["_iterator"] = None
            self._resources = None
            if self._view is not None:
                self._view.close()

    def __enter__(self) -> "DataLoader[T_co]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone already
            pass
