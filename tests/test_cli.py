"""The ``gpuloader`` command line, through ``gpuloader.cli.main(argv)`` (and once through
``python -m gpuloader``)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, Tuple

import h5py
import numpy as np
import pytest
import torch

import gpuloader
from gpuloader import train
from gpuloader.cli import main
from gpuloader.config import ConfigError
from gpuloader.demo import demo_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_compute_thread():
    """Tiny models: torch's intra-op threads would only contend with the reader threads (and
    the demo changes the setting; put it back)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(capsys: pytest.CaptureFixture, *argv: str) -> Tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _arrays(n: int = 1000) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((6, 3)), axis=1).astype(np.int64)
    return x, y


@pytest.fixture
def npy_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "npy"
    folder.mkdir()
    x, y = _arrays()
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    return folder


def _config(tmp_path: Path, data: Path, epochs: int = 2) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(f"""\
        data: {{path: {data}, inputs: x, targets: y}}
        loader: {{batch_size: 100, device: cpu}}
        model: {{name: mlp, hidden: [8]}}
        train: {{epochs: {epochs}, lr: 0.01}}
        output: {tmp_path / 'run'}
        """))
    return path


# -------------------------------------------------------------------------------- basics


def test_version(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"gpuloader {gpuloader.__version__}"


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys)
    assert code == 2 and "gpuloader: error:" in err
    code, _, err = run(capsys, "convert", "a", "b", "--compression", "zstd")
    assert code == 2 and "argument --compression: invalid choice: 'zstd'" in err
    code, _, err = run(capsys, "nosuch")
    assert code == 2 and "invalid choice: 'nosuch'" in err
    code, _, err = run(capsys, "demo", "--samples", "-5")
    assert code == 2
    assert err.splitlines() == ["gpuloader demo: error: argument --samples: expected a positive "
                                "integer, got -5 (see `gpuloader demo -h`)"]


# -------------------------------------------------------------------------------- train


def test_train_and_resume(tmp_path: Path, npy_dir: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _config(tmp_path, npy_dir, epochs=3)
    code, out, err = run(capsys, "train", str(cfg), "--quiet", "--set", "train.max_steps=15")
    assert code == 0, err
    assert "epoch 1: loss" in out and "stopped after step 15" in out
    metrics = tmp_path / "run" / train.METRICS
    first = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [(r["epoch"], r.get("partial", False)) for r in first] == [(1, False), (2, True)]

    code, out, err = run(capsys, "train", str(cfg), "--quiet")
    assert code == 2
    assert err.splitlines() == [
        "training mlp on %s (x -> y) for 3 epoch(s); output in %s" % (npy_dir, tmp_path / "run"),
        f"gpuloader: error: output: {tmp_path / 'run'} already holds a run (checkpoint.pt); "
        "use --resume to continue it, --overwrite to start over, or another output "
        "(--set output=...)"]

    code, out, err = run(capsys, "train", str(cfg), "--resume", "--quiet")
    assert code == 0, err
    records = [json.loads(x) for x in metrics.read_text().splitlines()
               if not json.loads(x).get("partial")]  # NOTE(partial-record) in train.py
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["samples"] for r in records] == [1000, 1000, 1000]
    assert records[-1]["loss"] < records[0]["loss"]
    assert "resuming" in out and "epoch 3: loss" in out


def test_train_validation_errors_are_one_line_each(tmp_path: Path, npy_dir: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    cfg = _config(tmp_path, npy_dir)
    code, out, err = run(capsys, "train", str(cfg), "--set", "loader.batchsize=64",
                         "--set", "train.epochs=-1", "--set", "model.name=resnet")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "gpuloader: error: loader.batchsize: unknown key; did you mean batch_size?",
        "gpuloader: error: model.name: unknown model 'resnet'; valid models: mlp, cnn, bytelm, or "
        "\"package.module:factory\" for your own",
        "gpuloader: error: train.epochs: expected a positive integer, got -1",
    ]
    code, _, err = run(capsys, "train", str(tmp_path / "missing.yaml"))
    assert code == 2
    assert err.splitlines() == [f"gpuloader: error: {tmp_path / 'missing.yaml'}: no such config "
                                "file"]
    code, _, err = run(capsys, "train", str(cfg), "--set", "data.fields=[x, z]")
    assert code == 2 and err.splitlines() == [
        "gpuloader: error: data.fields: unknown field 'z'; fields in npy: x, y"]
    assert "Traceback" not in err


def test_debug_shows_the_exception(tmp_path: Path, npy_dir: Path) -> None:
    cfg = _config(tmp_path, npy_dir)
    with pytest.raises(ConfigError, match="did you mean batch_size"):
        main(["train", str(cfg), "--set", "loader.batchsize=64", "--debug"])
    with pytest.raises(ConfigError):
        main(["--debug", "train", str(cfg), "--set", "loader.batchsize=64"])


# -------------------------------------------------------------------------------- inspect


