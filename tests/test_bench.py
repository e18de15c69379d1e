"""gpuloader.bench: the harness runs end to end on tiny data and writes its three files.

These tests check structure (files, record keys, cases), never timings.
"""
from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

from gpuloader import bench
from gpuloader.errors import ArgumentError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = dict(seconds=0.05, repeats=1, progress=False)


@pytest.fixture
def tiny_npy(tmp_path):
    """A folder with x.npy (512 x 32 float32) and y.npy (512 int64)."""
    return bench.make_synthetic(tmp_path / "data", size_mb=0.065, sample_floats=32)


def test_main_end_to_end_writes_json_md_png(tmp_path, tiny_npy, capsys):
    out = tmp_path / "out"
    rc = bench.main(["--data", str(tiny_npy), "--out", str(out), "--batch-size", "32",
                     "--seconds", "0.05", "--repeats", "1", "--num-workers", "0,1",
                     "--no-progress"])
    assert rc == 0
    records = json.loads((out / "results.json").read_text())
    assert isinstance(records, list) and records
    for record in records:
        assert set(bench.RECORD_KEYS) <= set(record), set(bench.RECORD_KEYS) - set(record)
        assert record["samples_per_s"] > 0 and record["batch_size"] == 32
        assert 0.0 <= record["stall_fraction"] <= 1.0
        assert {"cpu_count", "ram_bytes", "torch", "numpy", "h5py", "gpu"} <= set(
            record["machine"])
    cases = {r["case"] for r in records}
    expected = {"gpuloader sequential", "gpuloader shuffle", "gpuloader block",
                "torch per-sample w=0", "torch per-sample w=1",
                "torch __getitems__ w=0", "torch __getitems__ w=1",
                "raw sequential", "raw shuffle", "raw block"}
    assert expected == cases
    # NOTE(bench-fairness): every case consumed the same number of samples.
    assert len({r["samples"] for r in records}) == 1
    assert all(r["ratio_to_torch"] is not None and r["ratio_to_ceiling"] is not None
               for r in records)
    md = (out / "results.md").read_text()
    assert "| case |" in md and "gpuloader shuffle" in md
    assert "gpuloader shuffle" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib (the plot extra: pip install -e .[plot]) is not installed, so "
                    "throughput.png is not written; JSON and Markdown were checked")
    assert (out / "throughput.png").read_bytes()[:8] == PNG_MAGIC


def test_main_synthetic_hdf5_is_cleaned_up(tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "out"
    rc = bench.main(["--format", "h5", "--size-mb", "0.065", "--sample-floats", "32",
                     "--out", str(out), "--batch-size", "32", "--seconds", "0.05",
                     "--repeats", "1", "--orders", "shuffle,block", "--num-workers", "0",
                     "--loaders", "gpuloader,torch,raw", "--no-progress"])
    assert rc == 0
    records = json.loads((out / "results.json").read_text())
    assert {r["case"] for r in records} == {"gpuloader shuffle", "gpuloader block",
                                            "torch per-sample w=0", "raw sequential"}
    assert records[0]["dataset"]["storage"] == "h5"
    # HDF5's ceiling is the sequential read, for every order.
    assert {r["ceiling_case"] for r in records} == {"raw sequential"}
    assert list(scratch.iterdir()) == []  # the synthetic dataset's folder is gone


def test_compare_generic_dataset_gets_generic_cases():
    class Squares(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return torch.tensor([float(i) ** 2])

    records = bench.compare(Squares(), batch_size=8, orders=["shuffle"], num_workers=[0], **FAST)
    assert [r["case"] for r in records] == ["gpuloader shuffle", "torch per-sample w=0"]
    assert all(r["ceiling_case"] is None for r in records)  # no source: no raw ceiling
    assert all(r["samples"] % 8 == 0 for r in records)


def test_compare_in_ram_arrays_with_explicit_raw():
    x = np.arange(256 * 4, dtype=np.float32).reshape(256, 4)
    ds = torch.utils.data.TensorDataset(torch.from_numpy(x))
    records = bench.compare(ds, batch_size=16, loaders=["raw", "raw-seq", "torch"],
                            orders=["sequential"], num_workers=[0], raw={"x": x}, samples=64,
                            **{k: v for k, v in FAST.items() if k != "seconds"})
    assert {r["loader"] for r in records} == {"raw", "raw-seq", "torch"}
    assert all(r["samples"] == 64 and r["batches"] == 4 for r in records)
    assert all(r["gb_per_s"] > 0 for r in records)


def test_write_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    record = {key: None for key in bench.RECORD_KEYS}
    record.update(case="raw sequential", loader="raw", order="sequential", batch_size=4,
                  num_workers=0, device="cpu", compute_ms=0.0, samples=8, repeats=1,
                  samples_per_s=100.0, gb_per_s=0.1, stall_fraction=0.5, dataset={},
                  machine={})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    written = bench.write_report([record], tmp_path)
    assert set(written) == {"json", "md"}
    assert not (tmp_path / "throughput.png").exists()
    assert "pip install gpuloader[plot]" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    (dict(loaders=["nope"]), "loaders must name some of"),
    (dict(orders=["random"]), "orders must name some of"),
    (dict(batch_size=10_000), "batch_size must be <= len"),
    (dict(repeats=0), "repeats must be an int >= 1"),
    (dict(num_workers=[-1]), "num_workers must be ints >= 0"),
    (dict(loaders=["h2d"]), "leave no case to run"),
])
def test_compare_rejects_bad_options(kwargs, match):
    ds = torch.utils.data.TensorDataset(torch.zeros(32, 2))
    with pytest.raises(ArgumentError, match=match):
        bench.compare(ds, **{"batch_size": 4, **FAST, **kwargs})


def test_main_reports_bad_option_and_returns_2(tmp_path, tiny_npy, capsys):
    rc = bench.main(["--data", str(tiny_npy), "--out", str(tmp_path), "--loaders", "bogus",
                     "--no-progress"])
    assert rc == 2
    assert "loaders must name some of" in capsys.readouterr().err


def test_cli_bench_subcommand(tmp_path, tiny_npy):
    from gpuloader import cli

    out = tmp_path / "out"
    rc = cli.main(["bench", "--data", str(tiny_npy), "--out", str(out), "--batch-size", "32",
                   "--loaders", "gpuloader,raw", "--orders", "sequential", "--seconds", "0.05",
                   "--repeats", "1", "--no-progress"])
    assert rc == 0
    records = json.loads((out / "results.json").read_text())
    assert [r["case"] for r in records] == ["gpuloader sequential", "raw sequential"]
