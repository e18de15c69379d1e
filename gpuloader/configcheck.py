"""The checker behind config validation: typed field checks that collect every problem (with
its key path) instead of stopping at the first, so one error lists them all."""
from __future__ import annotations

import difflib
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from gpuloader.configfile import _show, expand_path
from gpuloader.sources.binidx import is_binidx


class _Checker:
    def __init__(self, base_dir: Optional[str] = None) -> None:
        self.problems: List[str] = []
        self.base_dir = base_dir  # the config file's folder, for hints about relative paths

    def add(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def section(self, key: str, raw: Any, valid: Sequence[str]) -> Dict[str, Any]:
        """``raw`` as a dict with only valid keys; records a problem per unknown key."""
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            self.add(key, f"expected a mapping of keys ({', '.join(valid)}), got {_show(raw)}")
            return {}
        clean: Dict[str, Any] = {}
        for name, value in raw.items():
            if name in valid:
                clean[name] = value
            else:
                self.unknown(f"{key}.{name}" if key else str(name), str(name), valid)
        return clean

    def unknown(self, where: str, name: str, valid: Sequence[str]) -> None:
        close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(valid)}"
        self.add(where, f"unknown key; {hint}")

    # scalar checks --------------------------------------------------------------------------
    def integer(self, key: str, value: Any, *, low: int, what: str,
                optional: bool = False) -> Optional[int]:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            suffix = " or null" if optional else ""
            self.add(key, f"expected {what}{suffix}, got {_show(value)}")
            return None
        return int(value)

    def positive_int(self, key: str, value: Any, optional: bool = False) -> Optional[int]:
        return self.integer(key, value, low=1, what="a positive integer", optional=optional)

    def count(self, key: str, value: Any) -> Optional[int]:
        return self.integer(key, value, low=0, what="an integer >= 0")

    def number(self, key: str, value: Any, *, ok: Callable[[float], bool], what: str,
               optional: bool = False) -> Optional[float]:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or not ok(float(value)):
            suffix = " or null" if optional else ""
            self.add(key, f"expected {what}{suffix}, got {_show(value)}")
            return None
        return float(value)

    def boolean(self, key: str, value: Any) -> Optional[bool]:
        if not isinstance(value, bool):
            self.add(key, f"expected true or false, got {_show(value)}")
            return None
        return value

    def string(self, key: str, value: Any, optional: bool = False) -> Optional[str]:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            self.add(key, f"expected a non-empty string{' or null' if optional else ''}, "
                          f"got {_show(value)}")
            return None
        return value

    def choice(self, key: str, value: Any, choices: Sequence[str], noun: str,
               optional: bool = False) -> Optional[str]:
        if value is None and optional:
            return None
        if not isinstance(value, str) or value not in choices:
            valid = ", ".join(choices) + (" (or null)" if optional else "")
            plural = noun + ("es" if noun.endswith("s") else "s")
            self.add(key, f"unknown {noun} {_show(value)}; valid {plural}: {valid}")
            return None
        return value

    def names(self, key: str, value: Any, optional: bool = True) -> Optional[Tuple[str, ...]]:
        if value is None and optional:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value or \
                not all(isinstance(v, str) and v for v in value):
            self.add(key, f"expected a list of field names, got {_show(value)}")
            return None
        if len(set(value)) != len(value):
            self.add(key, f"lists a field twice: {_show(list(value))}")
            return None
        return tuple(value)

    def path(self, key: str, value: Any, *, must_exist: bool) -> Optional[str]:
        text = self.string(key, value)
        if text is None:
            return None
        try:
            expanded = expand_path(text)
        except ValueError as exc:
            self.add(key, str(exc))
            return None
        absolute = os.path.abspath(expanded)
        if must_exist and not os.path.exists(absolute) and not is_binidx(absolute):  # a .bin/.idx prefix
            hint = ""
            if self.base_dir and not os.path.isabs(expanded):
                beside = os.path.abspath(os.path.join(self.base_dir, expanded))
                if os.path.exists(beside):
                    hint = (f" (relative paths are taken from the current directory; did you "
                            f"mean {beside}?)")
            self.add(key, f"no such file or directory: {absolute}{hint}")
            return None
        return absolute
