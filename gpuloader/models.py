"""Model factories for config-driven training: the built-ins ``mlp``, ``cnn`` and ``bytelm``
(a byte-level causal language model, gpuloader/bytelm.py), and user factories named
``"package.module:factory"``.

NOTE(model-factory): a factory is called with keyword arguments only: the config's ``model``
keys other than ``name``, plus ``input_shape`` (the per-sample shape of the input field, a
tuple) and ``outputs`` (an int, inferred from the targets when the config leaves it out) when
the factory accepts them (by name or through ``**kwargs``) and the config did not set them.
It returns a ``torch.nn.Module`` mapping a float32 batch ``(B, *input_shape)`` to ``(B,
outputs)``.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from gpuloader.bytelm import bytelm

__all__ = ["mlp", "cnn", "bytelm", "BUILTIN", "resolve_factory", "factory_options", "check_option",
           "check_input_shape", "build_model"]

_ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
}


def _activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


def mlp(*, input_shape: Sequence[int], outputs: int, hidden: Sequence[int] = (256, 128),
        activation: str = "relu", dropout: float = 0.0) -> nn.Module:
    """A multilayer perceptron: flatten, then ``Linear -> activation (-> Dropout)`` per entry of
    ``hidden``, then ``Linear`` to ``outputs``.  The input size is ``prod(input_shape)``."""
    size = int(math.prod(input_shape)) if len(input_shape) else 1
    layers: list = [nn.Flatten()]
    for width in hidden:
        layers += [nn.Linear(size, int(width)), _activation(activation)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        size = int(width)
    layers.append(nn.Linear(size, int(outputs)))
    return nn.Sequential(*layers)


class _AddChannel(nn.Module):
    """``(B, H, W)`` -> ``(B, 1, H, W)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


def cnn(*, input_shape: Sequence[int], outputs: int, channels: Sequence[int] = (32, 64),
        hidden: int = 128, activation: str = "relu", dropout: float = 0.0) -> nn.Module:
    """A small convolutional net for images ``(C, H, W)`` (or ``(H, W)``, one channel): per entry
    of ``channels`` a 3x3 convolution, activation and 2x2 max-pool (while the image is at least
    2x2), then global average pooling, ``Linear(hidden)``, activation, ``Linear(outputs)``."""
    shape = tuple(int(s) for s in input_shape)
    layers: list = []
    if len(shape) == 2:
        layers.append(_AddChannel())
        shape = (1,) + shape
    in_channels, height, width = shape
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, int(out_channels), 3, padding=1),
                   _activation(activation)]
        if height >= 2 and width >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        in_channels = int(out_channels)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, int(hidden)),
               _activation(activation)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(int(hidden), int(outputs)))
    return nn.Sequential(*layers)


#: Built-in model factories by name.
BUILTIN: Dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "bytelm": bytelm}

#: bytelm's size options (positive ints).
_BYTELM_SIZES = ("d_model", "layers", "heads", "ff_mult")


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """The factory for a built-in name or ``"package.module:factory"``.

    ValueError for an unknown name (listing the valid ones); ImportError/AttributeError with a
    one-line message when a user factory cannot be imported.
    """
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(BUILTIN)}, or "
                         '"package.module:factory" for your own')
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import {name!r}: {type(exc).__name__}: {exc}") from None
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise AttributeError(f"cannot import {name!r}: module {module_name!r} has no "
                                 f"attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"{name!r} is not callable (it is a {type(factory).__name__})")
    return factory


def factory_options(factory: Callable[..., Any]) -> Optional[Set[str]]:
    """Keyword names ``factory`` accepts; None when it takes ``**kwargs`` (anything goes)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    names = set()
    for p in params:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(p.name)
    return names


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_option(model: str, key: str, value: Any) -> Optional[str]:
    """A one-line problem with option ``key`` of built-in ``model``, or None when it is fine."""
    if model == "bytelm" and key in _BYTELM_SIZES:
        return None if _positive_int(value) else f"expected a positive integer, got {_show(value)}"
    if key == "outputs":
        if value is not None and not _positive_int(value):
            return ("expected a positive integer or null (inferred from the targets), got "
                    f"{_show(value)}")
    elif key == "hidden" and model == "mlp" or key == "channels":
        seq = value if isinstance(value, (list, tuple)) else None
        if seq is None or not all(_positive_int(v) for v in seq) or (key == "channels"
                                                                     and not seq):
            return f"expected a list of positive integers, got {_show(value)}"
    elif key == "hidden":
        if not _positive_int(value):
            return f"expected a positive integer, got {_show(value)}"
    elif key == "activation":
        if value not in _ACTIVATIONS:
            return (f"unknown activation {_show(value)}; valid activations: "
                    f"{', '.join(_ACTIVATIONS)}")
    elif key == "dropout":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0.0 <= value < 1.0:
            return f"expected a number in [0, 1), got {_show(value)}"
    elif key == "input_shape":
        if not isinstance(value, (list, tuple)) or not all(_positive_int(v) for v in value):
            return f"expected a list of positive integers, got {_show(value)}"
    return None


def check_input_shape(model: str, shape: Tuple[int, ...]) -> Optional[str]:
    """A problem when built-in ``model`` cannot take samples of ``shape``; None otherwise."""
    if model == "cnn" and len(shape) not in (2, 3):
        return (f"cnn needs image-shaped inputs (C, H, W) or (H, W); the input field has "
                f"per-sample shape {tuple(shape)}")
    return None


def build_model(name: str, kwargs: Dict[str, Any], *, input_shape: Tuple[int, ...],
                outputs: Optional[int]) -> nn.Module:
    """Call the factory for ``name`` following NOTE(model-factory)."""
    factory = resolve_factory(name)
    accepted = factory_options(factory)
    call = {k: v for k, v in kwargs.items() if v is not None or k not in ("outputs",
                                                                             "input_shape")}
    for key, value in (("input_shape", tuple(input_shape)), ("outputs", outputs)):
        if key not in call and value is not None and (accepted is None or key in accepted):
            call[key] = value
    model = factory(**call)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {name!r} returned {type(model).__name__}, expected a "
                        "torch.nn.Module")
    return model
