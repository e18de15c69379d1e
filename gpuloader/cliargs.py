"""What the subcommands share: argparse ``type=`` converters, each rejecting bad text with a
message naming the value and what is accepted (argparse prints it and exits 2), and the plain
text table they print."""
from __future__ import annotations

import argparse
from typing import Sequence, Tuple


def table(rows: Sequence[Sequence[str]], *, rule: bool = False) -> str:
    """``rows`` as left-aligned columns two spaces apart; ``rule`` underlines the first row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
