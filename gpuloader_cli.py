"""The ``gpuloader`` console script's entry point, outside the ``gpuloader`` package.

Importing anything inside the package runs ``gpuloader/__init__.py``, which imports torch (the
public names are imported eagerly, so that frameworks which patch DataLoader subclasses at a
given moment -- PyTorch Lightning does -- see ``gpuloader.DataLoader``).  ``gpuloader --version``
should answer at once, so it is handled here from the installed metadata; everything else goes
to :func:`gpuloader.cli.main`.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpuloader")
    except PackageNotFoundError:
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``gpuloader`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:
        found = _version()
        if found is not None:
            print(f"gpuloader {found}")
            return 0
    from gpuloader.cli import main as full_main

    return full_main(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
