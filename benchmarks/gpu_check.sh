#!/usr/bin/env bash
# One-command GPU check (a few minutes on one H100/H200; its timeouts bound it to about 6):
# install gpuloader in place, run the CUDA tests, then the GPU benchmark.  Needs only torch,
# numpy, h5py, psutil, nvidia-ml-py, PyYAML, tqdm and pytest (no hypothesis, matplotlib or
# network).  Everything lands under $OUT
# (default ./gpu_out); gpu_check.json gathers it all in one file:
#   device, install outcome, CUDA test counts, and gpu_bench.py's sections (h2d GB/s vs a plain
#   pinned copy, stall with a compute-bound step, cudaMalloc/cudaHostAlloc per epoch after
#   warm-up, real-OOM recovery exactly once, token budgets), plus the figures of the CUDA test of
#   batch_size="auto" on a heavy-tailed ragged epoch (tests/test_cuda_tokens.py: OOM count, last
#   OOM step, mean padded tokens per step against the bisected largest shape that fits).
# Logs beside it: pip.log, nvidia-smi.txt, junit-cuda.xml, pytest-cuda.log, gpu_bench.log,
# cuda_tokens.json.
# Exit status: 0 when every step passed (or, without CUDA, ran as a smoke test), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
status=0

# Editable install without build isolation (no network).  An old setuptools (no PEP 660, or no
# `wheel` package) fails pip's PEP 517 route: then `setup.py develop`, which needs neither;
# if that fails too, the checkout is used through PYTHONPATH, which is all the tests and
# benchmarks need.
echo "== install (pip install --no-deps --no-build-isolation -e .)"
install="pip"
if ! python3 -m pip install --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1; then
  install="setup.py develop (pip failed; see pip.log)"
  if ! python3 setup.py develop --no-deps >>"$OUT/pip.log" 2>&1; then
    install="PYTHONPATH (pip install failed; see pip.log)"
    echo "pip install failed (tail of $OUT/pip.log below); using the checkout via PYTHONPATH"
    tail -n 3 "$OUT/pip.log"
  fi
fi
echo "installed by: $install"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import gpuloader" 2>>"$OUT/pip.log"; then
  echo "gpuloader does not import (see $OUT/pip.log)"
  status=1
fi

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available"
cuda=$(python3 -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())"
[ "$cuda" = 1 ] || echo "CUDA is not available: CUDA tests skip, the benchmark runs a CPU smoke test"

echo "== pytest -m cuda"
GPULOADER_TOKENS_JSON="$OUT/cuda_tokens.json" timeout 180 python3 -m pytest -m cuda -q \
  -p no:cacheprovider --junitxml="$OUT/junit-cuda.xml" 2>&1 | tee "$OUT/pytest-cuda.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then   # 5: no test carries the cuda mark
  echo "pytest -m cuda failed (rc=$rc)"
  status=1
fi

echo "== benchmarks/gpu_bench.py"
bench_args=(--out "$OUT")
[ "$cuda" = 1 ] || bench_args+=(--gb 0.05 --batch-size 256 --workers 2 --reader-threads 2)
timeout 150 python3 benchmarks/gpu_bench.py "${bench_args[@]}" 2>&1 | tee "$OUT/gpu_bench.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo "gpu_bench failed (rc=$rc)"
  status=1
fi

INSTALL="$install" STATUS="$status" python3 - "$OUT" <<'EOF'
"""Gather the check's results into one JSON file, $OUT/gpu_check.json."""
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
summary = {"install": os.environ["INSTALL"], "status": int(os.environ["STATUS"])}
try:
    suite = ET.parse(out / "junit-cuda.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["cuda_tests"] = {k: int(suite.get(k, 0))
                             for k in ("tests", "failures", "errors", "skipped")}
    summary["cuda_tests"]["failed"] = [
        f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None]
except (OSError, ET.ParseError) as exc:
    summary["cuda_tests"] = {"error": str(exc)}
try:  # written by tests/test_cuda_tokens.py's CUDA run
    summary["token_budgets_cuda_test"] = json.loads((out / "cuda_tokens.json").read_text())
except (OSError, ValueError) as exc:
    summary["token_budgets_cuda_test"] = {"missing": f"the CUDA test wrote none ({exc})"}
try:
    summary.update(json.loads((out / "gpu_bench.json").read_text()))
except (OSError, ValueError) as exc:
    summary["gpu_bench"] = {"error": str(exc)}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
print(f"wrote {out / 'gpu_check.json'}")
EOF

echo "== done: status $status, results in $OUT (gpu_check.json)"
exit "$status"
