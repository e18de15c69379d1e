"""Benchmark harness: gpuloader against torch's DataLoader and the raw storage ceiling.

Used by ``gpuloader bench`` (see :func:`add_arguments` / :func:`main`), by the scripts in
``benchmarks/``, and directly from Python::

    import gpuloader as gl
    from gpuloader.bench import compare, write_report

    records = compare(gl.open_dataset("train.h5"), batch_size=256, seconds=2)
    write_report(records, "bench_out")       # results.json, results.md, throughput.png

Cases (the ``loaders`` names):

==============  ===============================================================================
gpuloader       ``gpuloader.DataLoader`` in each requested order (fast path for an ArrayDataset,
                generic path for any other map-style Dataset).
torch           ``torch.utils.data.DataLoader`` on a plain per-sample Dataset (``__getitem__``
                only, ``default_collate``) wrapping the same memmap / HDF5 datasets, once per
                ``num_workers`` value.  For a Dataset that is not an ArrayDataset: that Dataset
                with any ``__getitems__`` hidden.
torch-batched   ``torch.utils.data.DataLoader`` on the Dataset itself, so torch calls its batched
                ``__getitems__`` hook (an ArrayDataset's, or the user's), once per ``num_workers``.
raw             the storage ceiling, single-threaded: ``array[sorted_batch_indices]`` per batch
                for memory-mapped / in-RAM arrays (in each order); for HDF5 the sequential
                ``read_direct`` of consecutive rows into a preallocated buffer.
raw-seq         a sequential copy of consecutive rows into a preallocated buffer (any storage).
h2d             CUDA only: ``copy_(non_blocking=True)`` of a pinned host batch into a
                preallocated device batch: the transfer ceiling.
==============  ===============================================================================

NOTE(bench-fairness): every case of one :func:`compare` call consumes the same number of samples
(``samples``; by default the number the slowest case reads in about ``seconds``, found by a short
calibration run of every case), after the same number of warm-up batches, in whole batches of
``batch_size`` (``drop_last`` everywhere).  The torch and raw cases read the indices of the order
``epoch_order(order, n, seed=seed, epoch=e)`` (the permutation gpuloader's own ``order="shuffle"``
draws with the same seed); the torch cases use the shuffle order when it was requested.  Repeats
are interleaved (repeat 1 of every case, then repeat 2, ...) so slow drifts of machine load hit all
cases alike, and the median repeat is reported.  Each case stops after ``max(3 * seconds, 10)``
seconds whatever it has read and is then marked ``truncated``.

Throughput is samples (and bytes of the delivered batches) over the wall time of the measured
window.  The stall fraction is the share of that window the consumer spent waiting for the next
batch (the time inside ``next()``), the same definition as ``loader.stats()["stall_fraction"]``.
On CUDA the consumer synchronizes its stream when it draws a batch, so time waiting for the copy
counts as stall.  ``compute_ms`` adds a synthetic training step in the consumer after every batch
(not to ``h2d``): on CUDA a loop of matmuls calibrated to take that long, then a synchronize; on
the CPU the consumer sleeps, since a GPU step leaves the CPU and the GIL free
(``compute_kind="spin"`` busy-waits, ``"matmul"`` multiplies on the CPU; see :func:`make_step`).

Modules: ``raw`` (where the bytes are: :class:`RawField`, :func:`raw_fields_from_path`,
:func:`close_raw`), ``baselines`` (plain Datasets and index streams for the baselines),
``timing`` (:func:`measure`, :func:`make_step`), ``cases`` (:class:`Case`, :func:`open_case`),
``checks`` (argument checks), ``comparison`` (:func:`compare`), ``records`` (:func:`build_record`,
:func:`add_ratios`), ``machine`` (:func:`machine_info`), ``report`` (:func:`write_report`),
``synthetic`` (:func:`make_synthetic`) and ``cli`` (:func:`add_arguments`, :func:`main`).
"""
from gpuloader.bench.baselines import PerSampleDataset, batch_stream
from gpuloader.bench.cases import DEFAULT_LOADERS, LOADERS, Case, Opened, open_case
from gpuloader.bench.cli import add_arguments, main
from gpuloader.bench.comparison import compare
from gpuloader.bench.machine import machine_info
from gpuloader.bench.timing import COMPUTE_KINDS, Measurement, make_step, measure
from gpuloader.bench.raw import RawField, close_raw, raw_fields_from_path
from gpuloader.bench.records import RECORD_KEYS, add_ratios, build_record
from gpuloader.bench.report import write_report
from gpuloader.bench.synthetic import make_synthetic

__all__ = [
    "LOADERS",
    "DEFAULT_LOADERS",
    "RECORD_KEYS",
    "RawField",
    "compare",
    "write_report",
    "build_record",
    "add_ratios",
    "open_case",
    "measure",
    "make_step",
    "Case",
    "Measurement",
    "machine_info",
    "make_synthetic",
    "raw_fields_from_path",
    "close_raw",
    "batch_stream",
    "PerSampleDataset",
    "COMPUTE_KINDS",
    "Opened",
    "add_arguments",
    "main",
]
