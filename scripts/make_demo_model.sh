#!/usr/bin/env bash
# Rebuild the shipped demo model, qwen3next/demo_model/, from scratch with one command:
#   scripts/make_demo_model.sh
# Seeded end to end (synthetic data, tokenizer, init, batch order); about 15 min on 2 idle CPU cores.
# The run dir (default runs/demo, git-ignored) keeps training_state.pt: RESUME=1 continues a run
# that was interrupted. THREADS sets torch's CPU threads (use 1 on a machine shared with other jobs:
# oversubscribed OpenMP threads are several times slower than one thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUN=${RUN_DIR:-runs/demo}
DEST=qwen3next/demo_model

"$PY" -m qwen3next.train.cli train --out "$RUN" --preset demo \
    --num-conversations 20000 --data-seed 0 --seed 0 --vocab-size 2000 --max-len 512 \
    --steps "${STEPS:-1000}" --batch-tokens 4096 --lr 3e-3 --warmup-steps 40 --min-lr-ratio 0.1 \
    --weight-decay 0.1 --grad-clip 1.0 --mtp-weight 0.3 \
    --save-every 50 --save-dtype float32 --threads "${THREADS:-2}" ${RESUME:+--resume}

rm -rf "$DEST" && mkdir -p "$DEST"
cp "$RUN"/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,generation_config.json} "$DEST"/
du -sh "$DEST"
"$PY" -m qwen3next.train.cli eval "$DEST" --n "${EVAL_N:-100}" --json "$RUN/eval.json"
