"""Side-stream copies of the generic path and the CUDA call wrapper, with the recording
stand-in (tests/cuda_standin.py): ordering is checked without a GPU, on the "meta" device."""
from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import gpuloader as gl
from cuda_standin import CopyLog, FakeCuda
from gpuloader.streams import StreamCopier, map_tensors, tensors_of

META = torch.device("meta")
Pair = namedtuple("Pair", "a b")


def test_copy_runs_on_a_side_stream_and_the_consumer_stream_waits_for_it():
    fake = FakeCuda()
    copier = StreamCopier(META, cuda=fake, pin=False)
    batch = {"x": torch.ones(4, 3), "pair": Pair(torch.arange(4), torch.zeros(4, 2)),
             "names": ["a", "b", "c", "d"]}
    with CopyLog(fake):
        out = copier(batch)
    assert out["x"].device == META and out["pair"].a.device == META
    assert isinstance(out["pair"], Pair) and out["names"] == batch["names"]
    copies = fake.entries("copy")
    assert len(copies) == 3 and {s for _, s in copies} == {"side1"}  # not the compute stream
    (_, stream, event), = fake.entries("record")
    assert stream == "side1"
    last_copy = max(i for i, e in enumerate(fake.log) if e[0] == "copy")
    assert last_copy < fake.index(("record", "side1", event)) \
        < fake.index(("wait", "default", "side1", event))  # the consumer waits for the copy
    # The caching allocator learns that the consumer stream uses every output.
    assert sorted(s for _, _, s in fake.entries("record_stream")) == [(4,), (4, 2), (4, 3)]
    assert {st for _, st, _ in fake.entries("record_stream")} == {"default"}


def test_copy_waits_on_the_stream_current_at_the_draw():
    fake = FakeCuda()
    copier = StreamCopier(META, cuda=fake, pin=False)
    user = fake.Stream()
    with fake.stream(user):
        copier(torch.ones(2))
    (_, waiter, source, _), = fake.entries("wait")
    assert (waiter, source) == ("side1", "side2")  # the user's stream waits for the copier's