def test_inspect_hdf5(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    x, y = _arrays()
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(128, 6), compression="gzip")
        f.create_dataset("y", data=y)
    code, out, err = run(capsys, "inspect", str(path), "--device", "cpu")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{path} (hdf5)"
    assert lines[1] == "rows: 1,000"
    header = lines[2].split()
    assert header[:5] == ["field", "dtype", "shape", "bytes/sample", "total"]
    xrow, yrow = lines[3].split(), lines[4].split()
    assert xrow[:4] == ["x", "float32", "(6,)", "24"] and "128" in xrow and "gzip" in xrow
    assert yrow[:4] == ["y", "int64", "()", "8"] and "contiguous" in yrow and "none" in yrow
    assert lines[5] == "bytes: 32.0 kB (32 per sample)"
    assert lines[6].startswith('batch_size="auto" on cpu: 1,000 (free ')

    code, out, _ = run(capsys, "inspect", str(path), "--fields", "y", "--json",
                       "--device", "cpu")
    report = json.loads(out)
    assert code == 0 and report["rows"] == 1000 and report["sample_bytes"] == 8
    assert [f["name"] for f in report["fields"]] == ["y"]
    assert report["auto"]["batch_size"] == 1000 and report["auto"]["device"] == "cpu"


def test_inspect_errors(tmp_path: Path, npy_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "inspect", str(tmp_path / "nope.h5"))
    assert code == 2 and err.startswith("gpuloader: error: open_dataset: path ")
    assert len(err.splitlines()) == 1
    code, _, err = run(capsys, "inspect", str(npy_dir), "--fields", "q")
    assert code == 2 and err.startswith("gpuloader: error: ") and "'q'" in err


# -------------------------------------------------------------------------------- convert


@pytest.mark.parametrize("compression", ["none", "gzip", "lzf"])
def test_convert_round_trip(tmp_path: Path, npy_dir: Path, compression: str,
                            capsys: pytest.CaptureFixture) -> None:
    h5 = tmp_path / "out.h5"
    code, out, err = run(capsys, "convert", str(npy_dir), str(h5), "--chunk-rows", "64",
                         "--compression", compression, "--quiet")
    assert code == 0, err
    assert out.startswith(f"wrote {h5}: 1,000 rows")
    with h5py.File(h5, "r") as f:
        assert f["x"].chunks == (64, 6) and f["y"].chunks == (64,)
        assert f["x"].compression == (None if compression == "none" else compression)
    back = tmp_path / "back"
    code, _, err = run(capsys, "convert", str(h5), str(back), "--quiet")
    assert code == 0, err
    for name in ("x", "y"):
        original = np.load(npy_dir / f"{name}.npy")
        copy = np.load(back / f"{name}.npy")
        assert copy.dtype == original.dtype and np.array_equal(copy, original)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_convert_streams_in_blocks(tmp_path: Path, npy_dir: Path) -> None:
    from gpuloader.convert import convert

    summary = convert(npy_dir, tmp_path / "a.h5", block_bytes=100, chunk_rows=7)
    assert summary["rows"] == 1000 and summary["chunks"] == {"x": [7, 6], "y": [7]}
    convert(tmp_path / "a.h5", tmp_path / "x_only.npy", fields=["x"], block_bytes=50)
    assert np.array_equal(np.load(tmp_path / "x_only.npy"), np.load(npy_dir / "x.npy"))


def test_convert_errors(tmp_path: Path, npy_dir: Path, capsys: pytest.CaptureFixture) -> None:
    h5 = tmp_path / "o.h5"
    assert run(capsys, "convert", str(npy_dir), str(h5), "--quiet")[0] == 0
    code, _, err = run(capsys, "convert", str(npy_dir), str(h5), "--quiet")
    assert code == 2 and err.splitlines() == [
        f"gpuloader: error: convert: destination '{h5}' exists; pass overwrite=True "
        "(--overwrite) to replace it"]
    assert run(capsys, "convert", str(npy_dir), str(h5), "--overwrite", "--quiet")[0] == 0
    code, _, err = run(capsys, "convert", str(npy_dir), str(tmp_path / "f"), "--chunk-rows", "8")
    assert code == 2 and "chunk_rows and compression apply to HDF5 output only" in err
    code, _, err = run(capsys, "convert", str(tmp_path / "none"), str(tmp_path / "z.h5"))
    assert code == 2 and "does not exist" in err
    np.save(npy_dir / "short.npy", np.zeros(5))
    code, _, err = run(capsys, "convert", str(npy_dir), str(tmp_path / "z.h5"))
    assert code == 2 and "differ in length (short: 5, x: 1000, y: 1000)" in err
    code, _, err = run(capsys, "convert", str(npy_dir), str(tmp_path / "z.h5"), "--fields", "x,y",
                       "--quiet")
    assert code == 0, err


# -------------------------------------------------------------------------------- probe


