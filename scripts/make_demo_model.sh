#!/usr/bin/env bash
# Rebuild the shipped demo model, qwen3next/demo_model/, from scratch with one command:
#   scripts/make_demo_model.sh
# Seeded end to end (synthetic data, tokenizer, init, batch order). Two phases: 1000 steps on the
# default task mix from scratch, then 600 steps on fresh conversations (another seed) with more
# tool-use data at a lower learning rate. Run dirs (default runs/, git-ignored) keep
# training_state.pt: RESUME=1 continues an interrupted build. THREADS sets torch's CPU threads
# (use 1 on a machine shared with other jobs: oversubscribed OpenMP threads are several times
# slower than one thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUN=${RUN_DIR:-runs/demo}
DEST=qwen3next/demo_model
COMMON=(--max-len 512 --batch-tokens 4096 --weight-decay 0.1 --grad-clip 1.0 --mtp-weight 0.3
        --min-lr-ratio 0.1 --save-every 50 --save-dtype float32 --threads "${THREADS:-2}" ${RESUME:+--resume})

# from scratch unless RESUME is set (train refuses to overwrite a run dir without --resume)
[ -n "${RESUME:-}" ] || rm -rf "$RUN" "$RUN-ft"

"$PY" -m qwen3next.train.cli train --out "$RUN" --preset demo --vocab-size 2000 \
    --num-conversations 20000 --data-seed 0 --seed 0 --steps 1000 --lr 3e-3 --warmup-steps 40 "${COMMON[@]}"

"$PY" -m qwen3next.train.cli train --init "$RUN" --out "$RUN-ft" --mix arith=0.4,tool=0.4,plain=0.2 \
    --num-conversations 12000 --data-seed 1 --seed 1 --steps 600 --lr 1.5e-3 --warmup-steps 20 "${COMMON[@]}"

rm -rf "$DEST" && mkdir -p "$DEST"
cp "$RUN-ft"/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,generation_config.json} "$DEST"/
du -sh "$DEST"
"$PY" -m qwen3next.train.cli eval "$DEST" --n "${EVAL_N:-100}" --json "$RUN-ft/eval.json"
