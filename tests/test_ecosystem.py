"""gpuloader inside the frameworks users train with (accelerate, Lightning), the README's
patterns run as written, and a quick ``gpuloader --version``.

The framework packages come with the ``test`` extra; the tests skip where they are missing."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import gpuloader as gl

ROOT = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md, as written."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("```python\n", text.index(heading)) + len("```python\n")
    return text[start:text.index("```\n", start)]


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=280)


def test_version_answers_without_importing_torch() -> None:
    code = ("import sys, gpuloader_cli\n"
            "status = gpuloader_cli.main(['--version'])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "sys.exit(status)\n")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ,
                          PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("gpuloader ")


# -- accelerate ---------------------------------------------------------------------------------

def test_accelerate_keeps_a_loader_that_can_run_as_it_is() -> None:
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    ds = gl.ArrayDataset(x=torch.arange(40, dtype=torch.float32).reshape(20, 2),
                         y=torch.arange(20))
    loader = gl.DataLoader(ds, batch_size=4, shuffle=True, seed=0, device="cpu")
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for the supported case
        model, optimizer, prepared = accelerator.prepare(model, optimizer, loader)
    assert prepared is loader
    seen = [int(i) for batch in prepared for i in batch["y"]]
    assert sorted(seen) == list(range(20))
    assert loader.use_stateful_dataloader  # save_state / load_state keep its position


def test_accelerate_readme_pattern_runs_as_written(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    pytest.importorskip("sklearn")
    done = run_python(readme_block("### Hugging Face accelerate"), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "last loss" in done.stdout


# -- Lightning ----------------------------------------------------------------------------------

_LIGHTNING_DEFAULT_SAMPLER = '''
# Lightning's default (use_distributed_sampler=True) with a distributed run and a loader that
# shards itself: the loader's error must say what to change.
class Sharded(Digits):
    def train_dataloader(self):
        loader = super().train_dataloader()
        return gl.DataLoader(loader.dataset, batch_size=64, shuffle=True, distributed=True)

try:
    L.Trainer(max_epochs=1, accelerator="cpu", devices=1, strategy="ddp", logger=False,
              enable_checkpointing=False, enable_progress_bar=False).fit(Sharded())
except Exception as exc:
    print("ERROR:", exc)
'''


def test_lightning_readme_pattern_and_the_default_sampler_error(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    code = readme_block("### PyTorch Lightning") + _LIGHTNING_DEFAULT_SAMPLER
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_epochs=5` reached" in done.stderr + done.stdout
    error = [line for line in done.stdout.splitlines() if line.startswith("ERROR:")]
    assert error and "use_distributed_sampler=False" in error[0], done.stdout[-2000:]
