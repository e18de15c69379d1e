"""Host ring and poison switch (the CUDA staging ring is exercised in test_cuda.py)."""
from __future__ import annotations

import numpy as np
import torch

from gpuloader import buffers
from gpuloader.sources.base import FieldSpec

FIELDS = {"x": FieldSpec(np.dtype(np.float32), (2,)), "y": FieldSpec(np.dtype(np.int64), ()),
          "m": FieldSpec(np.dtype(np.bool_), ())}


def test_host_ring_is_preallocated_and_round_robin():
    ring = buffers.HostRing(FIELDS, capacity=8, slots=3, pin=False)
    taken = [ring.take() for _ in range(6)]
    assert [id(s) for s in taken[:3]] == [id(s) for s in taken[3:]]
    assert ring.nbytes == 3 * 8 * (8 + 8 + 1)


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
