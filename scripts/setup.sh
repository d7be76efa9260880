#!/usr/bin/env bash
# Create or refresh .venv/ with qwen3next and its test + server extras. Idempotent: a second run
# with an unchanged pyproject.toml only checks a stamp and returns.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.qwen3next-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip install "torch>=2.11"            # PyPI's Linux build carries CUDA
    else
        # The CPU release on this machine's disk (pip's find-links); elsewhere PyPI's own 2.13.0.
        pip install "torch==2.13.0"
    fi
fi
pip install -e ".[test]"
echo "$want" > "$stamp"
