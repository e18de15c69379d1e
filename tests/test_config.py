"""gpuloader.config: loading, overrides, path expansion, and one exact line per problem."""
from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpuloader import config
from gpuloader.config import Config, ConfigError, expand_path, from_dict, load, parse_override
from gpuloader.errors import GpuLoaderError


def _data(tmp_path: Path, n: int = 64, features: int = 8) -> Path:
    folder = tmp_path / "npy"
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.save(folder / "x.npy", rng.standard_normal((n, features)).astype(np.float32))
    np.save(folder / "y.npy", rng.integers(0, 3, n).astype(np.int64))
    return folder


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    data = _data(tmp_path)
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(f"""\
        data: {{path: {data}, fields: [x, y], inputs: x, targets: y}}
        loader: {{batch_size: auto, device: cpu}}
        model: {{name: mlp, hidden: [16], outputs: 3}}
        train: {{epochs: 2, lr: 0.01}}
        output: {tmp_path / 'run'}
        """))
    return path


def test_load_returns_a_frozen_tree(cfg_file: Path, tmp_path: Path) -> None:
    cfg = load(cfg_file)
    assert isinstance(cfg, Config)
    assert cfg.data.path == str(tmp_path / "npy")
    assert cfg.data.fields == ("x", "y")
    assert cfg.loader.batch_size == "auto" and cfg.loader.shuffle is True
    assert cfg.loader.memory_fraction == 0.8 and cfg.loader.max_batch_size is None
    assert cfg.model.name == "mlp" and cfg.model.kwargs == {"hidden": [16], "outputs": 3}
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.01 and cfg.train.optimizer == "adamw"
    assert cfg.train.global_batch_size == 256 and cfg.train.val_fraction == 0.0  # auto: fixed
    assert cfg.output == str(tmp_path / "run")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 5  # type: ignore[misc]
    assert isinstance(ConfigError("x"), (ValueError, GpuLoaderError))


def test_defaults_fill_inputs_targets_and_output(tmp_path: Path, monkeypatch) -> None:
    data = _data(tmp_path)
    path = tmp_path / "mini.yml"
    path.write_text(f"data: {{path: {data}}}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load(path)
    assert (cfg.data.inputs, cfg.data.targets) == ("x", "y")
    assert cfg.output == str(tmp_path / "runs" / "mini")
    assert cfg.model.name == "mlp"
    # NOTE(config-global-batch): auto sizes micro-batches; the optimization batch stays fixed
    assert cfg.train == config.TrainConfig(global_batch_size=config.DEFAULT_GLOBAL_BATCH)
    fixed = load(path, ["loader.batch_size=64"])
    assert fixed.train.global_batch_size is None


def test_json_is_accepted(tmp_path: Path) -> None:
    data = _data(tmp_path)
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"data": {"path": str(data)}, "train": {"epochs": 4}}))
    assert load(path).train.epochs == 4


def test_to_dict_round_trips(cfg_file: Path) -> None:
    cfg = load(cfg_file, ["loader.max_batch_size=32", "train.global_batch_size=64"])
    assert from_dict(cfg.to_dict()) == cfg
    assert list(cfg.to_dict()) == ["data", "loader", "model", "train", "output"]


@pytest.mark.parametrize("text, key, value", [
    ("loader.batch_size=64", ("loader", "batch_size"), 64),
    ("loader.batch_size=auto", ("loader", "batch_size"), "auto"),
    ("loader.order=null", ("loader", "order"), None),
    ("model.hidden=[64, 32]", ("model", "hidden"), [64, 32]),
    ("train.lr=1e-3", ("train", "lr"), 1e-3),
    ("loader.shuffle=false", ("loader", "shuffle"), False),
    ("output=runs/a=b", ("output",), "runs/a=b"),
])
def test_overrides_are_yaml_typed(text: str, key: tuple, value: object) -> None:
    assert parse_override(text) == (key, value)


def test_overrides_apply(cfg_file: Path) -> None:
    cfg = load(cfg_file, ["loader.batch_size=64", "model.hidden=[4, 4]", "train.seed=3",
                          "loader.order=block"])
    assert cfg.loader.batch_size == 64 and cfg.loader.order == "block"
    assert cfg.model.kwargs["hidden"] == [4, 4] and cfg.train.seed == 3


def test_expand_path() -> None:
    env = {"HOME": "/home/u", "DATA": "/d", "EMPTY": ""}
    assert expand_path("$DATA/x.h5", environ=env) == "/d/x.h5"
    assert expand_path("${DATA}/x.h5", environ=env) == "/d/x.h5"
    assert expand_path("${NOPE:-/fallback}/x", environ=env) == "/fallback/x"
    assert expand_path("${EMPTY:-/fallback}/x", environ=env) == "/fallback/x"
    assert expand_path("${DATA:-/fallback}/x", environ=env) == "/d/x"
    assert expand_path("${NOPE:-~/.cache}/g", environ=env) == os.path.expanduser("~/.cache/g")
    with pytest.raises(ValueError, match=r"environment variable NOPE is not set"):
        expand_path("$NOPE/x", environ=env)


