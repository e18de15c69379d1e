"""Sources against plain numpy: every storage kind, any indices, pickling, fork, threads, errors."""
from __future__ import annotations

import multiprocessing
import pickle
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Tuple

import h5py
import numpy as np
import pytest
import torch
# hypothesis is a test extra: on a machine without it (a bare GPU box) skip, do not error.
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import DataFiles, fork_available, sample_arrays
from gpuloader.errors import (ArgumentError, ArgumentTypeError, FieldNotFoundError,
                              SampleIndexError, SourceError, SourceNotFoundError)
from gpuloader.sources import ArraysSource, Hdf5Source, NpySource, Source
from gpuloader.sources.base import LONG_RUN_ROWS, RowPlan

N = 700  # > 2 * LONG_RUN_ROWS, so dense batches with slice-copied runs are reachable
CHUNK = 16


def read(source: Source, indices: Any) -> Dict[str, np.ndarray]:
    """``read_into`` into fresh arrays."""
    idx = np.asarray(indices, dtype=np.int64)
    out = {name: np.empty((len(idx), *spec.shape), dtype=spec.dtype)
           for name, spec in source.fields.items()}
    source.read_into(idx, out)
    return out


def assert_rows(source: Source, expected: Mapping[str, np.ndarray], indices: Any) -> None:
    got = read(source, indices)
    assert list(got) == list(expected)
    idx = np.asarray(indices, dtype=np.int64)
    for name, arr in expected.items():
        np.testing.assert_array_equal(got[name], arr[idx], err_msg=name)
        assert got[name].dtype.isnative


def interleaved_h5(path: Path, x: np.ndarray, z: np.ndarray) -> None:
    """Write two chunked datasets chunk by chunk, alternating, so x's chunks sit at addresses
    with many different residues modulo its row size (many chunk-map views); x's rows 40..79
    are never written."""
    with h5py.File(path, "w", rdcc_nbytes=0) as h5:  # no cache: chunks land as written
        dx = h5.create_dataset("x", shape=x.shape, dtype=x.dtype, chunks=(4, *x.shape[1:]))
        dz = h5.create_dataset("z", shape=z.shape, dtype=z.dtype, chunks=(5,))
        for k in range(0, len(x), 4):
            if not 40 <= k < 80:  # leave a few chunks unwritten: they read as zeros
                dx[k:k + 4] = x[k:k + 4]
            dz[k:k + 4] = z[k:k + 4]


Built = Tuple[Source, Dict[str, np.ndarray]]


