"""``gpuloader demo --text``, examples/text.yaml and the README's sequence-model section: the
whole path from text to a trained byte-level model, run small."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpuloader.cli import main

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def run(capsys: pytest.CaptureFixture, *argv: str):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_text_runs_the_whole_path(tmp_path: Path, py_sources: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    argv = ["demo", "--text", "--text-source", str(py_sources), "--text-steps", "4",
            "--cache-dir", str(cache), "--quiet", "--device", "cpu"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "converting" in out
    loss = re.search(r"loss per byte, last (\d+) steps: ([\d.]+) nats \(validation ([\d.]+)\); "
                     r"unigram entropy of the corpus: ([\d.]+) nats/byte", out)
    assert loss is not None, out
    assert int(loss.group(1)) == 4 and float(loss.group(4)) > 2.5  # Python source: ~3 nats
    assert re.search(r"tokens in 4 steps, [\d,]+ tokens/s on cpu; max_tokens \d+ .*; 0 OOMs",
                     out), out
    (prefix,) = [p.with_suffix("") for p in cache.glob("text-*/tokens.idx")]
    stamp = prefix.with_suffix(".bin").stat().st_mtime_ns
    code, out, err = run(capsys, *argv)  # the cached corpus is reused
    assert code == 0 and "converting" not in out
    assert prefix.with_suffix(".bin").stat().st_mtime_ns == stamp
    prefix.with_suffix(".idx").write_bytes(b"junk")  # a broken index is rebuilt
    code, out, err = run(capsys, *argv)
    assert code == 0 and "rebuilding" in out


def test_demo_text_refuses_a_folder_without_sources(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "demo", "--text", "--text-source", str(tmp_path),
                         "--cache-dir", str(tmp_path / "c"))
    assert code == 2 and err.splitlines() == [
        f"gpuloader: error: --text-source {tmp_path}: expected a folder holding *.py files"]


def test_text_example_runs_after_its_convert_command(tmp_path: Path, py_sources: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """examples/text.yaml as written (a small source folder and few steps instead of the whole
    standard library and 300 steps): its header's convert command, then train."""
    header = (REPO / "examples" / "text.yaml").read_text()
    convert = next(line for line in header.splitlines() if "gpuloader convert" in line)
    assert "--glob '*.py' --max-length 512" in convert and "stdlib_text.bin" in convert
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "convert", str(py_sources), "stdlib_text.bin", "--glob", "*.py",
                       "--max-length", "512")
    assert code == 0
    code, out, err = run(capsys, "train", str(REPO / "examples" / "text.yaml"), "--quiet",
                         "--set", "train.max_steps=3", "--set", "loader.device=cpu")
    assert code == 0, err
    assert "unigram entropy" in out and "val_loss" in out
    assert (tmp_path / "runs" / "text" / "metrics.jsonl").exists()


def test_readme_sequence_section_runs_as_written(tmp_path: Path) -> None:
    from test_ecosystem import readme_block, run_python

    heading = "## Training sequence models with automatic token budgets"
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index(heading):]
    bash = section[section.index("```bash"):].split("```")[1]
    convert = next(line for line in bash.splitlines() if line.startswith("gpuloader convert"))
    assert convert.endswith("stdlib_text.bin --glob '*.py' --max-length 512")
    done = subprocess.run(convert.replace("gpuloader", f"{sys.executable} -m gpuloader", 1),
                          shell=True, cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert done.returncode == 0, done.stderr
    done = run_python(readme_block(heading), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "max_tokens" in done.stdout
