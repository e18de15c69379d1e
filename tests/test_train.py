"""gpuloader.train: learning, metrics, checkpoints, exact mid-epoch resume, losses, models."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
import torch

from gpuloader import train
from gpuloader.config import Config, ConfigError, from_dict
from gpuloader.models import build_model, cnn, mlp

N = 2000


pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _classification(root: Path, n: int = N, features: int = 8, classes: int = 3,
                    label_dtype: Any = np.int64) -> Path:
    """A learnable task: labels are argmax of a fixed random linear map of the features."""
    folder = root / "data"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, features)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((features, classes)), axis=1).astype(label_dtype)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    return folder


def _config(tmp_path: Path, *overrides: str, data: Optional[Path] = None) -> Config:
    raw = {
        "data": {"path": str(data or _classification(tmp_path))},
        "loader": {"batch_size": 100, "device": "cpu"},
        "model": {"name": "mlp", "hidden": [16]},
        "train": {"epochs": 3, "lr": 0.01},
        "output": str(tmp_path / "run"),
    }
    return from_dict(raw, overrides)


def _metrics(cfg: Config) -> List[Dict[str, Any]]:
    lines = (Path(cfg.output) / train.METRICS).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_loss_falls_and_metrics_are_written(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    records = train.run(cfg)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]
    for record in records:
        for key in ("epoch", "loss", "samples_per_s", "batch_size", "stall_fraction",
                    "gb_per_s", "samples", "batch_sizes", "oom_count"):
            assert key in record
        assert record["samples"] == N and record["batch_size"] == 100
        assert record["batch_sizes"] == [100] and 0.0 <= record["stall_fraction"] <= 1.0
        assert "val_loss" not in record
    assert _metrics(cfg) == records
    out = Path(cfg.output)
    assert (out / train.CHECKPOINT).exists()
    saved = (out / "config.yaml").read_text()
    assert "outputs: 3" in saved  # inferred from the labels and recorded
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def _params(path: Path) -> Dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("gbs", [None, 300])
def test_resume_mid_epoch_continues_exactly(tmp_path: Path, gbs: Optional[int]) -> None:
    extra = [] if gbs is None else [f"train.global_batch_size={gbs}",
                                    "loader.batch_size=auto", "loader.max_batch_size=128"]
    steps_per_epoch = N // 100 if gbs is None else -(-N // gbs)
    # the reference: one uninterrupted run
    ref = _config(tmp_path, *extra, "output=" + str(tmp_path / "ref"))
    ref_records = train.run(ref)

    cfg = _config(tmp_path, *extra)
    stop_at = steps_per_epoch + 3  # in the middle of epoch 2
    first = train.run(cfg, stop=lambda info: info["step"] >= stop_at)
    assert [r["epoch"] for r in first] == [1]
    assert [r["epoch"] for r in _metrics(cfg)] == [1]
    state = torch.load(Path(cfg.output) / train.CHECKPOINT, weights_only=True)
    assert state["step"] == stop_at and state["epochs_done"] == 1
    assert 0 < state["loader"]["cursor"]["position"] < N

    rest = train.run(cfg, resume=True)
    assert [r["epoch"] for r in rest] == [2, 3]
    records = _metrics(cfg)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["samples"] for r in records] == [N, N, N]
    assert [r["step"] for r in records] == [steps_per_epoch * k for k in (1, 2, 3)]
    assert [r["resumed"] for r in records] == [False, True, False]
    for got, want in zip(records, ref_records):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    final, expected = _params(Path(cfg.output) / train.CHECKPOINT), _params(
        Path(ref.output) / train.CHECKPOINT)
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=1e-5, atol=1e-6)


def test_max_steps_stops_and_resume_finishes(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "train.max_steps=5", "train.epochs=1")
    partial = train.run(cfg)  # NOTE(partial-record): the epoch so far, marked partial
    assert [(r["epoch"], r["samples"], r["step"], r["partial"]) for r in partial] == [
        (1, 500, 5, True)]
    assert _metrics(cfg) == partial
    again = train.run(cfg, resume=True)  # max_steps already reached: nothing happens
    assert again == []
    done = train.run(_config(tmp_path, "train.epochs=1"), resume=True)
    assert [(r["epoch"], r["samples"], r["step"]) for r in done] == [(1, N, N // 100)]
    assert "partial" not in done[0] and _metrics(cfg) == partial + done


def test_checkpoint_every_and_missing_metrics_line(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "train.checkpoint_every=4", "train.epochs=2")
    seen: List[int] = []

    def stop(info: Dict[str, Any]) -> bool:
        seen.append(info["step"])
        return info["step"] == 27

    train.run(cfg, stop=stop)
    metrics = Path(cfg.output) / train.METRICS
    metrics.unlink()  # as if the process died between checkpoint and metrics line
    records = train.run(cfg, resume=True)
    assert [r["epoch"] for r in records] == [2]
    assert [r["epoch"] for r in _metrics(cfg)] == [1, 2]
    assert seen[:3] == [1, 2, 3]


def test_validation_split_is_not_trained_on(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "train.val_fraction=0.25", "train.epochs=2")
    records = train.run(cfg)
    assert [r["samples"] for r in records] == [1500, 1500]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and r["val_loss"] > 0 for r in records)
    assert records[-1]["val_accuracy"] > 0.6


def test_global_batch_size_steps(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "train.global_batch_size=512", "loader.batch_size=auto",
                  "loader.max_batch_size=128", "train.epochs=1")
    (record,) = train.run(cfg)
    assert record["samples"] == N and record["step"] == -(-N // 512)
    assert max(record["batch_sizes"]) <= 128


def test_existing_run_needs_resume_or_overwrite(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "train.epochs=1")
    with pytest.raises(ConfigError, match=r"^--resume: no checkpoint to resume in "):
        train.run(cfg, resume=True)
    train.run(cfg)
    with pytest.raises(ConfigError, match=r"^output: .* already holds a run \(checkpoint\.pt\); "
                                          r"use --resume"):
        train.run(cfg)
    assert len(train.run(cfg, overwrite=True)) == 1
    assert len(_metrics(cfg)) == 1


@pytest.mark.parametrize("label_dtype", [np.int32, np.uint8, np.float32])
def test_cross_entropy_casts_labels(tmp_path: Path, label_dtype: Any) -> None:
    data = _classification(tmp_path, n=300, label_dtype=label_dtype)
    (record,) = train.run(_config(tmp_path, "train.epochs=1", data=data))
    assert record["samples"] == 300


@pytest.mark.parametrize("loss, target", [("mse", "regression"), ("bce_with_logits", "binary")])
def test_other_losses(tmp_path: Path, loss: str, target: str) -> None:
    folder = tmp_path / "reg"
    folder.mkdir()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 4)).astype(np.float32)
    value = x @ np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32)
    y = value if target == "regression" else (value > 0).astype(np.int64)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    records = train.run(_config(tmp_path, f"train.loss={loss}", "train.epochs=4",
                                "train.optimizer=adam", data=folder))
    assert records[-1]["loss"] < records[0]["loss"]
    assert "val_accuracy" not in records[-1]


def test_sgd_and_cnn_on_images(tmp_path: Path) -> None:
    folder = tmp_path / "img"
    folder.mkdir()
    rng = np.random.default_rng(2)
    np.save(folder / "x.npy", rng.random((64, 1, 8, 8), dtype=np.float32))
    np.save(folder / "y.npy", rng.integers(0, 2, 64))
    cfg = _config(tmp_path, "model={name: cnn, channels: [4], hidden: 8}", "train.epochs=1",
                  "train.optimizer=sgd", "loader.batch_size=16", data=folder)
    (record,) = train.run(cfg)
    assert record["samples"] == 64


def test_user_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gl_train_models.py").write_text(textwrap.dedent("""\
        import torch
        def linear(*, input_shape, outputs, bias=True):
            return torch.nn.Linear(input_shape[0], outputs, bias=bias)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _config(tmp_path, "model={name: 'gl_train_models:linear', bias: false}",
                  "train.epochs=1")
    (record,) = train.run(cfg)
    state = torch.load(Path(cfg.output) / train.CHECKPOINT, weights_only=True)["model"]
    assert list(state) == ["weight"] and state["weight"].shape == (3, 8)


