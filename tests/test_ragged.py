"""Ragged fields: every storage layout reads the same samples; bad layouts fail clearly."""
from __future__ import annotations

import pickle
import struct

import h5py
import numpy as np
import pytest
import torch

import gpuloader as gl
from gpuloader.sources.binidx import MAGIC, write_index
from gpuloader.sources.ragged import token_index


def corpus(rng: np.random.Generator, n: int = 40) -> tuple:
    """``(values uint16, offsets int64, labels)`` with some empty samples."""
    lengths = rng.integers(0, 30, n)
    lengths[::7] = 0
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    values = rng.integers(0, 60000, int(offsets[-1])).astype(np.uint16)
    return values, offsets, np.arange(n, dtype=np.int64) * 3


def write_layouts(root, values, offsets, labels) -> dict:
    """The same corpus as Megatron, npy folder, HDF5 group (chunked+gzip) and HDF5 vlen."""
    (root / "folder").mkdir()
    np.save(root / "folder" / "tokens.values.npy", values)
    np.save(root / "folder" / "tokens.offsets.npy", offsets)
    np.save(root / "folder" / "label.npy", labels)
    values.tofile(root / "corpus.bin")
    write_index(root / "corpus.idx", np.diff(offsets), values.dtype)
    with h5py.File(root / "g.h5", "w") as h5:
        grp = h5.create_group("tokens")
        grp.create_dataset("values", data=values, chunks=(16,), compression="gzip")
        grp["offsets"] = offsets
        h5["label"] = labels
    with h5py.File(root / "v.h5", "w") as h5:
        vl = h5.create_dataset("tokens", (len(labels),), dtype=h5py.vlen_dtype(np.uint16))
        for i in range(len(labels)):
            vl[i] = values[offsets[i]:offsets[i + 1]]
        h5["label"] = labels
    return {"megatron": root / "corpus", "megatron.bin": root / "corpus.bin",
            "megatron.idx": root / "corpus.idx", "folder": root / "folder",
            "hdf5": root / "g.h5", "vlen": root / "v.h5",
            "ram": gl.ArrayDataset(tokens=gl.Ragged(values, offsets), label=labels)}


@pytest.fixture
def layouts(tmp_path, rng):
    values, offsets, labels = corpus(rng)
    return (values, offsets, labels), write_layouts(tmp_path, values, offsets, labels)


@pytest.mark.parametrize("kind", ["megatron", "megatron.bin", "megatron.idx", "folder",
                                  "hdf5", "vlen", "ram"])
def test_every_layout_reads_the_same_samples(layouts, kind):
    (values, offsets, labels), paths = layouts
    ds = paths[kind] if kind == "ram" else gl.open_dataset(paths[kind])
    ds = pickle.loads(pickle.dumps(ds))  # workers receive datasets by pickle
    n = len(offsets) - 1
    assert len(ds) == n and "tokens" in ds.ragged_fields
    np.testing.assert_array_equal(ds.lengths("tokens"), np.diff(offsets))
    np.testing.assert_array_equal(ds.lengths(), np.diff(offsets)) if len(ds.ragged_fields) == 1 \
        else None
    for i in (0, 1, n - 1, 13):
        sample = ds[i]
        assert sample["tokens"].ndim == 1 and sample["tokens"].dtype == torch.uint16
        np.testing.assert_array_equal(sample["tokens"].numpy(), values[offsets[i]:offsets[i + 1]])
        if "label" in sample:
            assert int(sample["label"]) == labels[i]
    idx = [5, 2, 2, 39, 0]
    for i, sample in zip(idx, ds.__getitems__(idx)):
        np.testing.assert_array_equal(sample["tokens"].numpy(), values[offsets[i]:offsets[i + 1]])
    packed = ds.read_batch(np.array(idx))["tokens"].numpy()
    expect = np.concatenate([values[offsets[i]:offsets[i + 1]] for i in idx])
    np.testing.assert_array_equal(packed, expect)


def test_storage_says_how_ragged_fields_are_read(layouts):
    _, paths = layouts
    assert gl.open_dataset(paths["megatron"]).source.storage["tokens"].format == "megatron"
    assert gl.open_dataset(paths["hdf5"]).source.storage["tokens"].read_path == "slab"
    assert "slow" in gl.open_dataset(paths["vlen"]).source.storage["tokens"].read_path


def test_fields_select_ragged_and_fixed(layouts):
    _, paths = layouts
    ds = gl.open_dataset(paths["folder"], fields=["label", "tokens"])
    assert list(ds.fields) == ["label", "tokens"]
    only = gl.open_dataset(paths["hdf5"], fields=["label"])
    assert only.ragged_fields == [] and list(only.fields) == ["label"]
    with pytest.raises(KeyError, match="nope"):
        gl.open_dataset(paths["folder"], fields=["nope"])


