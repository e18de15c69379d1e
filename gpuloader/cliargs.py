"""argparse ``type=`` converters shared by the subcommands: each rejects bad text with a
message naming the value and what is accepted (argparse prints it and exits 2)."""
from __future__ import annotations

import argparse
from typing import Tuple


def int_at_least(low: int, text: str) -> int:
    """``text`` as an int >= ``low``."""
    accepted = "a positive integer" if low == 1 else f"an integer >= {low}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {accepted}, got {value}")
    return value


def positive_int(text: str) -> int:
    """``text`` as an int >= 1."""
    return int_at_least(1, text)


def non_negative_int(text: str) -> int:
    """``text`` as an int >= 0."""
    return int_at_least(0, text)


def positive_ints(text: str) -> Tuple[int, ...]:
    """Comma-separated positive ints, e.g. ``"256,128"``."""
    try:
        return tuple(positive_int(part) for part in text.split(",") if part.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got "
                                         f"{text!r}") from None
