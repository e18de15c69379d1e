"""``python -m gpuloader.bench ...``: the same as ``gpuloader bench ...``."""
import sys

from gpuloader.bench.cli import main

sys.exit(main())