def test_token_index_is_values_end_to_end():
    rows = token_index(np.array([10, 0, 4]), np.array([2, 0, 3]))
    np.testing.assert_array_equal(rows, [10, 11, 4, 5, 6])


@pytest.mark.parametrize("offsets, match", [
    ([1, 3, 5], r"offsets\[0\] must be 0.*index 0"),
    ([0, 3, 2, 5], r"offsets.*non-decreasing.*first bad index 2"),
    ([0, 3, 4], r"offsets\[-1\] must equal len\(values\) = 5.*index 2"),
    ([[0, 5]], r"offsets must be a non-empty 1-D integer array"),
])
def test_bad_offsets_name_offsets_and_first_bad_index(offsets, match):
    with pytest.raises(ValueError, match=match):
        gl.Ragged(np.arange(5), np.array(offsets))


def test_bad_offsets_file_names_the_file(tmp_path):
    np.save(tmp_path / "t.values.npy", np.arange(5))
    np.save(tmp_path / "t.offsets.npy", np.array([0, 2, 1, 5]))
    with pytest.raises(ValueError, match=r"t\.offsets\.npy.*first bad index 2"):
        gl.open_dataset(tmp_path)


def test_half_a_pair_is_an_error(tmp_path):
    np.save(tmp_path / "t.values.npy", np.arange(5))
    with pytest.raises(ValueError, match=r"t\.values\.npy but no t\.offsets\.npy"):
        gl.open_dataset(tmp_path)


@pytest.mark.parametrize("header, match", [
    (b"NOTMAGIC!" + struct.pack("<QBQQ", 1, 8, 0, 1), r"c\.idx.*expected the magic bytes"),
    (MAGIC + struct.pack("<QBQQ", 2, 8, 0, 1), r"c\.idx.*version 2; expected version 1"),
    (MAGIC + struct.pack("<QBQQ", 1, 42, 0, 1), r"c\.idx.*dtype code 42; expected one of"),
    (MAGIC + struct.pack("<QBQQ", 1, 8, 5, 6), r"c\.idx.*truncated"),
    (MAGIC[:4], r"c\.idx.*shorter than a Megatron \.idx header"),
])
def test_bad_megatron_header_names_file_and_expectation(tmp_path, header, match):
    (tmp_path / "c.bin").write_bytes(b"")
    (tmp_path / "c.idx").write_bytes(header + np.zeros(1, "<i8").tobytes())
    with pytest.raises(ValueError, match=match):
        gl.open_dataset(tmp_path / "c")


def test_megatron_bin_shorter_than_index(tmp_path):
    np.arange(4, dtype=np.uint16).tofile(tmp_path / "c.bin")
    write_index(tmp_path / "c.idx", np.array([2, 5]), np.dtype(np.uint16))
    with pytest.raises(ValueError, match=r"sequence 1 ends at token 7, beyond the 4 tokens"):
        gl.open_dataset(tmp_path / "c.bin")


def test_megatron_missing_half(tmp_path):
    np.arange(4, dtype=np.uint16).tofile(tmp_path / "c.bin")
    with pytest.raises(FileNotFoundError, match=r"c\.idx.*does not exist"):
        gl.open_dataset(tmp_path / "c.idx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gl.open_dataset(tmp_path / "nothing")


def test_megatron_float_codes_follow_megatron(tmp_path):
    np.arange(3, dtype=np.float32).tofile(tmp_path / "f.bin")
    write_index(tmp_path / "f.idx", np.array([1, 2]), np.dtype(np.float32))
    assert (tmp_path / "f.idx").read_bytes()[17] == 7  # Megatron-LM: 7 is float32
    ds = gl.open_dataset(tmp_path / "f")
    np.testing.assert_array_equal(ds[1]["tokens"].numpy(), [1.0, 2.0])


def test_lengths_errors(layouts):
    (values, offsets, labels), _ = layouts
    fixed = gl.ArrayDataset(x=labels)
    with pytest.raises(ValueError, match="no variable-length field"):
        fixed.lengths()
    two = gl.ArrayDataset(a=gl.Ragged(values, offsets), b=gl.Ragged(values, offsets))
    with pytest.raises(ValueError, match="name one"):
        two.lengths()
    with pytest.raises(KeyError, match="no ragged field 'c'"):
        two.lengths("c")


def test_ragged_with_per_token_shape_and_tensor_values():
    values = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    ds = gl.ArrayDataset(gl.Ragged(values, torch.tensor([0, 4, 6])))
    assert ds[1][0].shape == (2, 2) and ds[0][0].shape == (4, 2)
