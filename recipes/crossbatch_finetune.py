"""CrossBatch (Focused Transformer) fine-tuning of the embedded SmolLM2-135M-Instruct on the project's public-domain
corpus (37 Shakespeare plays, Milton's shorter poems, two Canterbury texts; Paradise Lost held out), on a CPU.

Saves a LongLLaMA-format checkpoint to the cache, usable as `--model smollm2-fot`, and the training log with a
before/after memory probe to benchmarks/results/crossbatch_auto.{json,md}. The defaults are the run behind
`smollm2-fot`: 12 retrieval layers as memory layers, ~100 steps in 30 minutes, needle weight 1, in-batch negatives
only. (`crossbatch_train.*` is the first run: LongLLaMA's 3 spread layers, 4096 extra negatives, no gain.)

  .venv/bin/python recipes/crossbatch_finetune.py [--time-budget 1800] [--steps 110] [--mem-layers auto] [--lr 3e-4]"""

import argparse
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infinictx import load_model  # noqa: E402
from infinictx.attention import Rope  # noqa: E402
from infinictx.crossbatch import CrossBatchConfig, make_batch, memory_probe, train_crossbatch  # noqa: E402
from infinictx.methods.memory import parse_mem_layers, resolve_mem_layers  # noqa: E402
from infinictx.models import fot_model_dir  # noqa: E402
from infinictx.report import atomic_write, write_json  # noqa: E402
from infinictx.texts import training_corpus  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=110, help="optimizer steps (the LR schedule's length)")
p.add_argument("--time-budget", type=float, default=1800, help="seconds of training before it stops and saves")
p.add_argument("--context", type=int, default=256)
p.add_argument("--lr", type=float, default=3e-4)
p.add_argument("--rank", type=int, default=32)
p.add_argument("--needle-rate", type=float, default=0.75)
p.add_argument("--needle-weight", type=float, default=1.0, help="extra loss weight on the repeated codes")
p.add_argument("--extra-negatives", type=int, default=0, help="detached K/V tokens of earlier batches as negatives")
p.add_argument("--mem-layers", default="auto", help="e.g. 8,15,22, 'auto[:N]' (retrieval layers, default) or 'spread'")
p.add_argument("--window", type=int, default=1024, help="local window W saved as last_context_length")
p.add_argument("--out", default=None, help=f"checkpoint folder (default {fot_model_dir()})")
p.add_argument("--mst", action="store_true", help="Mini-Sequence training: the same gradients in less memory "
               "(long --context)")
p.add_argument("--mst-save-attention", action="store_true", help="--mst, keeping attention outputs: faster, "
               "one more hidden-size tensor per layer")
p.add_argument("--threads", type=int, default=None)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--name", default="crossbatch_auto", help="results file name under benchmarks/results/")
args = p.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

t0 = time.time()
lm = load_model(None)
docs = [lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0] for _, text in training_corpus()]
print(f"corpus: {len(docs)} documents, {sum(len(d) for d in docs):,} tokens")
cfg = CrossBatchConfig(context=args.context, steps=args.steps, time_budget_s=args.time_budget, lr=args.lr,
                       rank=args.rank, alpha=args.rank, needle_rate=args.needle_rate, seed=args.seed,
                       extra_negatives=args.extra_negatives, needle_weight=args.needle_weight,
                       mem_layers=parse_mem_layers(args.mem_layers),
                       last_context_length=args.window, mst=args.mst, mst_save_attention=args.mst_save_attention)

mem_layers = set(resolve_mem_layers(cfg.mem_layers, lm))
print("memory layers:", sorted(mem_layers))
probe_cfg = CrossBatchConfig(**{**asdict(cfg), "needle_rate": 1.0, "mix": ((1, 0), (1, 3), (2, 1), (3, 0))})
probe_rng = random.Random(12345)
probe = [make_batch(docs, probe_cfg, probe_rng, lm.tokenizer, progress=1.0) for _ in range(6)]
rope = Rope(lm.model, lm.device, lm.dtype)
before = memory_probe(lm.model, probe, mem_layers, rope)
print("memory probe before:", before)
out = Path(args.out) if args.out else fot_model_dir()
log = train_crossbatch(lm, docs, cfg, out=out)
after = memory_probe(lm.model, probe, mem_layers, rope)
print("memory probe after:", after)
result = {"benchmark": args.name, "checkpoint": str(out), "model": "SmolLM2-135M-Instruct",
          "corpus_documents": len(docs), "corpus_tokens": int(sum(len(d) for d in docs)),
          "probe_before": before, "probe_after": after, "wall_s": round(time.time() - t0, 1), **log}
results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
write_json(result, results / f"{args.name}.json")
hist = log["history"]
first, last = hist[:20], hist[-20:]
mean = lambda rows: sum(r["loss"] for r in rows) / max(1, len(rows))  # noqa: E731
md = [f"## CrossBatch fine-tuning of SmolLM2-135M-Instruct ({log['steps_done']} steps, {log['train_s']:.0f} s)", "",
      f"Memory layers {sorted(mem_layers)}, context {cfg.context} tokens per row, LoRA r={cfg.rank} merged, "
      f"lr {cfg.lr}, mix {list(cfg.mix)}, negatives ×{list(cfg.negative_growth)}, needle rate {cfg.needle_rate}, "
      f"{cfg.extra_negatives} detached extra negatives per memory layer.",
      f"Training loss: first 20 steps {mean(first):.3f} → last 20 steps {mean(last):.3f}.", "",
      "Memory probe (repeated secret codes whose first mention is only reachable through memory):", "",
      "| | code NLL/token with memory | without memory | codes exact with memory | without |", "|---|---|---|---|---|"]
for name, pr in (("before", before), ("after", after)):
    md.append(f"| {name} | {pr['with_memory']['code_nll_per_token']:.3f} | {pr['without_memory']['code_nll_per_token']:.3f} "
              f"| {100 * pr['with_memory']['codes_exact']:.0f}% | {100 * pr['without_memory']['codes_exact']:.0f}% |")
md += ["", f"Command: `.venv/bin/python recipes/crossbatch_finetune.py --time-budget {args.time_budget:.0f} "
       f"--steps {args.steps} --context {args.context} --lr {args.lr} --rank {args.rank} --needle-rate {args.needle_rate} "
       f"--extra-negatives {args.extra_negatives} --needle-weight {args.needle_weight} --mem-layers {args.mem_layers} "
       f"--name {args.name}`", ""]
atomic_write(results / f"{args.name}.md", "\n".join(md))
print("\n".join(md))
