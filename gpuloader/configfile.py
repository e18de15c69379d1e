"""Reading configuration files: YAML (or JSON) text, ``--set KEY.PATH=VALUE`` overrides and
``${VAR}`` expansion in paths.  Pure tree operations; what the values mean is config.py's."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import yaml

from gpuloader.errors import ConfigError


def _show(value: Any) -> str:
    """A value as the user wrote it: YAML spelling for null/booleans, repr otherwise."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` and ``5E4`` as floats (YAML 1.2 does; PyYAML's YAML
    1.1 rules would make them strings, and ``lr: 1e-3`` is how people write it)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _problem(lines: Sequence[str]) -> ConfigError:
    error = ConfigError("\n".join(lines))
    error.problems = list(lines)  # type: ignore[attr-defined]
    return error


def _read_file(path: Path) -> Any:
    if not path.exists():
        raise _problem([f"{path}: no such config file"])
    if path.is_dir():
        raise _problem([f"{path}: is a directory, expected a YAML or JSON config file"])
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise _problem([f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"]) from None
    try:
        return _yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise _problem([f"{path}{where}: invalid YAML: {what}"]) from None


_KEY_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_override(text: str) -> Tuple[Tuple[str, ...], Any]:
    """``"loader.batch_size=64"`` -> ``(("loader", "batch_size"), 64)``; the value is read as YAML
    (so ``64`` is an int, ``auto`` a string, ``null`` None, ``[64, 32]`` a list)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _KEY_PATH.match(key):
        raise _problem([f"--set {text}: expected key.path=value, e.g. loader.batch_size=64"])
    try:
        value = _yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise _problem([f"--set {text}: invalid value: {what}"]) from None
    return tuple(key.split(".")), value


def apply_overrides(raw: Any, overrides: Iterable[str]) -> Dict[str, Any]:
    """A copy of the parsed config ``raw`` with every ``key.path=value`` override applied."""
    tree: Dict[str, Any] = _copy_tree(raw) if isinstance(raw, Mapping) else {}
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for depth, key in enumerate(path[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise _problem([f"--set {text}: {where} is not a mapping (it is "
                                f"{_show(child)}), so it has no key {path[depth + 1]!r}"])
            node = child
        node[path[-1]] = value
    return tree


def _copy_tree(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_tree(v) for v in value]
    return value


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def expand_path(text: str, *, environ: Optional[Mapping[str, str]] = None) -> str:
    """Expand ``$NAME``, ``${NAME}``, ``${NAME:-default}`` and a leading ``~`` (see
    NOTE(config-paths)); ValueError naming the variable when one is unset without a default."""
    env = os.environ if environ is None else environ

    def substitute(match: "re.Match[str]") -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        value = env.get(name)
        if default is not None and not value:
            return default
        if value is None:
            raise ValueError(f"environment variable {name} is not set (write ${{{name}:-default}}"
                             " to give a default)")
        return value

    expanded = _VAR.sub(substitute, text)
    return os.path.expanduser(expanded)
