#!/usr/bin/env bash
# Create or refresh .venv/ with qwen3next and its test + server extras, and prebuild the C++ CPU
# kernels. Idempotent: a second run with unchanged inputs only checks two stamps and returns.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.qwen3next-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
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
fi
# Prebuild the C++ CPU kernels (qwen3next/kernels/cpu_ext, ~25 s once per source version) so the
# first `serve` does not pause for it. A failed build only warns: the torch paths stay in charge.
ext_stamp=.venv/.qwen3next-cpu-ext
ext_want=$(cat qwen3next/kernels/cpu_ext/kernels.cpp qwen3next/kernels/cpu_ext/__init__.py | sha256sum | cut -d' ' -f1)
if [ ! -f "$ext_stamp" ] || [ "$(cat "$ext_stamp")" != "$ext_want" ]; then
    if .venv/bin/python -c "import sys; from qwen3next.kernels import cpu_ext; sys.exit(cpu_ext.get() is None)"; then
        echo "$ext_want" > "$ext_stamp"
    else
        echo "setup.sh: warning: the C++ CPU kernels did not build (see above); the torch paths will be used" >&2
    fi
fi
