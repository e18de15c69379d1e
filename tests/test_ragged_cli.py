"""``gpuloader convert`` for text and ragged formats, ``gpuloader inspect`` on ragged data."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import gpuloader as gl
from gpuloader.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("hello")
    (root / "sub" / "b.py").write_text("print('é')\n")
    (root / "c.txt").write_text("")
    return root


def test_text_folder_becomes_byte_tokens(tmp_path, texts, capsys):
    code, out, _ = run(capsys, "convert", str(texts), str(tmp_path / "tok"))
    assert code == 0 and "3 documents" in out
    ds = gl.open_dataset(tmp_path / "tok")
    docs = [p.read_bytes() for p in sorted(q for q in texts.glob("**/*") if q.is_file())]
    assert [bytes(ds[i]["tokens"].numpy()) for i in range(len(ds))] == docs
    code, out, _ = run(capsys, "convert", str(texts), str(tmp_path / "py.bin"), "--glob", "**/*.py")
    assert code == 0 and len(gl.open_dataset(tmp_path / "py.idx")) == 1


def test_json_lines_with_text_key(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"body": t, "id": i})
                             for i, t in enumerate(["one", "twö", "three"])) + "\n")
    code, _, _ = run(capsys, "convert", str(src), str(tmp_path / "t"), "--text-key", "body")
    assert code == 0
    ds = gl.open_dataset(tmp_path / "t.bin")
    assert [bytes(ds[i]["tokens"].numpy()).decode() for i in range(3)] == ["one", "twö", "three"]
    code, _, err = run(capsys, "convert", str(src), str(tmp_path / "u"), "--text-key", "text")
    assert code == 2 and "line 1 has no string under --text-key 'text'" in err


def test_ragged_formats_round_trip(tmp_path, capsys, rng):
    lengths = rng.integers(0, 50, 30)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    values = rng.integers(0, 1000, int(offsets[-1])).astype(np.int32)
    labels = rng.standard_normal((30, 2)).astype(np.float32)
    folder = tmp_path / "f"
    folder.mkdir()
    np.save(folder / "tokens.values.npy", values)
    np.save(folder / "tokens.offsets.npy", offsets)
    np.save(folder / "label.npy", labels)
    h5 = tmp_path / "r.h5"
    assert run(capsys, "convert", str(folder), str(h5), "--compression", "gzip")[0] == 0
    with h5py.File(h5) as f:
        assert f["tokens/values"].compression == "gzip"
    back = tmp_path / "back"
    assert run(capsys, "convert", str(h5), str(back))[0] == 0
    for name in ("tokens.values.npy", "tokens.offsets.npy", "label.npy"):
        np.testing.assert_array_equal(np.load(back / name), np.load(folder / name))
    code, _, err = run(capsys, "convert", str(h5), str(tmp_path / "m.bin"))
    assert code == 2 and "exactly one ragged field" in err
    assert run(capsys, "convert", str(h5), str(tmp_path / "m.bin"), "--fields", "tokens")[0] == 0
    ds = gl.open_dataset(tmp_path / "m")
    np.testing.assert_array_equal(ds.lengths(), lengths)
    np.testing.assert_array_equal(ds.read_batch(np.arange(30))["tokens"].numpy(), values)
    code, _, err = run(capsys, "convert", str(h5), str(tmp_path / "m.bin"), "--fields", "tokens")
    assert code == 2 and "exists" in err


def test_inspect_shows_lengths_and_padding_efficiency(tmp_path, capsys):
    lengths = np.array([1, 2, 3, 100] * 25)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    ds_dir = tmp_path / "d"
    ds_dir.mkdir()
    np.save(ds_dir / "tokens.values.npy", np.zeros(offsets[-1], np.uint8))
    np.save(ds_dir / "tokens.offsets.npy", offsets)
    code, out, _ = run(capsys, "inspect", str(ds_dir), "--max-tokens", "200")
    assert code == 0
    assert "count 100, mean 26.5, p50 2, p90 100" in out and "max 100" in out
    assert "max_tokens=200" in out and "padding efficiency" in out
    code, out, _ = run(capsys, "inspect", str(ds_dir), "--max-tokens", "200", "--json")
    report = json.loads(out)["ragged"]["tokens"]
    assert report["padding"]["shuffle"] > report["padding"]["sequential"]
    assert report["lengths"]["tokens"] == int(lengths.sum())


def test_inspect_says_vlen_is_slow(tmp_path, capsys):
    with h5py.File(tmp_path / "v.h5", "w") as f:
        d = f.create_dataset("seq", (2,), dtype=h5py.vlen_dtype(np.float32))
        d[0], d[1] = np.ones(3), np.ones(1)
    code, out, _ = run(capsys, "inspect", str(tmp_path / "v.h5"))
    assert code == 0 and "variable-length" in out and "slower" in out


def test_bench_ragged_writes_json(tmp_path, capsys):
    code, out, _ = run(capsys, "bench", "--ragged", "--corpus-samples", "400", "--stdlib-limit",
                       "20", "--repeats", "1", "--torch-workers", "0", "--max-tokens", "2048", "--stdlib-max-tokens", "8192",
                       "--out", str(tmp_path))
    assert code == 0 and "| lognormal |" in out
    report = json.loads((tmp_path / "ragged.json").read_text())
    for corpus in ("lognormal", "stdlib"):
        res = report["corpora"][corpus]
        assert set(res["tokens_per_s"]) == {"gpuloader", "torch w=0"}
        assert 0 < res["padding_efficiency"]["fixed_random"] <= 1
        assert res["resume_seconds"] > 0


def test_readme_variable_length_example_runs_as_written(tmp_path, monkeypatch, capsys):
    import sysconfig

    from test_ecosystem import readme_block, run_python

    monkeypatch.chdir(tmp_path)
    stdlib = sysconfig.get_paths()["stdlib"]
    assert run(capsys, "convert", stdlib, "stdlib_tokens.bin", "--glob", "*.py")[0] == 0
    code, out, _ = run(capsys, "inspect", "stdlib_tokens", "--max-tokens", "16384")
    assert code == 0 and "padding efficiency" in out
    done = run_python(readme_block("## Variable-length data"), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "tokens_lengths" in done.stdout


def test_max_length_splits_long_documents_into_consecutive_pieces(tmp_path, capsys):
    root = tmp_path / "long"
    root.mkdir()
    docs = {"a.txt": b"x" * 10, "b.txt": bytes(range(25)), "c.txt": b""}
    for name, data in docs.items():
        (root / name).write_bytes(data)
    code, out, _ = run(capsys, "convert", str(root), str(tmp_path / "tok"), "--max-length", "8")
    assert code == 0 and "7 documents" in out  # 10 -> 8+2, 25 -> 8+8+8+1, empty stays
    ds = gl.open_dataset(tmp_path / "tok")
    pieces = [bytes(ds[i]["tokens"].numpy()) for i in range(len(ds))]
    assert all(len(p) <= 8 for p in pieces)
    assert b"".join(pieces) == b"".join(docs[k] for k in sorted(docs))  # consecutive, nothing lost
    code, out, err = run(capsys, "convert", str(root), str(tmp_path / "t2"), "--max-length", "0")
    assert code == 2 and "--max-length" in err + out
