"""ArrayDataset and open_dataset: sample structure, torch compatibility, pickling, errors."""
from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import DataFiles, sample_arrays
from gpuloader.dataset import ArrayDataset, open_dataset
from gpuloader.errors import (ArgumentError, ArgumentTypeError, FieldNotFoundError,
                              SampleIndexError, SourceError, SourceNotFoundError)
from gpuloader.sources import Hdf5Source, NpySource

N = 53


@pytest.fixture
def arrays() -> dict:
    return sample_arrays(N)


def test_positional_samples_are_tuples(arrays: dict) -> None:
    ds = ArrayDataset(arrays["x"], torch.from_numpy(arrays["y"]))
    assert not ds.named and list(ds.fields) == ["0", "1"] and len(ds) == N
    x, y = ds[4]
    assert torch.equal(x, torch.from_numpy(arrays["x"][4]))
    assert y.shape == () and int(y) == arrays["y"][4]
    assert torch.equal(ds[-1][0], torch.from_numpy(arrays["x"][-1]))
    assert isinstance(ds[np.int64(2)], tuple)


def test_named_samples_are_dicts(arrays: dict) -> None:
    ds = ArrayDataset(**arrays)
    assert ds.named and list(ds.fields) == ["x", "y", "w"]
    sample = ds[7]
    assert list(sample) == ["x", "y", "w"]
    assert sample["w"].dtype == torch.float16
    np.testing.assert_array_equal(sample["w"].numpy(), arrays["w"][7])


def test_samples_own_their_memory(arrays: dict) -> None:
    x = arrays["x"]
    ds = ArrayDataset(x=x)
    sample = ds[3]["x"]
    sample += 1  # must not write through to the source array
    np.testing.assert_array_equal(ds[3]["x"].numpy(), x[3])
    assert sample.untyped_storage().nbytes() == x[3].nbytes


def test_getitem_errors(arrays: dict) -> None:
    ds = ArrayDataset(arrays["x"])
    with pytest.raises(SampleIndexError, match=f"index {N} is out of range.*{N} samples"):
        ds[N]
    with pytest.raises(IndexError, match=f"index {-N - 1} is out of range"):
        ds[-N - 1]
    for bad in (slice(0, 2), 1.5, "3", True, [1, 2]):
        with pytest.raises(TypeError, match="index must be an int"):
            ds[bad]


def test_read_batch_order_and_duplicates(arrays: dict) -> None:
    ds = ArrayDataset(**arrays)
    idx = [9, 2, 2, -1, 0]
    batch = ds.read_batch(idx)
    for name, arr in arrays.items():
        np.testing.assert_array_equal(batch[name].numpy(), arr[idx])
    same = ds.read_batch(torch.tensor(idx))
    assert all(torch.equal(same[k], batch[k]) for k in batch)
    empty = ds.read_batch([])
    assert empty["x"].shape == (0, 4, 3)
    with pytest.raises(SampleIndexError, match=f"index {N + 5} is out of range"):
        ds.read_batch([0, N + 5])
    with pytest.raises(ArgumentTypeError, match="1-D sequence of ints"):
        ds.read_batch([[1, 2]])
    with pytest.raises(ArgumentTypeError, match="1-D sequence of ints"):
        ds.read_batch([0.5])


def test_getitems_is_one_batched_read(arrays: dict) -> None:
    ds = ArrayDataset(arrays["x"], arrays["y"])
    calls = []
    inner = ds.source.read_into
    ds.source.read_into = lambda idx, out: (calls.append(list(idx)), inner(idx, out))
    samples = ds.__getitems__([5, 1, 5])
    assert calls == [[5, 1, 5]]
    assert isinstance(samples, list) and len(samples) == 3
    assert torch.equal(samples[1][0], torch.from_numpy(arrays["x"][1]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_torch_dataloader_matches_tensor_dataset(arrays: dict, num_workers: int,
                                                 data_files: DataFiles) -> None:
    h5 = data_files.h5({"x": (arrays["x"], {"chunks": (8, 4, 3), "compression": "gzip"})})
    file = h5py.File(h5, "r")
    ours = ArrayDataset(file["x"], arrays["y"])
    theirs = TensorDataset(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]))

    def batches(ds: torch.utils.data.Dataset) -> list:
        gen = torch.Generator().manual_seed(3)
        return list(DataLoader(ds, batch_size=8, shuffle=True, generator=gen,
                               num_workers=num_workers))

    got, want = batches(ours), batches(theirs)
    file.close()
    assert len(got) == len(want) == -(-N // 8)
    for a, b in zip(got, want):
        assert type(a) is type(b) and len(a) == 2
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_dataloader_with_dict_samples(arrays: dict) -> None:
    ds = ArrayDataset(x=arrays["x"], y=arrays["y"])
    batches = list(DataLoader(ds, batch_size=10))
    assert set(batches[0]) == {"x", "y"}
    got = torch.cat([b["y"] for b in batches]).numpy()
    np.testing.assert_array_equal(got, arrays["y"])


def test_pack_and_from_source(data_files: DataFiles, arrays: dict) -> None:
    source = NpySource(data_files.npy_dir({"b": arrays["y"], "a": arrays["w"]}))
    named = ArrayDataset.from_source(source)
    assert list(named.fields) == ["a", "b"] and named.named
    assert list(named.pack({"b": 1, "a": 2})) == ["a", "b"]
    positional = ArrayDataset.from_source(source, named=False)
    assert positional.pack({"b": 1, "a": 2}) == (2, 1)
    with pytest.raises(FieldNotFoundError, match=r"no tensor for field 'b'.*\['a', 'b'\]"):
        positional.pack({"a": 1})
    with pytest.raises(ArgumentTypeError, match="from_source needs a Source"):
        ArrayDataset.from_source(arrays["x"])
    alone = ArrayDataset(source)  # a multi-field Source passed alone: its fields, as tuples
    assert not alone.named and list(alone.fields) == ["a", "b"]


def test_mixed_inputs(data_files: DataFiles, arrays: dict) -> None:
    path = data_files.h5({"w": arrays["w"]})
    with h5py.File(path, "r") as h5:
        ds = ArrayDataset(x=torch.from_numpy(arrays["x"]), w=h5["w"],
                          y=NpySource(data_files.npy("labels", arrays["y"])))
    sample = ds[11]
    np.testing.assert_array_equal(sample["w"].numpy(), arrays["w"][11])
    assert int(sample["y"]) == arrays["y"][11]
    assert ds.source.storage["w"].format == "hdf5"


def test_constructor_errors(data_files: DataFiles, arrays: dict) -> None:
    with pytest.raises(ArgumentError, match="at least one array"):
        ArrayDataset()
    with pytest.raises(ArgumentError, match=r"not both.*1 positional.*\['y'\]"):
        ArrayDataset(arrays["x"], y=arrays["y"])
    with pytest.raises(SourceError, match=r"'0': 53.*'1': 52"):
        ArrayDataset(arrays["x"], arrays["y"][:-1])
    with pytest.raises(SourceError, match="field 's' has dtype <U1, which torch cannot hold"):
        ArrayDataset(s=np.array(list("abc")))
    source = NpySource(data_files.npy_dir({"a": arrays["y"], "b": arrays["y"]}))
    with pytest.raises(ArgumentError, match=r"fields \['a', 'b'\] cannot be one named array"):
        ArrayDataset(data=source)
    with pytest.raises(ArgumentError, match="exactly one field"):
        ArrayDataset(source, arrays["y"])


def test_pickle_is_cheap_for_files_and_reads_after(data_files: DataFiles, arrays: dict) -> None:
    ds = open_dataset(data_files.h5(arrays))
    ds[0]
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone[5]["x"].numpy(), arrays["x"][5])
    ram = pickle.loads(pickle.dumps(ArrayDataset(arrays["x"])))
    np.testing.assert_array_equal(ram[2][0].numpy(), arrays["x"][2])
    clone.close()
    ds.close()