def build_kinds(files: DataFiles) -> Dict[str, Callable[[], Built]]:
    """kind -> builder of (source, the arrays it must reproduce)."""
    a = sample_arrays(N)
    x, y, w = a["x"], a["y"], a["w"]
    chunked = {"x": (x, {"chunks": (CHUNK, 4, 3)}), "y": (y, {"chunks": (2 * CHUNK,)})}
    partial = np.zeros_like(x)
    partial[: 2 * CHUNK] = x[: 2 * CHUNK]
    partial[5 * CHUNK: 7 * CHUNK] = x[5 * CHUNK: 7 * CHUNK]

    def unallocated(compression: Any) -> Built:
        path = files.h5({"x": (None, {"shape": x.shape, "dtype": x.dtype,
                                      "chunks": (CHUNK, 4, 3), "compression": compression})},
                        name=f"unalloc-{compression}.h5")
        with h5py.File(path, "r+") as h5:
            h5["x"][: 2 * CHUNK] = x[: 2 * CHUNK]
            h5["x"][5 * CHUNK: 7 * CHUNK] = x[5 * CHUNK: 7 * CHUNK]
        return Hdf5Source(path), {"x": partial}

    def interleaved() -> Built:
        z = (np.arange(N) % 100).astype(np.int8)
        path = files.root / "interleaved.h5"
        thin = x[:, :, :1].copy()
        interleaved_h5(path, thin, z)
        thin[40:80] = 0
        return Hdf5Source(path), {"x": thin, "z": z}

    def arrays_mixed() -> Built:
        path = files.h5({"w": w}, name="mixed.h5")
        h5 = h5py.File(path, "r")
        src = ArraysSource({"x": x, "y": torch.from_numpy(y), "w": h5["w"]})
        h5.close()
        return src, {"x": x, "y": y, "w": w}

    def memmapped() -> Built:
        mm = np.load(files.npy("mmx", x), mmap_mode="r")
        return ArraysSource({"x": mm, "y": y}), {"x": x, "y": y}

    big = x.astype(">f8")
    return {
        "npy-files": lambda: (NpySource([files.npy(k, v) for k, v in a.items()]), a),
        "npy-dir": lambda: (NpySource(files.npy_dir(a, "dir")), dict(sorted(a.items()))),
        "npy-fortran": lambda: (NpySource(files.npy("fx", x.reshape(N, 12), fortran=True)),
                                {"fx": x.reshape(N, 12)}),
        "npy-bigendian": lambda: (NpySource(files.npy("bx", big)), {"bx": big}),
        "raw": lambda: (NpySource(files.raw("rx", x), dtype="float32", shape=(-1, 4, 3)),
                        {"rx": x}),
        # HDF5 lists a group's members by name unless it tracks creation order.
        "h5-contiguous": lambda: (Hdf5Source(files.h5(a, name="c.h5")), dict(sorted(a.items()))),
        "h5-chunked": lambda: (Hdf5Source(files.h5(chunked, name="k.h5")), {"x": x, "y": y}),
        "h5-chunked-latest": lambda: (Hdf5Source(files.h5(chunked, name="kl.h5",
                                                          libver="latest")), {"x": x, "y": y}),
        "h5-chunk-split": lambda: (Hdf5Source(files.h5({"x": (x, {"chunks": (CHUNK, 2, 3)})},
                                                       name="split.h5")), {"x": x}),
        "h5-gzip": lambda: (Hdf5Source(files.h5(
            {"x": (x, {"chunks": (CHUNK, 4, 3), "compression": "gzip"}),
             "y": (y, {"chunks": (CHUNK,), "compression": "gzip", "shuffle": True})},
            name="gz.h5")), {"x": x, "y": y}),
        "h5-lzf": lambda: (Hdf5Source(files.h5({"w": (w, {"chunks": (CHUNK, 2),
                                                          "compression": "lzf"})},
                                               name="lzf.h5")), {"w": w}),
        "h5-group": lambda: (Hdf5Source(files.h5({"grp/sub/z": x, "y": y}, name="g.h5"),
                                        ["grp/sub/z", "y"]), {"grp/sub/z": x, "y": y}),
        "h5-bigendian": lambda: (Hdf5Source(files.h5(
            {"c": big, "k": (big, {"chunks": (CHUNK, 4, 3)})}, name="be.h5")),
            {"c": big, "k": big}),
        "h5-userblock": lambda: (Hdf5Source(files.h5({"x": x, "y": (y, {"chunks": (CHUNK,)})},
                                                     name="ub.h5", userblock_size=512)),
                                 {"x": x, "y": y}),
        "h5-unallocated": lambda: unallocated(None),
        "h5-unallocated-gzip": lambda: unallocated("gzip"),
        "h5-interleaved": interleaved,
        "arrays": arrays_mixed,
        "arrays-strided": lambda: (ArraysSource({"x": x[:, ::2, 1:], "y": y[::-1]}),
                                   {"x": x[:, ::2, 1:], "y": y[::-1]}),
        "arrays-memmap": memmapped,
    }


KINDS = list(build_kinds(DataFiles(Path("."))))


class SourceTable(dict):
    """kind -> Built, with a short repr (hypothesis prints test arguments on failure)."""

    def __repr__(self) -> str:
        return f"<{len(self)} sources>"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Built]:
    files = DataFiles(tmp_path_factory.mktemp("sources"))
    return SourceTable({kind: make() for kind, make in build_kinds(files).items()})