def test_probe(capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "probe")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["device", "probe", "free", "total", "source"]
    host = [line for line in lines if line.startswith("cpu ")]
    assert len(host) == 1 and "GiB" in host[0] and "psutil" in host[0]
    assert any(" nvml " in line for line in lines)
    code, out, _ = run(capsys, "probe", "--device", "cpu")
    assert code == 0 and len(out.splitlines()) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_probe_absent_cuda_is_one_line(capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "probe", "--device", "cuda:0")
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("gpuloader: error: device='cuda:0' asks for CUDA")


# -------------------------------------------------------------------------------- demo


def test_demo_small(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    code, out, err = run(capsys, "demo", "--samples", "3000", "--features", "16",
                         "--cache-dir", str(cache), "--quiet", "--format", "hdf5")
    assert code == 0, err
    assert re.search(r"gpuloader path\s+fast\s", out), out  # which path (issue 15)
    for text in ("samples/s", "GB/s", "batch sizes", "stall fraction", "(auto, max 1024)",
                 "torch DataLoader (per-sample, num_workers=0)", "loss first -> last"):
        assert text in out
    loss_row = next(line for line in out.splitlines() if line.startswith("loss first"))
    first, last = (float(v) for v in loss_row.split()[4:7:2])
    assert last < first  # the synthetic task is learnable
    data = demo_data(samples=3000, features=16, cache_dir=str(cache))
    assert data.hdf5.exists() and (data.npy / "x.npy").exists()


def test_demo_cache_is_checked_and_rebuilt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = str(tmp_path / "cache")
    code, out, _ = run(capsys, "demo", "--prepare-only", "--samples", "500", "--features", "4",
                       "--cache-dir", cache, "--quiet")
    data = demo_data(samples=500, features=4, cache_dir=cache)
    assert code == 0 and out.splitlines() == [f"npy:  {data.npy}", f"hdf5: {data.hdf5}"]
    x_file = data.npy / "x.npy"
    stamp = x_file.stat().st_mtime_ns
    demo_data(samples=500, features=4, cache_dir=cache)  # valid: reused as is
    assert x_file.stat().st_mtime_ns == stamp
    original = np.load(x_file)
    with open(x_file, "r+b") as fh:  # truncate: the cache must be rebuilt
        fh.truncate(x_file.stat().st_size - 4)
    messages: List[str] = []
    demo_data(samples=500, features=4, cache_dir=cache, log=messages.append)
    assert messages and messages[0].startswith("rebuilding")
    assert np.array_equal(np.load(x_file), original)  # same seed, same data
    with h5py.File(data.hdf5, "r") as f:
        assert f["x"].shape == (500, 4) and f["y"].shape == (500,)


def test_demo_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gpuloader.demo import cache_root

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "gpuloader"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert cache_root() == Path(os.path.expanduser("~/.cache/gpuloader"))
    assert cache_root("/x/y") == Path("/x/y")


def test_examples_point_at_the_demo_cache(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    """Each example validates once `gpuloader demo` made its data (here: a stand-in of the
    same shape under a temporary XDG_CACHE_HOME)."""
    from gpuloader.config import load
    from gpuloader.demo import DEFAULT_CLASSES, DEFAULT_FEATURES, DEFAULT_SAMPLES

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = tmp_path / "gpuloader" / (f"demo-{DEFAULT_SAMPLES}x{DEFAULT_FEATURES}-"
                                     f"c{DEFAULT_CLASSES}-s0")
    (root / "npy").mkdir(parents=True)
    np.save(root / "npy" / "x.npy", np.zeros((4, DEFAULT_FEATURES), np.float32))
    np.save(root / "npy" / "y.npy", np.zeros(4, np.int64))
    with h5py.File(root / "data.h5", "w") as f:
        f["x"] = np.zeros((4, DEFAULT_FEATURES), np.float32)
        f["y"] = np.zeros(4, np.int64)
    monkeypatch.chdir(tmp_path)  # examples/text.yaml reads stdlib_text from here
    from gpuloader.ragged_convert import write_tokens

    write_tokens([b"print(1)\n", b"x = 2\n"], tmp_path / "stdlib_text.bin")
    examples = sorted((REPO / "examples").glob("*.yaml"))
    assert {p.name for p in examples} >= {"npy.yaml", "hdf5.yaml", "global_batch.yaml",
                                          "text.yaml"}
    for path in examples:
        cfg = load(path, ["loader.device=cpu"])
        if path.name == "text.yaml":  # made by the convert command in its header
            assert cfg.data.path == str(tmp_path / "stdlib_text")
            assert cfg.data.targets is None and cfg.model.name == "bytelm"
        else:
            assert cfg.data.path.startswith(str(root))


# -------------------------------------------------------------------------------- bench


def test_bench_is_delegated(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "bench", "--help")
    assert code == 0 and "usage: gpuloader bench" in out and "--loaders" in out


# -------------------------------------------------------------------------------- python -m


def test_python_dash_m(tmp_path: Path, npy_dir: Path) -> None:
    cfg = _config(tmp_path, npy_dir)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "gpuloader", "train", str(cfg), "--set",
                           "train.epochs=0"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "gpuloader: error: train.epochs: expected a positive integer, got 0"]
