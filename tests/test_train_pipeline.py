"""gpuloader.train as users run it: a fixed optimization batch under auto sizing, a seeded
validation split, SIGTERM/Ctrl-C checkpoints, model/data mismatches refused before training,
model modules beside the config."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch

from gpuloader import fit, runfiles, train
from gpuloader.config import ConfigError, from_dict, load
from gpuloader.interrupts import TrainingInterrupted

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _data(root: Path, n: int = 600, features: int = 6, classes: int = 3, *,
          sort_by_label: bool = False, label_dtype: Any = np.int64) -> Path:
    folder = root / "data"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, features)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((features, classes)), axis=1)
    if sort_by_label:  # like sklearn's load_wine: rows grouped by class
        order = np.argsort(y, kind="stable")
        x, y = x[order], y[order]
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y.astype(label_dtype))
    return folder


def _raw(tmp_path: Path, folder: Path, **sections: Dict[str, Any]) -> Dict[str, Any]:
    raw: Dict[str, Any] = {"data": {"path": str(folder)},
                           "loader": {"batch_size": 50, "device": "cpu"},
                           "model": {"name": "mlp", "hidden": [8]},
                           "train": {"epochs": 1, "lr": 0.01},
                           "output": str(tmp_path / "run")}
    for key, value in sections.items():
        raw[key] = {**raw[key], **value}
    return raw


# -- item 9: auto sizes micro-batches, not the optimization ------------------------------------

def test_auto_batch_size_keeps_a_fixed_global_batch(tmp_path: Path) -> None:
    """On a CPU, auto alone would make one batch of the whole split (one step per epoch)."""
    cfg = from_dict(_raw(tmp_path, _data(tmp_path), loader={"batch_size": "auto"}))
    assert cfg.train.global_batch_size == 256
    (record,) = train.run(cfg)
    assert record["samples"] == 600
    assert record["step"] == 3  # ceil(600 / 256) optimizer steps, not 1
    assert record["path"] == "fast"


# -- item 10: seeded random validation split ----------------------------------------------------

def test_validation_split_is_random_and_seeded() -> None:
    labels = np.repeat(np.arange(3), 100)  # class-sorted rows
    split = fit.split_rows(300, 0.2, seed=0)
    assert len(split.val) == 60 and len(split.train) == 240
    assert set(np.unique(labels[split.val])) == {0, 1, 2}  # not just the last class
    assert np.array_equal(np.union1d(split.train, split.val), np.arange(300))
    assert np.intersect1d(split.train, split.val).size == 0
    assert np.array_equal(fit.split_rows(300, 0.2, seed=0).val, split.val)
    assert not np.array_equal(fit.split_rows(300, 0.2, seed=1).val, split.val)


def test_class_sorted_data_validates_on_every_class(tmp_path: Path) -> None:
    data = _data(tmp_path, sort_by_label=True)
    cfg = from_dict(_raw(tmp_path, data, train={"val_fraction": 0.2, "epochs": 2}))
    records = train.run(cfg)
    assert 0.0 < records[-1]["val_accuracy"] < 1.0
    state = torch.load(Path(cfg.output) / train.CHECKPOINT, weights_only=True)
    assert state["split"] == {"rows": 600, "val_rows": 120, "seed": 0}


def test_resume_keeps_the_recorded_split(tmp_path: Path) -> None:
    data = _data(tmp_path)
    raw = _raw(tmp_path, data, train={"val_fraction": 0.25, "epochs": 2, "max_steps": 3})
    train.run(from_dict(raw))
    changed = from_dict(raw, ["train.seed=7", "train.max_steps=null"])
    train.run(changed, resume=True)
    state = torch.load(Path(changed.output) / train.CHECKPOINT, weights_only=True)
    assert state["split"]["seed"] == 0  # the run's split, not the new seed's


# -- item 11: SIGTERM / Ctrl-C checkpoint at a step boundary ------------------------------------

def _final_params(cfg: Any) -> Dict[str, torch.Tensor]:
    return torch.load(Path(cfg.output) / train.CHECKPOINT, weights_only=True)["model"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_resume_continues_exactly(tmp_path: Path, sig: int) -> None:
    data = _data(tmp_path)
    whole = from_dict({**_raw(tmp_path, data, train={"epochs": 2}),
                       "output": str(tmp_path / "whole")})
    train.run(whole)

    cut = from_dict(_raw(tmp_path, data, train={"epochs": 2}))
    # what the process had before the run: a job started in the background has SIGINT ignored
    before = signal.getsignal(sig)

    def send(info: Dict[str, Any]) -> bool:
        if info["step"] == 4:  # mid-way through the first epoch (12 steps per epoch)
            os.kill(os.getpid(), sig)
        return False

    with pytest.raises(TrainingInterrupted, match="--resume") as caught:
        train.run(cut, stop=send)
    assert caught.value.exit_code == 128 + sig
    state = torch.load(Path(cut.output) / train.CHECKPOINT, weights_only=True)
    assert state["step"] == 4 and state["epoch_sums"]["samples"] == 200
    assert signal.getsignal(sig) == before  # restored
    records = train.run(cut, resume=True)
    assert [r["epoch"] for r in records] == [1, 2] and records[0]["samples"] == 600
    for name, value in _final_params(whole).items():
        assert torch.equal(value, _final_params(cut)[name]), name


def test_cli_sigterm_in_the_first_epoch_leaves_a_checkpoint(tmp_path: Path) -> None:
    """A model that sends SIGTERM to its own process on its 5th forward pass: deterministic."""
    data = _data(tmp_path)
    (tmp_path / "preempt.py").write_text(textwrap.dedent("""
        import os, signal
        import torch

        class Net(torch.nn.Module):
            calls = 0

            def __init__(self, input_shape, outputs):
                super().__init__()
                self.fc = torch.nn.Linear(input_shape[0], outputs)

            def forward(self, x):
                Net.calls += 1
                if Net.calls == 5 and not os.environ.get("NO_PREEMPT"):
                    os.kill(os.getpid(), signal.SIGTERM)
                return self.fc(x)

        def make(input_shape, outputs):
            return Net(input_shape, outputs)
    """))
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {{path: {data}}}\nloader: {{batch_size: 50, device: cpu}}\n"
                      f"model: {{name: 'preempt:make'}}\ntrain: {{epochs: 1}}\n"
                      f"output: {tmp_path / 'run'}\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "gpuloader", "train", str(config), "--quiet"]
    first = subprocess.run(cmd, cwd=str(tmp_path.parent), env=env, capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr
    assert "SIGTERM" in first.stderr and "--resume" in first.stderr
    second = subprocess.run(cmd + ["--resume"], cwd=str(tmp_path.parent),
                            env=dict(env, NO_PREEMPT="1"), capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0, second.stderr
    (record,) = [r for r in runfiles.read_metrics(tmp_path / "run" / train.METRICS)]
    assert record["samples"] == 600 and record["resumed"] is True


# -- item 12: model/data mismatches are one-line errors before training -------------------------

def test_outputs_fewer_than_classes(tmp_path: Path) -> None:
    cfg = from_dict(_raw(tmp_path, _data(tmp_path, classes=5), model={"outputs": 3}))
    with pytest.raises(ConfigError, match=r"model.outputs: 3 is fewer than the classes in "
                                          r"data.targets 'y' \(labels 0..4, so 5 classes\)"):
        train.run(cfg)
    assert not (Path(cfg.output) / train.CHECKPOINT).exists()


def test_mse_with_integer_labels(tmp_path: Path) -> None:
    cfg = from_dict(_raw(tmp_path, _data(tmp_path), train={"loss": "mse"}))
    with pytest.raises(ConfigError, match=r"train.loss: mse .* data.targets 'y' \(int64"):
        train.run(cfg)


def test_inputs_naming_a_label_field(tmp_path: Path) -> None:
    cfg = from_dict(_raw(tmp_path, _data(tmp_path), data={"inputs": "y", "targets": "x"}))
    with pytest.raises(ConfigError, match=r"data.inputs: field 'y' \(int64, per-sample shape "
                                          r"\(\)\) holds one integer per sample"):
        train.run(cfg)


def test_user_model_with_the_wrong_input_size(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "wrongnet.py").write_text(
        "import torch\n"
        "def make(outputs):\n"
        "    return torch.nn.Linear(10, outputs)\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    raw = _raw(tmp_path, _data(tmp_path))
    raw["model"] = {"name": "wrongnet:make"}
    cfg = from_dict(raw)
    with pytest.raises(ConfigError, match=r"model.name: wrongnet:make cannot take data.inputs "
                                          r"'x' \(float32, per-sample shape \(6,\)\) \(a batch "
                                          r"of shape \(2, 6\)\): RuntimeError: mat1"):
        train.run(cfg)


# -- item 13: a model module beside the config --------------------------------------------------

def test_model_module_beside_the_config_imports_from_any_cwd(tmp_path: Path,
                                                             monkeypatch) -> None:
    folder = tmp_path / "experiment"
    folder.mkdir()
    (folder / "mynets_beside.py").write_text(
        "import torch\n"
        "def make(input_shape, outputs):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(input_shape[0], outputs))\n")
    data = _data(tmp_path)
    (folder / "run.yaml").write_text(f"data: {{path: {data}}}\nloader: {{batch_size: 50, "
                                     f"device: cpu}}\nmodel: {{name: 'mynets_beside:make'}}\n"
                                     f"train: {{epochs: 1}}\noutput: {tmp_path / 'out'}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", list(sys.path))
    cfg = load(folder / "run.yaml")
    assert sys.path.index(str(elsewhere)) < sys.path.index(str(folder))  # cwd first
    (record,) = train.run(cfg)
    assert record["samples"] == 600