def index_arrays(n: int) -> st.SearchStrategy:
    """Indices in [0, n): arbitrary (unsorted, duplicates), sorted sets, and runs."""
    anything = st.lists(st.integers(0, n - 1), max_size=80)
    sorted_set = st.sets(st.integers(0, n - 1), max_size=120).map(sorted)
    run = st.tuples(st.integers(0, n - 1), st.integers(0, n)).map(
        lambda t: list(range(t[0], min(n, t[0] + t[1]))))
    runs = st.lists(run, max_size=4).map(lambda rs: sorted({i for r in rs for i in r}))
    return st.one_of(anything, sorted_set, run, runs)


# ---------------------------------------------------------------------------------------------
# Correctness against numpy
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(indices=index_arrays(N))
def test_read_into_matches_numpy(sources: Dict[str, Built], kind: str, indices: list) -> None:
    source, expected = sources[kind]
    assert len(source) == N
    assert_rows(source, expected, indices)


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_index_patterns(sources: Dict[str, Built], kind: str) -> None:
    source, expected = sources[kind]
    rng = np.random.default_rng(7)
    shuffled_sorted = np.sort(rng.choice(N, 200, replace=False))
    for indices in ([], [0], [N - 1], list(range(N)), list(range(N))[::-1], [3, 3, 3, 1],
                    shuffled_sorted, rng.permutation(N), np.r_[0:300, 400:690]):
        assert_rows(source, expected, indices)
    assert source.chunk_length >= 1
    assert isinstance(source, Source)


def test_row_plan_segments() -> None:
    seq = RowPlan(np.arange(10, 20), 100)
    assert seq.segments == ((0, 10, 10),) and seq.is_sorted
    dense = RowPlan(np.r_[0:LONG_RUN_ROWS, LONG_RUN_ROWS + 1, LONG_RUN_ROWS + 3], 1000)
    assert dense.segments == ((0, LONG_RUN_ROWS, 0), (LONG_RUN_ROWS, LONG_RUN_ROWS + 2, -1))
    sparse = RowPlan(np.array([5, 90, 7]), 100)
    assert sparse.segments == ((0, 3, -1),) and not sparse.is_sorted
    assert RowPlan(np.array([], dtype=np.int64), 0).segments == ()


@pytest.mark.parametrize("dtype", ["bool", "int8", "uint8", "int16", "uint16", "int32",
                                   "uint32", "int64", "uint64", "float16", "float32",
                                   "float64", "complex64", ">i4"])
def test_dtypes(data_files: DataFiles, dtype: str) -> None:
    base = np.arange(60 * 3).reshape(60, 3) % 7
    arr = (base > 2) if dtype == "bool" else base.astype(dtype)
    idx = [0, 5, 6, 7, 59, 2, 2]
    h5 = data_files.h5({"c": arr, "k": (arr, {"chunks": (8, 3)}),
                        "z": (arr, {"chunks": (8, 3), "compression": "gzip"})})
    for source in (NpySource(data_files.npy("a", arr)), Hdf5Source(h5),
                   ArraysSource({"a": arr})):
        expected = {name: arr for name in source.fields}
        assert_rows(source, expected, idx)
        for spec in source.fields.values():
            assert spec.dtype == np.dtype(dtype).newbyteorder("=")


def test_storage_descriptions(sources: Dict[str, Built]) -> None:
    def info(kind: str, name: str) -> Tuple[str, str, Any, Any]:
        s = sources[kind][0].storage[name]
        return s.layout, s.read_path, s.compression, s.chunk_rows

    assert info("h5-contiguous", "x") == ("contiguous", "memmap", None, None)
    assert info("h5-chunked", "x") == ("chunked", "chunk-map", None, CHUNK)
    assert info("h5-chunk-split", "x") == ("chunked", "slab", None, CHUNK)
    assert info("h5-gzip", "x") == ("compressed", "slab", "gzip", CHUNK)
    assert info("h5-lzf", "w") == ("compressed", "slab", "lzf", CHUNK)
    assert info("npy-files", "x")[:2] == ("contiguous", "memmap")
    assert sources["raw"][0].storage["rx"].format == "raw"
    assert info("arrays", "w")[1] == "memmap"  # the h5py dataset became an Hdf5Source field
    assert info("arrays-strided", "x")[:2] == ("strided", "ram")
    assert info("arrays-memmap", "x")[1] == "memmap"
    assert sources["h5-chunked"][0].chunk_length == 2 * CHUNK
    assert sources["h5-contiguous"][0].chunk_length == sources["npy-files"][0].chunk_length


