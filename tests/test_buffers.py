"""Host ring and poison switch (the CUDA staging ring is exercised in test_cuda.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gpuloader as gl
from gpuloader import buffers
from gpuloader.sources.base import FieldSpec

FIELDS = {"x": FieldSpec(np.dtype(np.float32), (2,)), "y": FieldSpec(np.dtype(np.int64), ()),
          "m": FieldSpec(np.dtype(np.bool_), ())}


def test_host_ring_is_preallocated_and_round_robin():
    ring = buffers.HostRing(FIELDS, capacity=8, slots=3, pin=False)
    taken = [ring.take() for _ in range(6)]
    assert [id(s) for s in taken[:3]] == [id(s) for s in taken[3:]]
    held = sum(t.numel() * t.element_size() for s in ring.slots for t in s.tensors.values())
    assert held == 3 * 8 * (8 + 8 + 1)


def test_poison_marks_recycled_slots(monkeypatch):
    monkeypatch.setattr(buffers, "POISON", True)
    ring = buffers.HostRing(FIELDS, capacity=4, slots=1, pin=False)
    slot = ring.take()
    slot.prepare_for_write()  # first use: nothing to poison
    slot.tensors["x"].fill_(1.0)
    slot = ring.take()
    slot.prepare_for_write()  # recycled: poisoned before the reader writes
    assert torch.isnan(slot.tensors["x"]).all()
    assert (slot.tensors["y"] == torch.iinfo(torch.int64).max).all()
    assert slot.tensors["m"].all()


def test_without_poison_recycled_slots_keep_their_bytes(monkeypatch):
    monkeypatch.setattr(buffers, "POISON", False)
    ring = buffers.HostRing(FIELDS, capacity=4, slots=1, pin=False)
    ring.take().prepare_for_write()
    ring.slots[0].tensors["x"].fill_(1.0)
    ring.take().prepare_for_write()
    assert (ring.slots[0].tensors["x"] == 1.0).all()


# ---------------------------------------------------------------------------------------------
# The device ring's event logic, checked without a GPU: a recording stand-in for torch.cuda
# (streams remember the newest event they waited for; events remember when they were recorded)
# and CPU "device" slots, so copies land at once and a premature overwrite shows in the data.


class FakeStream:
    def __init__(self, fake: "FakeCuda") -> None:
        self.fake = fake
        self.waited = 0    # newest stamp of another stream's event this stream waited for
        self.records = 0

    def wait_event(self, event: "FakeEvent") -> None:
        if event.stream is not self:
            self.waited = max(self.waited, event.stamp)

    def synchronize(self) -> None:
        pass


class FakeEvent:
    def __init__(self, fake: "FakeCuda") -> None:
        self.fake = fake
        self.stream = None
        self.stamp = -1

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "FakeEvent") -> float:
        return 0.0

    def record(self, stream: FakeStream) -> None:
        stream.records += 1
        self.stream = stream
        # An event on the consumer stream covers the work queued before the current draw.
        self.stamp = self.fake.draw if stream is self.fake.consumer else stream.records

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:  # like synchronize(): the fake's copies are done at once
        return True


class FakeCuda:
    """Just the torch.cuda names DeviceRing uses."""

    def __init__(self) -> None:
        self.draw = 0  # batches drawn so far (the test counts them)
        self.consumer = FakeStream(self)

    def Stream(self, device=None) -> FakeStream:  # noqa: N802 - torch's name
        return FakeStream(self)

    def stream(self, stream: FakeStream):
        import contextlib
        return contextlib.nullcontext()

    def Event(self, enable_timing: bool = False) -> FakeEvent:  # noqa: N802 - torch's name
        return FakeEvent(self)

    def current_stream(self, device=None) -> FakeStream:
        return self.consumer


class CheckedRing(buffers.DeviceRing):
    """Asserts NOTE(slot-lifetime) at every copy into a slot that held a drawn batch: that batch
    was drawn at least prefetch_depth + 1 draws ago, and the copy stream waited for a consumer
    event recorded no earlier than that, so the GPU work queued on the batch has finished."""

    def __init__(self, fake: FakeCuda, depth: int, *args, **kwargs) -> None:
        super().__init__(*args, cuda=fake, **kwargs)
        self.fake, self.depth = fake, depth
        self.drawn_at = {}

    def copy_in(self, host, rows):
        slot = super().copy_in(host, rows)
        drawn = self.drawn_at.pop(id(slot), None)
        if drawn is not None:
            due = drawn + self.depth + 1
            assert self.fake.draw >= due, (
                f"slot of the batch drawn at {drawn} rewritten at draw {self.fake.draw}")
            assert self.stream.waited >= due, (
                f"copy into the slot of the batch drawn at {drawn} (draw {self.fake.draw}) "
                f"waited only for consumer work up to draw {self.stream.waited}")
        return slot

    def hand_out(self, slot):
        self.drawn_at[id(slot)] = self.fake.draw
        return super().hand_out(slot)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_device_slots_are_rewritten_only_after_their_release_across_epochs_rollbacks_and_breaks(
        depth):
    from gpuloader.fastpath import FastEpochIterator, FastResources
    from gpuloader.readers import ReaderPool
    from gpuloader.sizing import SizeController
    from gpuloader.stats import LoaderStats

    n, size = 60, 7
    source = gl.ArrayDataset(x=np.arange(n * 2, dtype=np.float32).reshape(n, 2),
                             y=np.arange(n, dtype=np.int64)).source
    fields = dict(source.fields)
    fake = FakeCuda()
    stats = LoaderStats()
    res = FastResources(
        source=source, fields=fields, index_map=None, pack=dict,
        pool=ReaderPool(source, 2, stats), stats=stats, sizing=SizeController(size),
        prefetch_depth=depth, device=torch.device("cpu"),
        host_ring=buffers.HostRing(fields, size, depth + 2, pin=False),
        device_ring=CheckedRing(fake, depth, fields, size, depth + 2, torch.device("cpu")),
        sample_nbytes=16)
    live = []  # (drawn at, batch, its expected labels)
    delivered = []

    def draw(it):
        fake.draw += 1
        try:
            batch = next(it)
        except StopIteration:
            fake.draw -= 1
            raise
        live.append((fake.draw, batch, batch["y"].clone()))
        delivered.append(batch["y"].clone())
        for drawn, held, expected in live:  # valid until depth + 1 more draws
            if fake.draw - drawn <= depth:
                assert torch.equal(held["y"], expected), f"batch of draw {drawn} overwritten"
        return batch

    def epoch(e):
        return FastEpochIterator(res, e, np.arange(n), 0, sort=False, drop_last=False)

    try:
        it = epoch(0)
        for _ in range(3):
            draw(it)
        it.rewind(it.last_start)  # an out-of-memory rollback of the third batch
        del delivered[-1]
        while True:  # the rest of the epoch
            try:
                draw(it)
            except StopIteration:
                break
        for e in (1, 2):  # back-to-back epochs
            it = epoch(e)
            while True:
                try:
                    draw(it)
                except StopIteration:
                    break
        it = epoch(3)
        draw(it)
        draw(it)
        it.close()  # a break: its read-ahead copy is dropped
        it = epoch(4)
        while True:
            try:
                draw(it)
            except StopIteration:
                break
    finally:
        res.pool.close()
    labels = torch.cat(delivered).tolist()
    assert sorted(labels) == sorted(list(range(n)) * 4 + list(range(2 * size)))


# ---------------------------------------------------------------------- NOTE(pinned-rounding)

def test_a_host_slot_is_one_block_carved_into_aligned_fields():
    tensors, size = buffers.allocate_block(FIELDS, 5, pin=False)
    assert {k: tuple(t.shape) for k, t in tensors.items()} == {"x": (5, 2), "y": (5,),
                                                               "m": (5,)}
    assert size == 64 + 64 + 64  # each field's 40 / 40 / 5 bytes, aligned to 64
    base = tensors["x"].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in tensors.values())
    tensors["y"][:] = 7
    tensors["x"][:] = 1.5
    assert tensors["y"].tolist() == [7] * 5  # fields do not overlap
    assert (tensors["x"] == 1.5).all()


def test_pinned_footprint_is_the_power_of_two_the_cache_takes():
    assert [buffers.pinned_footprint(n) for n in (0, 1, 1000, 1024, 1025)] == \
        [0, 1, 1024, 1024, 2048]


def test_the_sizer_counts_the_pinned_ring_against_host_memory():
    from gpuloader.planning import SizerConfig, plan_batch_size

    def plan(pinned):
        cfg = SizerConfig(staging_bytes_per_sample=1000, ring_slots=4, dataset_len=10 ** 9,
                          max_batch_size=10 ** 6, pinned_host_bytes=pinned)
        return plan_batch_size(1 << 40, cfg)

    assert plan(None) == 10 ** 6                     # the device alone would allow the maximum
    # 4 slots in 100 MB: 25 MB each, of which the largest power of two is 16 MiB.
    assert plan(100 * 10 ** 6) == (16 << 20) // 1000 // 8 * 8
