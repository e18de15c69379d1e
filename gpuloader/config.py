"""Training configurations: load a YAML/JSON file, apply ``--set`` overrides, validate, freeze.

The schema (every section but ``data`` is optional; missing keys take the defaults shown)::

    data:   {path: train.h5, fields: null, inputs: null, targets: null, dtype: null, shape: null}
    loader: {batch_size: auto, shuffle: true, order: null, memory_fraction: 0.8,
             memory_budget: null, device: auto, num_workers: 0, sample_bytes: 0,
             min_batch_size: 1, max_batch_size: null, prefetch_depth: 2, drop_last: false,
             token_bytes: 0, max_tokens: null, pad_to_multiple_of: 1}   # last three: ragged
    model:  {name: mlp, ...}           # other keys go to the model factory (see models.py)
    train:  {epochs: 3, lr: 0.001, optimizer: adamw, loss: cross_entropy,
             global_batch_size: null, global_tokens: null, seed: 0, val_fraction: 0.0,
             weight_decay: null, checkpoint_every: 0, max_steps: null}
    output: runs/<config file stem>

NOTE(config-global-batch): memory decides micro-batches, never what the model learns.  With
``loader.batch_size: auto`` and no ``train.global_batch_size``, the global batch is
DEFAULT_GLOBAL_BATCH (256) samples per optimizer step, accumulated over micro-batches as large
as memory allows; the resolved config records it.  (Left to itself, auto fills the memory, which
on a CPU can be the whole training split: one optimizer step per epoch.)  On a ragged
``data.inputs`` field (next-token training, seqtrain.py) steps count tokens instead:
``train.global_tokens`` (default DEFAULT_GLOBAL_TOKENS under auto) real tokens per step, and the
planned ``max_tokens`` is at most that (a larger micro-batch could only make a larger step).

NOTE(config-model-path): a config naming its own model (``model.name: mynets:make``) finds
``mynets.py`` beside the config file from any working directory: ``load`` puts the current
directory and then the config's folder on ``sys.path`` (after the script's folder), so a module
in the current directory still comes first.

NOTE(config-paths): ``data.path`` and ``output`` may use ``~`` and environment variables:
``$NAME``, ``${NAME}`` and ``${NAME:-default}`` (the default is used when NAME is unset or empty,
and may itself start with ``~``).  An unset variable without a default is an error.  After
expansion, relative paths are taken relative to the current working directory (like paths on
the command line), and the loaded Config holds absolute paths.

NOTE(config-errors): every problem becomes ONE line ``<key.path>: <what is wrong>`` — the key
that is wrong, the value received, and what would be accepted (for unknown keys, the closest
valid key).  ``load`` collects all the problems it can find and raises one ConfigError whose
message is those lines joined by newlines (also available as ``error.problems``).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import yaml

from gpuloader.checks import ORDERS
from gpuloader.configcheck import _Checker
from gpuloader.configfile import (_problem, _read_file, _show, apply_overrides, expand_path,
                                  parse_override)
from gpuloader.errors import ConfigError
from gpuloader.seqconfig import DEFAULT_GLOBAL_BATCH, DEFAULT_GLOBAL_TOKENS, check_sequence, \
    resolve_steps

__all__ = [
    "Config",
    "DataConfig",
    "LoaderConfig",
    "ModelConfig",
    "TrainConfig",
    "ConfigError",
    "load",
    "from_dict",
    "parse_override",
    "apply_overrides",
    "expand_path",
    "dump",
    "OPTIMIZERS",
    "LOSSES",
    "DEFAULT_GLOBAL_BATCH",
    "DEFAULT_GLOBAL_TOKENS",
]

#: Optimizer names accepted by ``train.optimizer``.
OPTIMIZERS = ("adamw", "adam", "sgd")
#: Loss names accepted by ``train.loss``.
LOSSES = ("cross_entropy", "mse", "bce_with_logits")
_SECTIONS = ("data", "loader", "model", "train", "output")


# --------------------------------------------------------------------------------------------
# the frozen tree


@dataclass(frozen=True)
class DataConfig:
    """Where the samples are.  ``inputs``/``targets`` are field names (filled in by ``load``
    from the data when not given: the first and second field; a ragged ``inputs`` field keeps
    ``targets`` None: the model predicts the next token).  ``dtype``/``shape`` describe a
    raw binary file (see ``gpuloader.open_dataset``)."""

    path: str
    fields: Optional[Tuple[str, ...]] = None
    inputs: Optional[str] = None
    targets: Optional[str] = None
    dtype: Optional[str] = None
    shape: Optional[Tuple[int, ...]] = None


@dataclass(frozen=True)
class LoaderConfig:
    """Keyword arguments of ``gpuloader.DataLoader`` (same names, same meaning).  ``batch_size``
    None is refused by ``load`` with what ragged or fixed-size data accepts."""

    batch_size: Union[int, str] = "auto"
    shuffle: bool = True
    order: Optional[str] = None
    memory_fraction: float = 0.8
    memory_budget: Optional[int] = None
    device: str = "auto"
    num_workers: int = 0
    sample_bytes: int = 0
    min_batch_size: int = 1
    max_batch_size: Optional[int] = None
    prefetch_depth: int = 2
    drop_last: bool = False
    token_bytes: int = 0
    max_tokens: Optional[int] = None
    pad_to_multiple_of: int = 1


@dataclass(frozen=True)
class ModelConfig:
    """A model factory (``name``: "mlp", "cnn" or "package.module:factory") and its keyword
    arguments, kept as sorted ``(key, value)`` pairs so the tree stays immutable."""

    name: str = "mlp"
    options: Tuple[Tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> Dict[str, Any]:
        """The factory's keyword arguments as a fresh dict (lists for sequences)."""
        return {key: _thaw(value) for key, value in self.options}