class Rows(Dataset):
    """A map-style dataset without an array view: the generic path."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return {"x": torch.full((3,), float(i)), "i": i}


def test_generic_path_hands_batches_through_the_copier():
    fake = FakeCuda()
    with gl.DataLoader(Rows(), batch_size=4) as loader:
        loader._copier = StreamCopier(META, cuda=fake, pin=False)
        with CopyLog(fake):
            batches = list(loader)
    assert [b["x"].device for b in batches] == [META] * 3
    assert len(fake.entries("wait")) == 3  # one event wait per batch, none on the host
    assert not fake.entries("event_sync") and not fake.entries("device_sync")


def test_map_tensors_keeps_structure_and_leaves():
    batch = [torch.ones(2), (torch.zeros(1), 3), "s"]
    doubled = map_tensors(batch, lambda t: t * 2)
    assert doubled[0].tolist() == [2.0, 2.0] and doubled[1][1] == 3 and doubled[2] == "s"
    assert [t.shape for t in tensors_of(batch)] == [(2,), (1,)]


def test_generic_cpu_batches_are_not_copied():
    with gl.DataLoader(Rows(), batch_size=5) as loader:
        assert loader._copier is None
        batches = list(loader)
    assert np.array_equal(torch.cat([b["i"] for b in batches]).numpy(), np.arange(10))


# ------------------------------------------------------------------ NOTE(no-gpu-wait-on-draw)
# A pinned host slot whose last device copy is still queued behind GPU work: the fake holds the
# GPU back, so any host wait for it raises WaitedForGpu instead of blocking.

def _busy_slot(fake: FakeCuda, fields, rows: int):
    from gpuloader.buffers import HostSlot, allocate

    slot = HostSlot(allocate(fields, rows, device=torch.device("cpu")), rows)
    slot.copied = fake.Event()
    slot.copied.record(fake.Stream())  # the copy out of the slot's previous batch
    fake.gpu_busy = True
    return slot


def test_reader_processes_do_not_wait_for_the_gpu_on_submit(data_files):
    from gpuloader.buffers import numpy_views
    from gpuloader.processes import ProcessReaderPool
    from gpuloader.readers import ReadJob
    from gpuloader.stats import LoaderStats

    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    source = gl.open_dataset(data_files.h5({"x": (x, {"chunks": (5, 2),
                                                      "compression": "gzip"})})).source
    fake = FakeCuda()
    slot = _busy_slot(fake, source.fields, 4)
    pool = ProcessReaderPool(source, source.fields, 4, 2, 1, LoaderStats())
    try:
        idx = np.arange(3, 7)
        pool.submit(ReadJob(1, idx, numpy_views(slot.tensors, 4), before=slot.prepare_for_write,
                            ready=slot.writable))  # on the draw: must not wait for the GPU
        while 1 not in pool._done:  # the worker's read finished (no host-GPU wait involved)
            pool._collect(block=True)
        assert not pool.done(1)  # finished, but its buffer still feeds a copy: not done yet
        assert not fake.entries("event_sync")
        fake.gpu_busy = False  # the copy landed
        assert pool.done(1)
        pool.result(1)
        assert np.array_equal(slot.tensors["x"].numpy(), x[idx])
    finally:
        pool.close()


def test_a_waiting_consumer_does_not_steal_a_job_that_waits_for_the_gpu():
    import threading

    from gpuloader.readers import ReaderPool, ReadJob
    from gpuloader.stats import LoaderStats

    started, go = threading.Event(), threading.Event()
    ran_before_on = []

    class Source:
        def read_into(self, indices, out):
            if indices[0] == 0:  # job 1 holds the only reader thread until go
                started.set()
                go.wait()

    def not_ready() -> bool:
        go.set()  # the consumer looked at job 2 and left it alone: let the reader go on
        return False

    def before() -> None:
        ran_before_on.append(threading.current_thread().name)
        go.set()  # (if the consumer ran it, job 1 must still finish for the test to end)

    pool = ReaderPool(Source(), 1, LoaderStats())
    try:
        pool.submit(ReadJob(1, np.array([0]), {}))
        started.wait()
        pool.submit(ReadJob(2, np.array([1]), {}, ready=not_ready, before=before))
        pool.result(1)
        pool.result(2)
    finally:
        go.set()
        pool.close()
    assert ran_before_on and ran_before_on[0] != threading.main_thread().name


# ------------------------------------------------------------------ NOTE(stream-rule), the ring

def _ring(fake: FakeCuda, slots: int = 3):
    from gpuloader.buffers import DeviceRing, HostSlot, allocate
    from gpuloader.sources.base import FieldSpec

    fields = {"x": FieldSpec(np.dtype(np.float32), (2,))}
    ring = DeviceRing(fields, 4, slots, torch.device("cpu"), cuda=fake)  # copy stream: side1
    host = HostSlot(allocate(fields, 4, device=torch.device("cpu")), 4)
    return ring, host


def _draw(ring, host):
    slot = ring.copy_in(host, 4)
    return slot, ring.hand_out(slot)


def _waits_before_copy_into(fake: FakeCuda, first_copy_entries: int):
    """(stream, event) pairs the copy stream waited for after log position ``first_copy_entries``."""
    return {(src, ev) for kind, waiter, src, ev in
            (e for e in fake.log[first_copy_entries:] if e[0] == "wait") if waiter == "side1"}


def test_a_slot_is_released_on_the_stream_that_drew_its_batch():
    fake = FakeCuda()
    ring, host = _ring(fake)            # 3 slots: a batch is released two draws later
    drawer = fake.Stream()              # side2: the stream current at the first draw
    with fake.stream(drawer):
        first, _ = _draw(ring, host)
    _draw(ring, host)                   # later draws on the default stream
    mark = len(fake.log)
    _draw(ring, host)                   # releases the first batch's slot
    released = fake.ordering_records(mark, but="side1")
    assert released == [("side2", released[0][1])], released  # not the default stream
    mark = len(fake.log)
    again, _ = _draw(ring, host)        # rewrites the first batch's slot
    assert again is first
    assert ("side2", released[0][1]) in _waits_before_copy_into(fake, mark)


def test_record_stream_makes_another_stream_wait_and_keeps_the_slot_for_it():
    from gpuloader.streams import use_on_stream

    fake = FakeCuda()
    ring, host = _ring(fake)
    other = fake.Stream()                              # side2
    first, batch = _draw(ring, host)                   # drawn on the default stream
    mark = len(fake.log)
    use_on_stream(batch, other, device=torch.device("cpu"), ring=ring, cuda=fake)
    (drawn_on, ev), = fake.ordering_records(mark)
    assert drawn_on == "default" and ("wait", "side2", "default", ev) in fake.log[mark:]
    assert first.users == [fake.default, other]
    _draw(ring, host)
    mark = len(fake.log)
    _draw(ring, host)                                  # releases the first slot on both
    streams = {s for s, _ in fake.ordering_records(mark, but="side1")}
    assert streams == {"default", "side2"}
    mark = len(fake.log)
    _draw(ring, host)                                  # the rewrite waits for both
    assert {s for s, _ in _waits_before_copy_into(fake, mark)} == {"default", "side2"}


def test_record_stream_of_fresh_tensors_tells_the_allocator():
    from gpuloader.streams import use_on_stream

    fake = FakeCuda()
    other = fake.Stream()
    batch = {"x": torch.ones(3, device="meta")}
    use_on_stream(batch, other, device=torch.device("cpu"), cuda=fake)
    assert fake.entries("record_stream") == [("record_stream", "side1", (3,))]


def test_copy_time_and_the_consumers_wait_for_it_are_timed_on_the_gpu():
    # NOTE(copy-timing): each copy takes 40 ms of GPU time; the consumer's stream reaches the
    # batch 10 ms after the copy began (it waits 30 ms), or 50 ms after (no wait).
    from gpuloader.stats import LoaderStats

    fake = FakeCuda()
    ring, host = _ring(fake)
    stats = LoaderStats()
    for reached_ms in (10.0, 50.0, 10.0):
        slot = ring.copy_in(host, 4)
        ring.hand_out(slot)
        started, ended, reached = ring._timings[-1]
        started.ms, ended.ms, reached.ms = 0.0, 40.0, reached_ms
        stats.add_copy(*ring.finished_timings())
    snap = stats.snapshot()
    assert snap["copy_s"] == pytest.approx(3 * 0.040)         # not the microseconds of issuing
    assert snap["copy_stall_s"] == pytest.approx(2 * 0.030)   # an H2D-bound loader stalls
    fake.gpu_busy = True                                       # copies not finished: not counted
    ring.hand_out(ring.copy_in(host, 4))
    assert ring.finished_timings() == (0.0, 0.0)