def test_paths_expand_environment_variables(tmp_path: Path, monkeypatch) -> None:
    _data(tmp_path)
    monkeypatch.setenv("GL_TEST_ROOT", str(tmp_path))
    monkeypatch.delenv("GL_TEST_UNSET", raising=False)
    cfg = from_dict({"data": {"path": "${GL_TEST_ROOT}/npy"},
                     "output": "${GL_TEST_UNSET:-" + str(tmp_path) + "}/out"})
    assert cfg.data.path == str(tmp_path / "npy")
    assert cfg.output == str(tmp_path / "out")


#: (overrides, the exact problem line)
ERRORS = [
    (["loader.batchsize=64"], "loader.batchsize: unknown key; did you mean batch_size?"),
    (["loader.zzz=1"], "loader.zzz: unknown key; valid keys: batch_size, shuffle, order, "
                       "memory_fraction, memory_budget, device, num_workers, sample_bytes, "
                       "min_batch_size, max_batch_size, prefetch_depth, drop_last, token_bytes, "
                       "max_tokens, pad_to_multiple_of"),
    (["train.epoch=3"], "train.epoch: unknown key; did you mean epochs?"),
    (["datta.path=x"], "datta: unknown key; did you mean data?"),
    (["train.epochs=-1"], "train.epochs: expected a positive integer, got -1"),
    (["train.epochs=2.5"], "train.epochs: expected a positive integer, got 2.5"),
    (["train.epochs=true"], "train.epochs: expected a positive integer, got true"),
    (["train.lr=0"], "train.lr: expected a positive number, got 0"),
    (["train.val_fraction=1"], "train.val_fraction: expected a number in [0, 1), got 1"),
    (["train.global_batch_size=0"],
     "train.global_batch_size: expected a positive integer or null, got 0"),
    (["train.seed=-2"], "train.seed: expected an integer >= 0, got -2"),
    (["train.optimizer=adamx"],
     "train.optimizer: unknown optimizer 'adamx'; valid optimizers: adamw, adam, sgd"),
    (["train.loss=hinge"],
     "train.loss: unknown loss 'hinge'; valid losses: cross_entropy, mse, bce_with_logits"),
    (["loader.batch_size=big"],
     "loader.batch_size: expected a positive integer or \"auto\", got 'big'"),
    (["loader.batch_size=0"], "loader.batch_size: expected a positive integer or \"auto\", got 0"),
    (["loader.memory_fraction=1.5"],
     "loader.memory_fraction: expected a number in (0, 1], got 1.5"),
    (["loader.shuffle=maybe"], "loader.shuffle: expected true or false, got 'maybe'"),
    (["loader.order=random"],
     "loader.order: unknown order 'random'; valid orders: sequential, shuffle, block (or null)"),
    (["loader.num_workers=-1"], "loader.num_workers: expected an integer >= 0, got -1"),
    (["loader.device=tpu"],
     "loader.device: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got 'tpu'"),
    (["loader.max_batch_size=0"],
     "loader.max_batch_size: expected a positive integer or null, got 0"),
    (["loader.min_batch_size=8", "loader.max_batch_size=4"],
     "loader.max_batch_size: expected a value >= loader.min_batch_size (8), got 4"),
    (["loader.order=sequential"],
     "loader.order: sequential contradicts loader.shuffle: true; set shuffle: false or use "
     "order: shuffle or block"),
    (["loader=5"], "loader: expected a mapping of keys (batch_size, shuffle, order, "
                   "memory_fraction, memory_budget, device, num_workers, sample_bytes, "
                   "min_batch_size, max_batch_size, prefetch_depth, drop_last, token_bytes, "
                   "max_tokens, pad_to_multiple_of), got 5"),
    (["model.name=resnet"], "model.name: unknown model 'resnet'; valid models: mlp, cnn, bytelm, or "
                            "\"package.module:factory\" for your own"),
    (["model.name=gl_no_such_pkg_xyz:make"],
     "model.name: cannot import 'gl_no_such_pkg_xyz:make': ModuleNotFoundError: No module "
     "named 'gl_no_such_pkg_xyz'"),
    (["model.name=json:no_such_factory"],
     "model.name: cannot import 'json:no_such_factory': module 'json' has no attribute "
     "'no_such_factory'"),
    (["model.hiden=[3]"], "model.hiden: unknown key; did you mean hidden?"),
    (["model.hidden=[0]"], "model.hidden: expected a list of positive integers, got [0]"),
    (["model.outputs=-3"],
     "model.outputs: expected a positive integer or null (inferred from the targets), got -3"),
    (["model.activation=sigmoid"],
     "model.activation: unknown activation 'sigmoid'; valid activations: relu, gelu, silu, tanh"),
    (["model.name=cnn"], "model.name: cnn needs image-shaped inputs (C, H, W) or (H, W); the "
                         "input field has per-sample shape (8,) (field 'x')"),
    (["data.path=/gl_nonexistent/x.h5"],
     "data.path: no such file or directory: /gl_nonexistent/x.h5"),
    (["data.path=$GL_TEST_SURELY_UNSET/x.h5"],
     "data.path: environment variable GL_TEST_SURELY_UNSET is not set (write "
     "${GL_TEST_SURELY_UNSET:-default} to give a default)"),
    (["data.fields=[x, z]"], "data.fields: unknown field 'z'; fields in npy: x, y"),
    (["data.fields=[x, x]"], "data.fields: lists a field twice: ['x', 'x']"),
    (["data.inputs=xx"], "data.inputs: unknown field 'xx'; did you mean x? fields in npy: x, y"),
    (["data.targets=x"], "data.targets: is the same field as data.inputs ('x')"),
    (["data.targets=w"], "data.targets: unknown field 'w'; fields in npy: x, y"),
    (["loader.batch_size"], "--set loader.batch_size: expected key.path=value, e.g. "
                            "loader.batch_size=64"),
]