def test_interleaved_chunks_use_many_views(sources: Dict[str, Built]) -> None:
    source, expected = sources["h5-interleaved"]
    read(source, [0])
    reader = source._handles.get(source._open).readers["x"]
    assert len(reader.views) > 2
    assert_rows(source, expected, np.arange(0, N, 3))  # many view switches: one pass per view


def test_unallocated_chunks_read_fill_value(data_files: DataFiles) -> None:
    opts = {"shape": (40, 2), "dtype": "int32", "chunks": (8, 2), "fillvalue": -5}
    path = data_files.h5({"m": (None, opts), "s": (None, {**opts, "compression": "gzip"}),
                          "e": (None, {**opts, "chunks": (8, 1)})})
    with h5py.File(path, "r+") as h5:
        for key in ("m", "s", "e"):
            h5[key][8:16] = 1
    source = Hdf5Source(path)
    assert [source.storage[k].read_path for k in "mse"] == ["chunk-map", "slab", "slab"]
    got = read(source, [0, 9, 39, 15, 16])
    for key in "mse":
        np.testing.assert_array_equal(got[key][:, 0], [-5, 1, -5, 1, -5])


def test_empty_and_zero_length_sources(data_files: DataFiles) -> None:
    empty = np.zeros((0, 3), np.float32)
    for source in (NpySource(data_files.npy("e", empty)),
                   Hdf5Source(data_files.h5({"e": empty, "k": (empty, {"chunks": (4, 3),
                                                                       "maxshape": (None, 3)})})),
                   ArraysSource({"e": empty})):
        assert len(source) == 0
        assert all(v.shape == (0, 3) for v in read(source, []).values())
        with pytest.raises(SampleIndexError, match="out of range"):
            read(source, [0])


# ---------------------------------------------------------------------------------------------
# Pickling, fork, threads, close
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_pickle_round_trip(sources: Dict[str, Built], kind: str) -> None:
    source, expected = sources[kind]
    read(source, [1, 2])  # handles open in this process: they must not travel
    blob = pickle.dumps(source)
    if not kind.startswith("arrays"):
        assert len(blob) < 20_000, "file-backed sources pickle paths, not data"
    clone = pickle.loads(blob)
    assert dict(clone.fields) == dict(source.fields)
    assert_rows(clone, expected, [5, 1, N - 1, 1])


def _child_read(source: Source, indices: list, conn: Any) -> None:
    try:
        conn.send(("ok", read(source, indices)))
    except Exception as exc:  # reported to the parent, which fails the test
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


@pytest.mark.skipif(not fork_available(), reason="needs the 'fork' start method")
@pytest.mark.parametrize("kind", ["npy-dir", "h5-contiguous", "h5-chunked", "h5-gzip",
                                  "arrays"])
def test_read_in_forked_child_after_parent(sources: Dict[str, Built], kind: str) -> None:
    source, expected = sources[kind]
    indices = [3, 1, 400, 401, 402]
    assert_rows(source, expected, indices)  # the parent opened its handles first
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_read, args=(source, indices, child))
    proc.start()
    child.close()
    assert parent.poll(60), "child sent nothing"
    status, payload = parent.recv()
    proc.join(60)
    assert status == "ok", payload
    for name, arr in expected.items():
        np.testing.assert_array_equal(payload[name], arr[indices])
    assert_rows(source, expected, indices)  # the parent's handles still work


