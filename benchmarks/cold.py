#!/usr/bin/env python3
"""Cold-storage benchmark: gpuloader, torch and raw reads of files that are not in the page cache.

    python3 benchmarks/cold.py --dir /tmp/cold --out cold_out --delete      # 4 GB, ~10 minutes
    python3 benchmarks/cold.py --dir /tmp/cold --gb 0.5 --repeats 1 --seconds 2   # a quick look

The same as ``gpuloader bench --cold`` (options: ``gpuloader bench --help``): every figure is
measured in a fresh process right after the file was dropped from the page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)``; see gpuloader/bench/cold.py for the cases and
gpuloader/bench/coldcases.py for each measurement.  Writes cold.json and cold.md to ``--out``.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from gpuloader.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--cold", *sys.argv[1:]]))
