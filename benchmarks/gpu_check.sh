#!/usr/bin/env bash
# One-command GPU check (< 8 minutes on one H100): install gpuloader in place, run the CUDA
# tests, then the GPU benchmark.  Everything lands under $OUT (default ./gpu_out):
#   pip.log, nvidia-smi.txt, junit-cuda.xml, pytest-cuda.log, gpu_bench.log, *.json, h2d/, stall/
# Exit status: 0 when every step passed, 1 otherwise (each step still runs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
status=0

echo "== install (pip install --no-deps --no-build-isolation -e .)"
if ! python3 -m pip install --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1; then
  echo "pip install failed (tail of $OUT/pip.log below); using the checkout via PYTHONPATH"
  tail -n 5 "$OUT/pip.log"
  status=1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available"
python3 - >"$OUT/env.txt" 2>&1 <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory)
EOF
cat "$OUT/env.txt"

echo "== pytest -m cuda"
timeout 180 python3 -m pytest -m cuda -q -p no:cacheprovider \
  --junitxml="$OUT/junit-cuda.xml" 2>&1 | tee "$OUT/pytest-cuda.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then   # 5: no test carries the cuda mark
  echo "pytest -m cuda failed (rc=$rc)"
  status=1
fi

echo "== benchmarks/gpu_bench.py"
timeout 270 python3 benchmarks/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo "gpu_bench failed (rc=$rc)"
  status=1
fi

echo "== done: status $status, results in $OUT"
exit "$status"
