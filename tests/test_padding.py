"""Ragged batch layouts: padded and packed batches from one read into flat buffers."""
from __future__ import annotations

import numpy as np
import pytest

import gpuloader as gl
from gpuloader.padding import LayoutSource, RaggedLayout


@pytest.fixture
def dataset(rng):
    lengths = rng.integers(0, 12, 25)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    values = rng.integers(1, 100, int(offsets[-1])).astype(np.int16)
    y = rng.standard_normal((25, 3)).astype(np.float32)
    return gl.ArrayDataset(tokens=gl.Ragged(values, offsets), y=y), values, offsets, y


def views(layout, shapes, capacity):
    fields = layout.buffer_fields()
    flat = {k: np.full((rows, *fields[k].shape), 77, dtype=fields[k].dtype)
            for k, rows in capacity.items()}
    used = layout.rows(shapes, fields)
    assert all(used[k] <= capacity[k] for k in used)
    return layout.views(flat, shapes, used)


@pytest.mark.parametrize("multiple", [1, 8])
def test_padded_batch(dataset, multiple):
    ds, values, offsets, y = dataset
    layout = RaggedLayout(ds.fields, {"tokens": ds.lengths()}, packed=False, pad_value=-1,
                          multiple=multiple)
    idx = np.array([1, 4, 5, 20])
    shapes = layout.shapes(idx)
    lens = np.diff(offsets)[idx]
    L = shapes["tokens"][1]
    assert L % multiple == 0 and L - multiple < lens.max() <= L
    out = views(layout, shapes, layout.capacity(max_tokens=64, max_rows=10))
    LayoutSource(ds.source, layout).read_into(idx, out)
    for k, i in enumerate(idx):
        row = out["tokens"][k]
        np.testing.assert_array_equal(row[:lens[k]], values[offsets[i]:offsets[i + 1]])
        assert (row[lens[k]:] == -1).all()
    np.testing.assert_array_equal(out["tokens_lengths"], lens)
    np.testing.assert_array_equal(out["y"], y[idx])
    assert layout.keys() == ["tokens", "tokens_lengths", "y"]


def test_packed_batch(dataset):
    ds, values, offsets, y = dataset
    layout = RaggedLayout(ds.fields, {"tokens": ds.lengths()}, packed=True, pad_value=0,
                          multiple=1)
    idx = np.array([0, 2, 3, 24])
    out = views(layout, layout.shapes(idx), layout.capacity(max_tokens=64, max_rows=10))
    layout.fill(ds.source, idx, out)
    cu = out["tokens_offsets"]
    assert cu[0] == 0 and cu.dtype == np.int64 and len(cu) == len(idx) + 1
    for k, i in enumerate(idx):
        np.testing.assert_array_equal(out["tokens"][cu[k]:cu[k + 1]],
                                      values[offsets[i]:offsets[i + 1]])
    assert layout.keys() == ["tokens", "tokens_offsets", "y"]


def test_capacity_holds_the_longest_sample_alone(dataset):
    ds, _, offsets, _ = dataset
    layout = RaggedLayout(ds.fields, {"tokens": ds.lengths()}, packed=False, pad_value=0,
                          multiple=4)
    cap = layout.capacity(max_tokens=2, max_rows=1)
    longest = int(np.diff(offsets).max())
    assert cap["tokens"] >= -(-longest // 4) * 4 and cap["y"] == 1