@dataclass(frozen=True)
class TrainConfig:
    """The training loop.  ``checkpoint_every``: also checkpoint every N optimizer steps (0: only
    at epoch ends).  ``max_steps``: stop after N optimizer steps in total (the checkpoint lets
    ``resume`` continue).  ``weight_decay``: None keeps the optimizer's default.
    ``global_tokens``: real tokens per optimizer step on ragged inputs (``accumulate``)."""

    epochs: int = 3
    lr: float = 1e-3
    optimizer: str = "adamw"
    loss: str = "cross_entropy"
    global_batch_size: Optional[int] = None
    global_tokens: Optional[int] = None
    seed: int = 0
    val_fraction: float = 0.0
    weight_decay: Optional[float] = None
    checkpoint_every: int = 0
    max_steps: Optional[int] = None


@dataclass(frozen=True)
class Config:
    """A validated training configuration (frozen; use ``dataclasses.replace`` to vary it)."""

    data: DataConfig
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: str = "runs/default"

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (dicts, lists, scalars) that ``from_dict`` accepts back."""
        out: Dict[str, Any] = {}
        for section in ("data", "loader", "train"):
            value = getattr(self, section)
            out[section] = {f.name: _thaw(getattr(value, f.name))
                            for f in dataclasses.fields(value)}
        out["model"] = {"name": self.model.name, **self.model.kwargs}
        out["output"] = self.output
        # keep the documented section order
        return {name: out[name] for name in _SECTIONS}


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# validation helpers (each returns the cleaned value, or records a problem and returns None)


# --------------------------------------------------------------------------------------------
# sections


def _data(c: _Checker, raw: Any) -> Optional[DataConfig]:
    valid = [f.name for f in dataclasses.fields(DataConfig)]
    if raw is None:
        c.add("data", "required section is missing (give at least data.path)")
        return None
    d = c.section("data", raw, valid)
    if isinstance(raw, Mapping) and "path" not in raw:
        c.add("data.path", "required key is missing")
    path = c.path("data.path", d["path"], must_exist=True) if "path" in d else None
    fields = c.names("data.fields", d.get("fields"))
    inputs = c.string("data.inputs", d.get("inputs"), optional=True)
    targets = c.string("data.targets", d.get("targets"), optional=True)
    dtype = c.string("data.dtype", d.get("dtype"), optional=True)
    shape = None
    if d.get("shape") is not None:
        value = d["shape"]
        if not isinstance(value, (list, tuple)) or not value or not all(
                isinstance(v, int) and not isinstance(v, bool) and (v > 0 or v == -1)
                for v in value):
            c.add("data.shape", f"expected a list of positive integers (one may be -1), "
                                f"got {_show(value)}")
        else:
            shape = tuple(value)
    if path is None:
        return None
    return DataConfig(path=path, fields=fields, inputs=inputs, targets=targets, dtype=dtype,
                      shape=shape)


def _loader(c: _Checker, raw: Any) -> LoaderConfig:
    defaults = LoaderConfig()
    valid = [f.name for f in dataclasses.fields(LoaderConfig)]
    d = c.section("loader", raw, valid)
    values: Dict[str, Any] = {}
    if "batch_size" in d:
        value = d["batch_size"]
        if value is not None and value != "auto" and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            c.add("loader.batch_size", f'expected a positive integer or "auto", got {_show(value)}')
        else:
            values["batch_size"] = value
    for key in ("shuffle", "drop_last"):
        if key in d:
            values[key] = c.boolean(f"loader.{key}", d[key])
    if "order" in d:
        values["order"] = c.choice("loader.order", d["order"], ORDERS, "order", optional=True)
    if "memory_fraction" in d:
        values["memory_fraction"] = c.number("loader.memory_fraction", d["memory_fraction"],
                                             ok=lambda v: 0.0 < v <= 1.0,
                                             what="a number in (0, 1]")
    if "memory_budget" in d:
        values["memory_budget"] = c.integer("loader.memory_budget", d["memory_budget"], low=1,
                                            what="a positive integer of bytes", optional=True)
    if "device" in d:
        values["device"] = _device(c, d["device"])
    for key in ("num_workers", "sample_bytes", "prefetch_depth", "token_bytes"):
        if key in d:
            values[key] = c.count(f"loader.{key}", d[key])
    if "min_batch_size" in d:
        values["min_batch_size"] = c.positive_int("loader.min_batch_size", d["min_batch_size"])
    if "max_batch_size" in d:
        values["max_batch_size"] = c.positive_int("loader.max_batch_size", d["max_batch_size"],
                                                  optional=True)
    if "max_tokens" in d:
        values["max_tokens"] = c.positive_int("loader.max_tokens", d["max_tokens"], optional=True)
    if "pad_to_multiple_of" in d:
        values["pad_to_multiple_of"] = c.positive_int("loader.pad_to_multiple_of",
                                                      d["pad_to_multiple_of"])
    low = values.get("min_batch_size", defaults.min_batch_size)
    high = values.get("max_batch_size", defaults.max_batch_size)
    if low is not None and high is not None and high < low:
        c.add("loader.max_batch_size",
              f"expected a value >= loader.min_batch_size ({low}), got {high}")
    if values.get("order") == "sequential" and values.get("shuffle", defaults.shuffle):
        c.add("loader.order", "sequential contradicts loader.shuffle: true; set shuffle: false "
                              "or use order: shuffle or block")
    nullable = ("order", "max_batch_size", "memory_budget", "max_tokens", "batch_size")
    clean = {k: v for k, v in values.items() if v is not None or (k in nullable and d[k] is None)}
    return dataclasses.replace(defaults, **clean)


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _device(c: _Checker, value: Any) -> Optional[str]:
    if not isinstance(value, str) or not _DEVICE.match(value):
        c.add("loader.device", f'expected "auto", "cpu", "cuda" or "cuda:N", got {_show(value)}')
        return None
    from gpuloader.devices import resolve_device
    from gpuloader.errors import GpuLoaderError

    try:
        resolve_device(value)
    except GpuLoaderError as exc:
        c.add("loader.device", str(exc))
        return None
    return value


def _model(c: _Checker, raw: Any) -> Optional[ModelConfig]:
    from gpuloader import models

    if raw is None:
        raw = {}
    if isinstance(raw, str):  # shorthand: ``model: mlp``
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        c.add("model", f"expected a mapping with a name and the factory's options, "
                       f"got {_show(raw)}")
        return None
    name = raw.get("name", "mlp")
    options = {k: v for k, v in raw.items() if k != "name"}
    if not isinstance(name, str) or not name:
        c.add("model.name", f"expected a model name ({', '.join(models.BUILTIN)}) or "
                            f'"package.module:factory", got {_show(name)}')
        return None
    try:
        factory = models.resolve_factory(name)
    except (ValueError, ImportError, AttributeError) as exc:
        c.add("model.name", str(exc))
        return None
    accepted = models.factory_options(factory)
    for key, value in options.items():
        if accepted is not None and key not in accepted:
            c.unknown(f"model.{key}", str(key), sorted(accepted))
            continue
        if name in models.BUILTIN:
            message = models.check_option(name, key, value)
            if message is not None:
                c.add(f"model.{key}", message)
    return ModelConfig(name=name, options=_freeze(options))


def _train(c: _Checker, raw: Any) -> TrainConfig:
    defaults = TrainConfig()
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    d = c.section("train", raw, valid)
    values: Dict[str, Any] = {}
    if "epochs" in d:
        values["epochs"] = c.positive_int("train.epochs", d["epochs"])
    if "lr" in d:
        values["lr"] = c.number("train.lr", d["lr"], ok=lambda v: v > 0,
                                what="a positive number")
    if "optimizer" in d:
        values["optimizer"] = c.choice("train.optimizer", d["optimizer"], OPTIMIZERS,
                                       "optimizer")
    if "loss" in d:
        values["loss"] = c.choice("train.loss", d["loss"], LOSSES, "loss")
    if "global_batch_size" in d:
        values["global_batch_size"] = c.positive_int("train.global_batch_size",
                                                     d["global_batch_size"], optional=True)
    if "global_tokens" in d:
        values["global_tokens"] = c.positive_int("train.global_tokens", d["global_tokens"],
                                                 optional=True)
    if "seed" in d:
        values["seed"] = c.count("train.seed", d["seed"])
    if "val_fraction" in d:
        values["val_fraction"] = c.number("train.val_fraction", d["val_fraction"],
                                          ok=lambda v: 0.0 <= v < 1.0, what="a number in [0, 1)")
    if "weight_decay" in d:
        values["weight_decay"] = c.number("train.weight_decay", d["weight_decay"],
                                          ok=lambda v: v >= 0, what="a number >= 0",
                                          optional=True)
    if "checkpoint_every" in d:
        values["checkpoint_every"] = c.count("train.checkpoint_every", d["checkpoint_every"])
    if "max_steps" in d:
        values["max_steps"] = c.positive_int("train.max_steps", d["max_steps"], optional=True)
    nullable = ("global_batch_size", "global_tokens", "weight_decay", "max_steps")
    clean = {k: v for k, v in values.items() if v is not None or (k in nullable and d[k] is None)}
    return dataclasses.replace(defaults, **clean)


# --------------------------------------------------------------------------------------------
# checks against the data itself


def _check_data(c: _Checker, cfg: Config) -> Tuple[Config, Optional[str]]:
    """Open the data (headers only) to check field names and model/loss fit; fill in
    ``data.inputs``/``data.targets`` when they were not given.  Also returns the ragged
    ``data.inputs`` field's name (next-token training), None for fixed-size inputs."""
    from gpuloader import models
    from gpuloader.dataset import open_dataset
    from gpuloader.errors import GpuLoaderError

    data = cfg.data
    try:
        kwargs: Dict[str, Any] = {}
        if data.dtype is not None:
            kwargs["dtype"] = data.dtype
        if data.shape is not None:
            kwargs["shape"] = data.shape
        ds = open_dataset(data.path, **kwargs)
    except (GpuLoaderError, OSError, ValueError, TypeError) as exc:
        c.add("data.path", f"cannot open {data.path}: {_one_line(exc)}")
        return cfg, None
    try:
        available = list(ds.fields)
        specs = dict(ds.fields)
    finally:
        close = getattr(ds, "close", None)
        if close is not None:
            close()
    name = os.path.basename(data.path.rstrip(os.sep)) or data.path

    def known(key: str, field_name: str, pool: Sequence[str]) -> bool:
        if field_name in pool:
            return True
        close = difflib.get_close_matches(field_name, list(pool), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        c.add(key, f"unknown field {field_name!r}; {hint}fields in {name}: {', '.join(pool)}")
        return False

    usable = available
    if data.fields is not None:
        ok = [f for f in data.fields if known("data.fields", f, available)]
        if len(ok) != len(data.fields):
            return cfg, None
        usable = list(data.fields)
    inputs, targets = data.inputs, data.targets
    if inputs is None:
        inputs = usable[0]
    elif not known("data.inputs", inputs, usable):
        return cfg, None
    if specs[inputs].ragged:  # next-token training (seqconfig.py)
        if targets is not None and known("data.targets", targets, usable):
            c.add("data.targets", f"{targets!r} given, but data.inputs {inputs!r} is a ragged "
                                  f"token field: the model predicts its next token, which needs "
                                  f"no targets; leave data.targets out")
        check_sequence(c, cfg, inputs, specs[inputs])
        return dataclasses.replace(cfg, data=dataclasses.replace(data, inputs=inputs)), inputs
    if targets is None:
        rest = [f for f in usable if f != inputs]
        if not rest:
            c.add("data.targets", f"required: {name} has no field besides the inputs "
                                  f"({inputs}) to train against")
            return cfg, None
        targets = rest[0]
    elif not known("data.targets", targets, usable):
        return cfg, None
    if targets == inputs:
        c.add("data.targets", f"is the same field as data.inputs ({inputs!r})")
        return cfg, None
    message = models.check_input_shape(cfg.model.name, specs[inputs].shape)
    if message is not None:
        c.add("model.name", f"{message} (field {inputs!r})")
    return dataclasses.replace(cfg, data=dataclasses.replace(data, inputs=inputs,
                                                             targets=targets)), None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# entry points


def _importable_from(folder: str) -> None:
    """Put the current directory, then ``folder``, on ``sys.path`` (NOTE(config-model-path))."""
    entries = [os.path.abspath(p or os.curdir) for p in sys.path]
    at = 1 if sys.path else 0
    for path in (os.getcwd(), os.path.abspath(folder)):
        if path in entries:
            at = max(at, entries.index(path) + 1)
            continue
        sys.path.insert(at, path)
        entries.insert(at, path)
        at += 1


def from_dict(raw: Any, overrides: Iterable[str] = (), *, default_output: str = "runs/default",
              check_data: bool = True, base_dir: Optional[str] = None,
              source: str = "config") -> Config:
    """Validate a parsed config (dict tree) with ``overrides`` applied; see ``load``.
    ``base_dir`` (the config file's folder) only improves the message for a missing path;
    ``source`` names the config in a message about its top level."""
    tree = apply_overrides(raw, overrides)
    if base_dir is not None:
        _importable_from(base_dir)
    c = _Checker(base_dir)
    if raw is not None and not isinstance(raw, Mapping):
        raise _problem([f"{source}: expected a mapping with sections {', '.join(_SECTIONS)}, "
                        f"got {_show(raw)}"])
    top = c.section("", tree, _SECTIONS)
    data = _data(c, top.get("data"))
    loader = _loader(c, top.get("loader"))
    model = _model(c, top.get("model"))
    train = _train(c, top.get("train"))
    output = c.path("output", top.get("output", default_output), must_exist=False)
    if output is not None and os.path.isfile(output):
        c.add("output", f"is a file, expected a directory: {output}")
    if c.problems or data is None or model is None or output is None:
        raise _problem(c.problems or ["config: invalid"])
    cfg = Config(data=data, loader=loader, model=model, train=train, output=output)
    ragged = None
    if check_data:
        cfg, ragged = _check_data(c, cfg)
        if c.problems:  # the step checks below assume the fields resolved: one error per cause
            raise _problem(c.problems)
    cfg = resolve_steps(c, cfg, ragged, known=check_data)
    if c.problems:
        raise _problem(c.problems)
    return cfg


def load(path: Union[str, os.PathLike], overrides: Iterable[str] = (), *,
         check_data: bool = True) -> Config:
    """Read a YAML (or ``.json``) config, apply ``key.path=value`` overrides, validate.

    Returns a frozen Config; raises ConfigError (a ValueError) whose message has one line per
    problem (NOTE(config-errors)).  ``output`` defaults to ``runs/<config file stem>``.
    ``check_data=False`` skips opening the data to check its fields.
    """
    file = Path(path)
    raw = _read_file(file)
    return from_dict(raw, overrides, default_output=os.path.join("runs", file.stem),
                     check_data=check_data, base_dir=str(file.parent), source=str(file))


def dump(cfg: Config, path: Union[str, os.PathLike]) -> None:
    """Write ``cfg`` as YAML (the resolved copy a run keeps next to its checkpoint)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
    Path(path).write_text(text, encoding="utf-8")
