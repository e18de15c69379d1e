"""Files that change or break under the loader: a clear error naming the file, never SIGBUS
or an h5py message that names nothing (NOTE(shrunk-files), NOTE(hdf5-errors))."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import gpuloader as gl
from gpuloader.convert import convert
from gpuloader.errors import SourceError, SourceNotFoundError

ROOT = Path(__file__).resolve().parents[1]
ROWS = 4096

_SHRINK = textwrap.dedent("""
    import os, sys
    import gpuloader as gl
    path = sys.argv[1]
    loader = gl.DataLoader(gl.open_dataset(path), batch_size=64, shuffle=True, seed=0)
    for _ in loader:
        pass
    os.truncate(path, os.path.getsize(path) // 2)   # rewritten in place by someone else
    try:
        for _ in loader:
            pass
    except Exception as exc:
        print(type(exc).__name__, exc)
        sys.exit(3)
    print("no error")
""")


def _h5(path: Path, **create) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.ones((ROWS, 64), np.float32), **create)
        f.create_dataset("y", data=np.arange(ROWS))
    return path


@pytest.mark.parametrize("kind", ["npy", "hdf5-contiguous", "hdf5-chunked"])
def test_a_file_that_shrinks_while_mapped_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    if kind == "npy":
        path = tmp_path / "x.npy"
        np.save(path, np.ones((ROWS, 64), np.float32))
    else:
        path = _h5(tmp_path / "d.h5", **({"chunks": (256, 64)} if kind == "hdf5-chunked"
                                         else {}))
    done = subprocess.run([sys.executable, "-c", _SHRINK, str(path)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr[-2000:])
    assert done.stdout.startswith("SourceError"), done.stdout
    assert str(path) in done.stdout and "shrank" in done.stdout


def test_corrupt_group_metadata_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_group("meta")["a"] = np.arange(3)
        f["x"] = np.ones((10, 2), np.float32)
    raw = path.read_bytes()
    assert b"SNOD" in raw
    path.write_bytes(raw.replace(b"SNOD", b"XXXX"))  # the symbol table nodes' signature
    with pytest.raises(SourceError, match=rf"{path}.*metadata.*bad symbol table node signature"
                                          r".*h5ls"):
        gl.open_dataset(path)


def test_a_missing_external_raw_file_is_named_when_the_dataset_opens(tmp_path: Path) -> None:
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    raw = tmp_path / "x.raw"
    x.tofile(raw)
    path = tmp_path / "ext.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", shape=x.shape, dtype=x.dtype, external=[(str(raw), 0, x.nbytes)])
        f["y"] = np.arange(10)
    np.testing.assert_array_equal(gl.open_dataset(path).read_batch([3])["x"].numpy(), x[3:4])
    raw.unlink()
    with pytest.raises(SourceNotFoundError, match=rf"dataset 'x' of {path} stores its data in "
                                                  rf"the external file {raw}, which is missing"):
        gl.open_dataset(path)


def _corrupt_a_chunk(path: Path, name: str) -> None:
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(1)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 2)
        fh.write(b"\xff" * min(64, info.size - 4))


def test_corrupt_gzip_chunks_name_file_dataset_and_rows(tmp_path: Path) -> None:
    path = _h5(tmp_path / "z.h5", chunks=(256, 64), compression="gzip")
    _corrupt_a_chunk(path, "x")
    with pytest.raises(SourceError, match=rf"dataset 'x' of {path}, rows \d+\.\.\d+.*corrupt"):
        convert(path, tmp_path / "out", progress=False)
    loader = gl.DataLoader(gl.open_dataset(path), batch_size=ROWS)
    with pytest.raises(SourceError, match=rf"dataset 'x' of {path}.*corrupt") as caught:
        next(iter(loader))
    loader.close()
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert f"while reading field 'x' (dataset 'x') from {path}" in notes  # file and field
    assert "sample indices [0, 1, 2" in notes
