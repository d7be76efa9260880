#!/bin/bash
# The lead's end-of-session call on nvidia-h200-x2 (one cold start, both GPUs busy), results under $OUT:
#   A. the GPU tests: kernels on GPU 0 || engine-level tests (tests/gpu, spec decode) on GPU 1
#   B. the 8-layer slice against transformers + fla (gpu_model.py, GPU 0) || long context through the
#      engine, then the fused gated-norm A/B (GPU 1); one process per GPU, so the timed figures share
#      only the host (32 cores)
#   C. tensor parallelism over both GPUs through NCCL (gpu_tp.py)
#   OUT=$OUT bash benchmarks/gpu_final_x2.sh        (device tool: kind nvidia-h200-x2, carry [".whl"])
# TA / TB / TC cap the phases (seconds); TP_ARGS replaces gpu_tp.py's default arguments.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  # the copied tree may not carry .git
# NVLink multicast off for every process (KINDS.md: it can take the host's GPUs down)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,clocks.sm,temperature.gpu --format=csv,noheader
t0=$(date +%s)
el() { echo "== $1 done at $(( $(date +%s) - t0 )) s"; }

(CUDA_VISIBLE_DEVICES=0 QWEN3NEXT_AUTOTUNE=0 timeout "${TA:-170}" python3 -m pytest -v -m gpu -n 8 -p no:cacheprovider \
  tests/kernels > "$OUT/pytest_kernels.txt" 2>&1) &
(CUDA_VISIBLE_DEVICES=1 QWEN3NEXT_AUTOTUNE=0 timeout "${TA:-170}" python3 -m pytest -v -m gpu -n 4 -p no:cacheprovider \
  tests/gpu tests/test_spec_decode.py > "$OUT/pytest_engine.txt" 2>&1) &
wait; el "A tests"
for f in pytest_kernels pytest_engine; do grep -E "FAILED|ERROR|passed|failed" "$OUT/$f.txt" | tail -12; done

(CUDA_VISIBLE_DEVICES=0 timeout "${TB:-180}" python3 benchmarks/gpu_model.py --no-engine --out "$OUT/gpu_model.json" \
  --commit "$COMMIT" > "$OUT/gpu_model.txt" 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 timeout 80 python3 benchmarks/gpu_long_context.py --out "$OUT/gpu_long_context.json" --commit "$COMMIT" \
   --sections engine,yarn --budget-s 72 > "$OUT/long_context.txt" 2>&1
 timeout 75 python3 benchmarks/gpu_prefill_profile.py --out-dir "$OUT/gn" --quick --no-conv --variants stream,gnorm \
   --reps 20 > "$OUT/gnorm.txt" 2>&1) &
wait; el "B figures"
grep -v "^ \|^{\|^}" "$OUT/gpu_model.txt" | tail -25
grep -v '^  File\|^    ' "$OUT/long_context.txt" | tail -12
tail -4 "$OUT/gnorm.txt"

mkdir -p "$OUT/tp"
# AUTOTUNE=0 so the TP=2 start-up fits (the TP=1 figures above are autotuned)
QWEN3NEXT_AUTOTUNE=0 timeout "${TC:-100}" python3 benchmarks/gpu_tp.py --out "$OUT/tp" --tp 2 --commit "$COMMIT" \
  ${TP_ARGS:---sections correct,sliceN,kill --ttft none --budget-s 95} > "$OUT/gpu_tp.txt" 2>&1
grep -E '^==|correct TP|slice TP|kill:|Error' "$OUT/gpu_tp.txt" | tail -30; el "C tensor parallel"
