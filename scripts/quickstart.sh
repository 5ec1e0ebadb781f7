#!/usr/bin/env bash
# Set everything up, then run the main job on the embedded default: Temp-Lora vs the plain window on the first
# 4096 tokens of the default book (W=512, Δ=256). Writes out/quickstart.{json,md,png}. ~3 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/infinictx ppl --method temp-lora --compare-base --max-tokens 4096 --bucket-size 1024 \
  --json out/quickstart.json --plot out/quickstart.png "$@"
