"""Exceptions raised by gpuloader.

Every error subclasses both :class:`GpuLoaderError` and the built-in that fits, so callers may
catch either (``except ValueError`` keeps working).  Messages name the argument or path, the
value received and what would be accepted.
"""
from __future__ import annotations


class GpuLoaderError(Exception):
    """Base class of every error gpuloader raises on purpose."""


class ConfigError(GpuLoaderError, ValueError):
    """A configuration file or option is invalid."""


class ArgumentError(GpuLoaderError, ValueError):
    """An argument has a value outside what is accepted."""


class ArgumentTypeError(GpuLoaderError, TypeError):
    """An argument has the wrong type."""


class SourceError(GpuLoaderError, ValueError):
    """A storage file or array cannot serve as a source (corrupt, mismatched, unsupported)."""


class SourceNotFoundError(GpuLoaderError, FileNotFoundError):
    """A path given as data does not exist."""


class FieldNotFoundError(GpuLoaderError, KeyError):
    """A requested field does not exist; the message lists the fields that do."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class SampleIndexError(GpuLoaderError, IndexError):
    """A sample index is outside ``[-len, len)``."""


class DeviceError(GpuLoaderError, ValueError):
    """A device string names a device that is not present or not understood."""


class MemoryProbeError(GpuLoaderError, RuntimeError):
    """Free memory could not be measured; the message says why and how to give a budget instead."""


def describe(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` (Python 3.11+); on older Pythons the note is appended to the
    message's first argument instead, so it still shows in the traceback."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    elif exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]}\n{note}",) + exc.args[1:]
    else:
        exc.args = exc.args + (note,)