@pytest.mark.parametrize("kind", ["h5-gzip", "h5-interleaved", "npy-files", "h5-chunk-split"])
def test_concurrent_reader_threads(sources: Dict[str, Built], kind: str) -> None:
    source, expected = sources[kind]
    source.close()  # threads race to open the handles
    errors: list = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(15):
                idx = np.sort(rng.choice(N, 40, replace=False))
                got = read(source, idx)
                for name, arr in expected.items():
                    np.testing.assert_array_equal(got[name], arr[idx])
        except Exception as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_close_then_read_reopens(sources: Dict[str, Built]) -> None:
    for kind in ("h5-gzip", "npy-dir", "arrays"):
        source, expected = sources[kind]
        source.close()
        source.close()  # idempotent
        assert_rows(source, expected, [0, 10])


def test_h5py_datasets_of_a_file_open_for_writing(data_files: DataFiles) -> None:
    path = data_files.root / "live.h5"
    with h5py.File(path, "w") as h5:
        x = h5.create_dataset("x", data=np.arange(30.0).reshape(10, 3))
        k = h5.create_dataset("k", data=np.arange(10), chunks=(4,), compression="gzip")
        source = ArraysSource({"x": x, "k": k})
        assert_rows(source, {"x": np.arange(30.0).reshape(10, 3), "k": np.arange(10)},
                    [9, 0, 4])
        source.close()
        np.testing.assert_array_equal(k[:3], [0, 1, 2])  # the user's handle survives our close


# ---------------------------------------------------------------------------------------------
# Errors: each names the argument/path, the value, and what is accepted
# ---------------------------------------------------------------------------------------------

def test_npy_errors(data_files: DataFiles) -> None:
    root = data_files.root
    good = data_files.npy("good", np.zeros((4, 2)))
    with pytest.raises(SourceNotFoundError, match="nope.npy.*does not exist"):
        NpySource(root / "nope.npy")
    (root / "empty").mkdir()
    with pytest.raises(SourceError, match="empty.*contains no .npy files"):
        NpySource(root / "empty")
    truncated = data_files.write("trunc.npy", good.read_bytes()[:140])
    with pytest.raises(SourceError, match="trunc.npy.*not a readable .npy"):
        NpySource(truncated)
    with pytest.raises(SourceError, match="corrupt.npy.*not a readable .npy"):
        NpySource(data_files.write("corrupt.npy", b"not numpy at all" * 10))
    with pytest.raises(SourceError, match="zerolen.npy.*not a readable"):
        NpySource(data_files.write("zerolen.npy", b""))
    with pytest.raises(SourceError, match="0-d array"):
        NpySource(data_files.npy("scalar", np.float32(3)))
    with pytest.raises(SourceError, match=r"share dimension 0.*'a': 4.*'b': 5"):
        NpySource(data_files.npy_dir({"a": np.zeros(4), "b": np.zeros(5)}))
    with pytest.raises(FieldNotFoundError, match=r"no field 'zz'.*available fields: \['good'\]"):
        NpySource(good, ["zz"])
    with pytest.raises(KeyError):
        NpySource(good, ["zz"])


def test_raw_errors(data_files: DataFiles) -> None:
    raw = data_files.raw("blob", np.zeros((10, 4), np.float32))  # 160 bytes
    with pytest.raises(SourceError, match="blob.bin.*pass dtype="):
        NpySource(raw)
    with pytest.raises(SourceError, match=r"160 bytes, not a multiple.*\(-1, 3\)"):
        NpySource(raw, dtype="float32", shape=(-1, 3))
    with pytest.raises(SourceError, match=r"160 bytes but shape=\(10, 5\).*needs 200"):
        NpySource(raw, dtype="float32", shape=(10, 5))
    with pytest.raises(ArgumentError, match=r"shape=\(-1, -1\).*at most one -1"):
        NpySource(raw, dtype="float32", shape=(-1, -1))
    with pytest.raises(ArgumentTypeError, match="dtype='flaot32' is not a numpy dtype"):
        NpySource(raw, dtype="flaot32")
    with pytest.raises(ArgumentError, match=r"shape=\(-1, 4\) needs dtype="):
        NpySource(raw, shape=(-1, 4))
    npy = data_files.npy("n", np.zeros(3))
    with pytest.raises(ArgumentError, match="dtype='int8' applies to raw binary files only"):
        NpySource(npy, dtype="int8")
    assert NpySource(raw, dtype="float32", shape=(-1, 4)).fields["blob"].shape == (4,)
    assert len(NpySource(raw, dtype="<f4")) == 40


