#!/bin/bash
# The opt-in GPU paths left unmeasured at the end of session 5, in one device call (~6-8 min warm):
# their GPU tests, then each A/B in one process against the default. Results under $OUT.
# The timeouts add up past one call's 600 s: PARTS picks sections (default all), e.g. PARTS="1 2 3"
# in one call and PARTS="4 5 6" in the next.
#   STEPS=pending OUT=$OUT bash benchmarks/gpu_run.sh     (device tool: carry [".whl"], fla for step 5)
# Flip rules (docs/benchmarks.md, each section named below): a path goes default-on only when its
# test passed here and it is faster in the same process (wall and graph replay where given).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}
PARTS=${PARTS:-"1 2 3 4 5 6"}
want() { [[ " $PARTS " == *" $1 "* ]]; }
T() { echo "== $*"; }
# 1. tests: the MoE fold's bit-equality (fixed after session 5's final run, not re-run), the mixed-tile
#    MoE, the pipelined decode, the streaming conv, the delta rule's 64-wide state tiles, the engine
#    paths the final run did not reach
if want 1; then
T tests
QWEN3NEXT_AUTOTUNE=0 timeout 240 python3 -m pytest -v -m gpu -n 8 -p no:cacheprovider \
  tests/kernels/test_moe_grouped.py tests/kernels/test_moe_tma_fp8.py tests/kernels/test_moe_shared.py \
  tests/kernels/test_gdn_decode_pipelined.py tests/kernels/test_conv1d.py tests/kernels/test_delta_rule.py \
  tests/gpu tests/test_spec_decode.py > "$OUT/pytest_pending.txt" 2>&1
grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest_pending.txt" | tail -20
fi
# 2. MoE mixed tiles (section "Session 5: prefill experts (MOE)", "Not yet measured")
if want 2; then
T moe_mixed
timeout 200 python3 benchmarks/bench_moe_prefill_gpu.py --out "$OUT/moe_mixed.json" --tokens 8192,2048 \
  --paths persistent,persistent_mixed --model --model-variants default,persistent_mixed,persistent_mixed_up --pin 2>&1 | tail -12
fi
# 3. pipelined decode kernel (section "Session 5: pipelined decode kernel (DECODE)")
if want 3; then
T decode_pipe
timeout 150 python3 benchmarks/bench_state_dtype_gpu.py --out "$OUT/decode_pipe.json" --sizes 64,256 --weights fp8 \
  --sweep --decode-variants tiles,pipelined --no-accuracy 2>&1 | tail -12
fi
# 4. streaming conv (section "Session 5: streaming varlen conv (CONV ...)")
if want 4; then
T conv_stream
timeout 120 python3 benchmarks/gpu_prefill_profile.py --out-dir "$OUT/conv" --quick --variants new,stream,split --reps 20 2>&1 | tail -8
fi
# 5. delta rule 64-wide state tiles (section "Session 5: chunked delta rule (GDN-CHUNK)"; needs fla from .whl/)
if want 5; then
T gdn_bv64
timeout 90 python3 benchmarks/gpu_kernels.py --only chunked --cases T32768,T8192 \
  --variants "[{}, {'bv_state': 64}]" --out "$OUT/gdn_bv64.json" 2>&1 | tail -8
fi
# 6. the fp8 prefill figure that disagreed between scripts (FP8 section): both scripts, same call
if want 6; then
T fp8_prefill
timeout 120 python3 benchmarks/gpu_fp8.py --prefill-only --out "$OUT/gpu_fp8_prefill.json" 2>&1 | tail -4
fi
