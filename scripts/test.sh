#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: fast tests on a tiny random Llama, plus a few integration
# tests with the embedded model. Extra arguments go to pytest (e.g. -m "not integration"). INFINICTX_TEST_DEVICE=cuda
# runs the tests' models on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