@pytest.mark.parametrize("overrides, line", ERRORS, ids=[e[1].split(":")[0] + "-" + str(i)
                                                         for i, e in enumerate(ERRORS)])
def test_each_problem_is_one_exact_line(cfg_file: Path, overrides: list, line: str,
                                        monkeypatch) -> None:
    monkeypatch.delenv("GL_TEST_SURELY_UNSET", raising=False)
    raw = {"data": {"path": str(cfg_file.parent / "npy")},
           "loader": {"device": "cpu"}, "model": {"name": "mlp"},
           "output": str(cfg_file.parent / "run")}
    with pytest.raises(ConfigError) as info:
        from_dict(raw, overrides)
    assert str(info.value) == line
    assert info.value.problems == [line]  # type: ignore[attr-defined]


def test_all_problems_are_reported_at_once(cfg_file: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(cfg_file, ["loader.batchsize=3", "train.epochs=0", "train.optimizer=x"])
    assert str(info.value).splitlines() == [
        "loader.batchsize: unknown key; did you mean batch_size?",
        "train.epochs: expected a positive integer, got 0",
        "train.optimizer: unknown optimizer 'x'; valid optimizers: adamw, adam, sgd",
    ]


def test_missing_data_section_and_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data: required section is missing"):
        from_dict({"train": {"epochs": 1}})
    with pytest.raises(ConfigError, match=r"^data\.path: required key is missing$"):
        from_dict({"data": {"fields": ["x"]}})


def test_relative_path_hint(tmp_path: Path, monkeypatch) -> None:
    _data(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text("data: {path: npy}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == (
        f"data.path: no such file or directory: {elsewhere / 'npy'} (relative paths are taken "
        f"from the current directory; did you mean {tmp_path / 'npy'}?)")
    monkeypatch.chdir(tmp_path)
    assert load(path).data.path == str(tmp_path / "npy")


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such config file$"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {path: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: invalid YAML: "):
        load(bad)
    badjson = tmp_path / "bad.json"
    badjson.write_text('{"data": }')
    with pytest.raises(ConfigError, match=r"bad\.json:1:10: invalid JSON: Expecting value$"):
        load(badjson)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping with sections data, "
                                          r"loader, model, train, output, got \[1, 2\]$"):
        load(listy)


def test_set_into_a_scalar_is_refused(cfg_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--set output\.dir=x: output is not a mapping"):
        load(cfg_file, ["output.dir=x"])


def test_user_factory_options_are_checked(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "gl_user_models.py").write_text(textwrap.dedent("""\
        import torch
        def tiny(*, input_shape, outputs, width=4):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0], outputs))
        def loose(**kwargs):
            return torch.nn.Identity()
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = {"data": {"path": str(_data(tmp_path))}, "output": str(tmp_path / "run")}
    cfg = from_dict(raw, ["model.name=gl_user_models:tiny", "model.width=8"])
    assert cfg.model.kwargs == {"width": 8}
    with pytest.raises(ConfigError, match=r"^model\.widht: unknown key; did you mean width\?$"):
        from_dict(raw, ["model.name=gl_user_models:tiny", "model.widht=8"])
    assert from_dict(raw, ["model.name=gl_user_models:loose", "model.anything=1"]).model.kwargs \
        == {"anything": 1}


def test_dump_writes_a_loadable_copy(cfg_file: Path, tmp_path: Path) -> None:
    cfg = load(cfg_file, ["loader.batch_size=32"])
    out = tmp_path / "copy.yaml"
    config.dump(cfg, out)
    assert load(out) == cfg