def test_hdf5_errors(data_files: DataFiles) -> None:
    root = data_files.root
    with pytest.raises(SourceNotFoundError, match="missing.h5.*does not exist"):
        Hdf5Source(root / "missing.h5")
    with pytest.raises(SourceError, match="fake.h5.*not an HDF5 file"):
        Hdf5Source(data_files.write("fake.h5", b"\x00" * 4096))
    path = data_files.h5({"x": np.zeros((5, 2)), "y": np.zeros(6), "grp/z": np.zeros(5)})
    with pytest.raises(SourceError, match=r"share dimension 0.*'x': 5.*'y': 6.*fields="):
        Hdf5Source(path)
    with pytest.raises(FieldNotFoundError, match=r"no dataset 'q'.*'grp/z'.*'x'"):
        Hdf5Source(path, ["x", "q"])
    assert list(Hdf5Source(path, ["grp/z", "x"]).fields) == ["grp/z", "x"]
    assert list(Hdf5Source(path, {"a": "/grp/z"}).fields) == ["a"]
    with pytest.raises(ArgumentTypeError, match="fields must be a list"):
        Hdf5Source(path, "x")
    strings = data_files.h5({"s": np.array(["a", "bb"], dtype=h5py.string_dtype())},
                            name="s.h5")
    with pytest.raises(SourceError, match="'s' has variable-length dtype"):
        Hdf5Source(strings)
    scalar = data_files.h5({"v": np.float64(1.0)}, name="v.h5")
    with pytest.raises(SourceError, match="no top-level dataset with a sample axis"):
        Hdf5Source(scalar)
    with pytest.raises(SourceError, match="'v' is a scalar"):
        Hdf5Source(scalar, ["v"])


def test_read_into_errors(sources: Dict[str, Built]) -> None:
    source, _ = sources["npy-files"]
    with pytest.raises(SampleIndexError, match=f"index {N} is out of range.*{N} samples"):
        read(source, [0, N])
    with pytest.raises(SampleIndexError, match="index -1 is out of range"):
        read(source, [-1])
    with pytest.raises(ArgumentError, match="1-D integer array"):
        source.read_into(np.array([0.5]), {})
    bad = read(source, [0, 1])
    bad["x"] = bad["x"][:1]
    with pytest.raises(ArgumentError, match=r"out\['x'\] has shape \(1, 4, 3\).*\(2, 4, 3\)"):
        source.read_into(np.array([0, 1]), bad)
    with pytest.raises(ArgumentError, match="out has fields"):
        source.read_into(np.array([0]), {})


def test_arrays_source_errors(data_files: DataFiles) -> None:
    with pytest.raises(ArgumentError, match="on meta.*x.cpu()"):
        ArraysSource({"x": torch.empty(3, device="meta")})
    with pytest.raises(ArgumentTypeError, match="'x' is a list.*np.asarray"):
        ArraysSource({"x": [1, 2, 3]})
    with pytest.raises(SourceError, match="'x' is 0-d"):
        ArraysSource({"x": np.array(1.0)})
    with pytest.raises(SourceError, match=r"'a': 3.*'b': 4"):
        ArraysSource({"a": np.zeros(3), "b": torch.zeros(4)})
    with pytest.raises(ArgumentTypeError, match="bfloat16.*float()"):
        ArraysSource({"t": torch.zeros(3, dtype=torch.bfloat16)})
    with pytest.raises(ArgumentError, match="non-empty mapping"):
        ArraysSource({})
    multi = NpySource(data_files.npy_dir({"a": np.zeros(3), "b": np.zeros(3)}))
    with pytest.raises(ArgumentError, match=r"fields \['a', 'b'\].*exactly one field"):
        ArraysSource({"m": multi})
    one = NpySource(data_files.npy("solo", np.arange(3.0)))
    assert_rows(ArraysSource({"renamed": one}), {"renamed": np.arange(3.0)}, [2, 0])
