#!/bin/bash
# One device call: the GPU tests and benchmarks named in $STEPS, results under $OUT (default ./out).
#   STEPS="tests spec kernels model" OUT=/tmp/o bash benchmarks/gpu_run.sh
# TESTS overrides the test paths of the tests step (full -v log in $OUT/pytest_gpu.txt: per-test results survive a cut)
# steps: tests verify profile spec kernels model modelhf fp8 engine pending (see the case below)
# fla-core (for gpu_kernels / transformers) is installed from .whl/ when it is there.
# STEP_TIMEOUT (seconds, default 600) caps each step, so one slow step leaves time for the rest;
# test steps run with QWEN3NEXT_AUTOTUNE=0 (first config only: correctness, fewer compiles);
# SPEC_ARGS replaces gpu_spec_step.py's default extra arguments (--profile).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
STEPS=${STEPS:-"tests spec"}
T=${STEP_TIMEOUT:-600}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  # the copied tree may not carry .git
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
for s in $STEPS; do
  t0=$(date +%s)
  case $s in
    tests)   QWEN3NEXT_AUTOTUNE=${QWEN3NEXT_AUTOTUNE:-0} timeout $T python3 -m pytest -v -m gpu -n 8 -p no:cacheprovider ${TESTS:-tests/gpu tests/kernels} > "$OUT/pytest_gpu.txt" 2>&1; grep -c PASSED "$OUT/pytest_gpu.txt"; grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest_gpu.txt" | tail -25 ;;
    verify)  QWEN3NEXT_AUTOTUNE=${QWEN3NEXT_AUTOTUNE:-0} timeout $T python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_spec_decode.py -k verify_cuda 2>&1 | tail -5 | tee "$OUT/pytest_verify.txt" ;;
    profile) timeout $T python3 benchmarks/gpu_decode_profile.py --out "$OUT/gpu_decode_profile.json" --batches 1,16,64 --commit "$COMMIT" 2>&1 | grep -v "^unfused" | tail -20 ;;
    spec)    timeout $T python3 benchmarks/gpu_spec_step.py --out "$OUT/gpu_spec_step.json" ${SPEC_ARGS---profile} --commit "$COMMIT" 2>&1 | tail -30 ;;
    kernels) timeout $T python3 benchmarks/gpu_kernels.py --quick --out "$OUT/gpu_kernels.json" 2>&1 | tail -40 ;;
    model)   timeout $T python3 benchmarks/gpu_model.py --no-hf --no-engine --out "$OUT/gpu_model.json" --commit "$COMMIT" 2>&1 | grep -v "^ \|^{\|^}" | tail -20 ;;
    modelhf) timeout $T python3 benchmarks/gpu_model.py --no-engine --out "$OUT/gpu_model.json" --commit "$COMMIT" 2>&1 | grep -v "^ \|^{\|^}" | tail -30 ;;
    fp8)     timeout $T python3 benchmarks/gpu_fp8.py --no-w8a16 --out "$OUT/gpu_fp8.json" --commit "$COMMIT" 2>&1 | tail -25 ;;
    pending) bash benchmarks/gpu_pending_ab.sh ;;   # session 5's unmeasured opt-in paths: tests + A/Bs
    engine)  timeout $T python3 benchmarks/gpu_model.py --only-engine --engine-passes 2 --out "$OUT/gpu_engine.json" --commit "$COMMIT" 2>&1 | grep "engine pass" ;;
    *)       echo "unknown step $s" ;;
  esac
  echo "== step $s: $(( $(date +%s) - t0 )) s"
done