# ---------------------------------------------------------------------------------------------
# open_dataset
# ---------------------------------------------------------------------------------------------

def test_open_dataset_kinds(data_files: DataFiles, arrays: dict) -> None:
    folder = open_dataset(data_files.npy_dir(arrays))
    assert list(folder.fields) == ["w", "x", "y"] and folder.named
    one = open_dataset(data_files.npy("feat", arrays["x"]))
    assert list(one.fields) == ["feat"] and one[3]["feat"].shape == (4, 3)
    h5 = open_dataset(data_files.h5({**arrays, "g/z": arrays["y"]}), fields=["g/z", "x"])
    assert list(h5.fields) == ["g/z", "x"] and int(h5[2]["g/z"]) == arrays["y"][2]
    sniffed = open_dataset(data_files.h5(arrays, name="no_suffix.data"))
    assert isinstance(sniffed.source, Hdf5Source)
    raw = open_dataset(data_files.raw("r", arrays["x"]), dtype="float32", shape=(-1, 4, 3))
    np.testing.assert_array_equal(raw[6]["r"].numpy(), arrays["x"][6])
    picked = open_dataset(data_files.npy_dir(arrays), fields=["y", "x"])
    assert list(picked.fields) == ["y", "x"]
    np.testing.assert_array_equal(picked.read_batch([4, 1])["y"].numpy(), arrays["y"][[4, 1]])


def test_open_dataset_errors(data_files: DataFiles, arrays: dict) -> None:
    root = data_files.root
    with pytest.raises(SourceNotFoundError, match="path '.*missing.h5' does not exist"):
        open_dataset(root / "missing.h5")
    with pytest.raises(FileNotFoundError):
        open_dataset(root / "missing")
    (root / "nothing").mkdir()
    with pytest.raises(SourceError, match="contains no .npy files"):
        open_dataset(root / "nothing")
    good = data_files.npy("ok", arrays["x"])
    with pytest.raises(SourceError, match="cut.npy.*not a readable .npy"):
        open_dataset(data_files.write("cut.npy", good.read_bytes()[:-10]))
    with pytest.raises(SourceError, match="bogus.h5.*not an HDF5 file"):
        open_dataset(data_files.write("bogus.h5", b"hello" * 100))
    h5 = data_files.h5(arrays)
    with pytest.raises(KeyError, match=r"no dataset 'q'.*'w', 'x', 'y'"):
        open_dataset(h5, fields=["x", "q"])
    with pytest.raises(FieldNotFoundError, match=r"no field 'q'.*\['ok'\]"):
        open_dataset(good, fields=["q"])
    with pytest.raises(ArgumentTypeError, match="fields must be a list.*'x'"):
        open_dataset(h5, fields="x")
    with pytest.raises(SourceError, match=r"share dimension 0.*'y': 52"):
        open_dataset(data_files.h5({"x": arrays["x"], "y": arrays["y"][:-1]}, name="d.h5"))
    raw = data_files.raw("blob", arrays["x"])
    with pytest.raises(SourceError, match="blob.bin.*pass dtype="):
        open_dataset(raw)
    with pytest.raises(SourceError, match="bytes, not a multiple"):
        open_dataset(raw, dtype="float32", shape=(-1, 5))
    with pytest.raises(ArgumentError, match="at most one -1"):
        open_dataset(raw, dtype="float32", shape=(-1, -1, 3))
    with pytest.raises(ArgumentError, match="dtype=/shape= apply to raw binary files only"):
        open_dataset(h5, dtype="float32")
