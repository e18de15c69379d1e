#!/usr/bin/env python3
"""Variable-length data: padding efficiency, tokens/s against torch, time to resume.

    python3 benchmarks/ragged.py                       # ~1-2 minutes on 2 cores
    python3 benchmarks/ragged.py --corpus-samples 20000 --repeats 1 --stdlib-limit 500   # quick look

See gpuloader/bench/ragged.py for what is measured.  Writes ``ragged.json`` and prints a
markdown table; ``gpuloader bench --ragged`` runs the same.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from gpuloader.bench.ragged import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
