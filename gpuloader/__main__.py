"""``python -m gpuloader``: the command line (see gpuloader.cli)."""
import sys

from gpuloader.cli import main

sys.exit(main())
