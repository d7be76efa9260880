#!/bin/bash
# One device call: the GPU tests and benchmarks named in $STEPS, results under $OUT (default ./out).
#   STEPS="tests spec kernels model" OUT=/tmp/o bash benchmarks/gpu_run.sh
# fla-core (for gpu_kernels / transformers) is installed from .whl/ when it is there.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
STEPS=${STEPS:-"tests spec"}
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
for s in $STEPS; do
  t0=$(date +%s)
  case $s in
    tests)   python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests/gpu tests/kernels 2>&1 | tail -25 | tee "$OUT/pytest_gpu.txt" ;;
    spec)    python3 benchmarks/gpu_spec_step.py --out "$OUT/gpu_spec_step.json" --profile --commit "$COMMIT" 2>&1 | tail -30 ;;
    kernels) python3 benchmarks/gpu_kernels.py --quick --out "$OUT/gpu_kernels.json" 2>&1 | tail -40 ;;
    model)   python3 benchmarks/gpu_model.py --no-hf --no-engine --out "$OUT/gpu_model.json" --commit "$COMMIT" 2>&1 | grep -v "^ \|^{\|^}" | tail -20 ;;
    modelhf) python3 benchmarks/gpu_model.py --no-engine --out "$OUT/gpu_model.json" --commit "$COMMIT" 2>&1 | grep -v "^ \|^{\|^}" | tail -30 ;;
    engine)  python3 benchmarks/gpu_model.py --only-engine --engine-passes 2 --out "$OUT/gpu_engine.json" --commit "$COMMIT" 2>&1 | grep "engine pass" ;;
    *)       echo "unknown step $s" ;;
  esac
  echo "== step $s: $(( $(date +%s) - t0 )) s"
done
