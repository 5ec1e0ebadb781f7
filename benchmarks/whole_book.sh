#!/usr/bin/env bash
# Whole-book streaming perplexity: Temp-Lora vs base (identical inputs) at W=512, Δ=256, per 10K-token bucket.
# Resumable: rerun to continue from the checkpoint. Usage: bash benchmarks/whole_book.sh [--max-tokens N]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${INFINICTX_CACHE:-$HOME/.cache/infinictx}/bench"
.venv/bin/infinictx ppl --method temp-lora -W 512 -D 256 --compare-base --bucket-size 10000 \
  --checkpoint "${INFINICTX_CACHE:-$HOME/.cache/infinictx}/bench/whole_book.ckpt" \
  --json benchmarks/results/whole_book.json --plot benchmarks/results/whole_book.png "$@"
