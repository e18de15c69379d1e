"""The CUDA run collects on a machine without the test extras (benchmarks/gpu_check.sh)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# hypothesis blocked, as on the bare GPU machine: `import hypothesis` raises ImportError.
_COLLECT = """
import sys
sys.modules["hypothesis"] = None
import pytest
sys.exit(pytest.main(["-m", "cuda", "--collect-only", "-q", "-p", "no:cacheprovider",
                      sys.argv[1]]))
"""


def test_cuda_tests_collect_without_hypothesis():
    # No plugins either (hypothesis registers one; pytest-timeout is not there).
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    done = subprocess.run([sys.executable, "-c", _COLLECT, str(TESTS)], cwd=TESTS.parent,
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "test_cuda.py::test_real_out_of_memory_is_survived_with_nothing_lost" in done.stdout