def test_run_accepts_a_config_path(tmp_path: Path) -> None:
    data = _classification(tmp_path, n=200)
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {{path: {data}}}\ntrain: {{epochs: 1}}\n"
                    f"loader: {{device: cpu, batch_size: 50}}\noutput: {tmp_path / 'o'}\n")
    assert train.run(path)[0]["samples"] == 200


def test_prepare_targets_shapes() -> None:
    out = torch.zeros(4, 3)
    assert train.prepare_targets("cross_entropy", torch.tensor([[1], [2], [0], [1]]),
                                 out).shape == (4,)
    assert train.prepare_targets("cross_entropy", torch.tensor([1.0, 2, 0, 1]),
                                 out).dtype == torch.int64
    one = torch.zeros(4, 1)
    y = train.prepare_targets("mse", torch.tensor([1, 2, 3, 4]), one)
    assert y.shape == (4, 1) and y.dtype == torch.float32


def test_builtin_models_shapes() -> None:
    assert mlp(input_shape=(2, 3), outputs=5)(torch.zeros(7, 2, 3)).shape == (7, 5)
    assert cnn(input_shape=(3, 9, 9), outputs=4)(torch.zeros(2, 3, 9, 9)).shape == (2, 4)
    assert cnn(input_shape=(5, 5), outputs=2, channels=(3, 3, 3))(
        torch.zeros(2, 5, 5)).shape == (2, 2)
    model = build_model("mlp", {"hidden": [4], "outputs": None}, input_shape=(6,), outputs=2)
    assert model(torch.zeros(1, 6)).shape == (1, 2)
