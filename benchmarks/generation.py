"""Long generation with Temp-Lora: tokens/s with and without cache reuse, and against the PyPI package
temp-lora-pipeline==0.0.1 at the same settings, all in one run (theirs in its own virtualenv, created on first
use under the cache directory, since it needs transformers < 5).

  .venv/bin/python benchmarks/generation.py [--tokens 1024] [--window 512] [--chunk 256]"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from common import save, setup, venv_python

from infinictx import Sampler, generate_long, method_config
from infinictx.core.models import resolve_model_path

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=1024)
p.add_argument("--window", type=int, default=512)
p.add_argument("--chunk", type=int, default=256)
p.add_argument("--prompt-tokens", type=int, default=200)
p.add_argument("--context", type=int, default=None, help="L_x (default W−Δ; cache reuse needs L_x + 2Δ <= W)")
p.add_argument("--skip-pipeline", action="store_true")
p.add_argument("--name", default="generation", help="results file name")
args = p.parse_args()

lm, ids, book = setup()
prompt = ids[:args.prompt_tokens]
cfg = method_config("temp-lora", window=args.window, chunk=args.chunk)
rows = []
for reuse in (True, False):
    with cfg.make_session(lm) as s:
        r = generate_long(s, prompt, args.tokens, context_len=args.context, sampler=Sampler(), cache_reuse=reuse,
                          progress=True)
    summ = r.summary()
    rows.append({"impl": "infinictx", "cache_reuse": reuse, "wall_s": r.wall_s, "tokens_per_s": summ["tokens_per_s"],
                 "wall_s_by_phase": summ["wall_s_by_phase"], "forward_tokens": summ["tokens_processed"]["forward"],
                 "decode_tokens_per_s": summ["decode_tokens_per_s"], "flops": summ["flops"]})


def pipeline_venv() -> Path:
    return venv_python("venv-tlp", ["torch==2.13.0", "transformers==4.38.2", "peft==0.8.2", "accelerate==0.27.2",
                                    "temp-lora-pipeline==0.0.1"])


if not args.skip_pipeline:
    job = {"model_dir": str(resolve_model_path(None)[0]), "prompt_ids": prompt.tolist(), "window": args.window,
           "chunk": args.chunk, "tokens": args.tokens, "lr": cfg.lr, "steps": cfg.steps, "rank": cfg.rank,
           "alpha": cfg.alpha, "threads": torch.get_num_threads()}
    proc = subprocess.run([str(pipeline_venv()), str(Path(__file__).with_name("tlp_runner.py")), json.dumps(job)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"temp-lora-pipeline failed: {proc.stderr.strip().splitlines()[-1]}")
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    rows.append({"impl": "temp-lora-pipeline 0.0.1", "cache_reuse": False, **theirs})

best = rows[0]["tokens_per_s"]
lx = args.context or args.window - args.chunk
md = [f"## Long generation with Temp-Lora: {args.tokens} tokens after a {len(prompt)}-token prompt from {book}",
      "", f"W={args.window}, Δ={args.chunk}, L_x={lx}, L_T={args.window - args.chunk}, r=64, 2 steps per chunk, "
      "greedy with repetition penalty 1.12; wall time includes training; decode tokens/s counts generation "
      "forwards only.", "",
      "| implementation | cache reuse | wall s | tokens/s | decode tokens/s | forward tokens | speed-up of infinictx (reuse) |",
      "|---|---|---|---|---|---|---|"]
md += [f"| {r['impl']} | {'yes' if r['cache_reuse'] else 'no'} | {r['wall_s']:.1f} | {r['tokens_per_s']:.2f} | "
       f"{r.get('decode_tokens_per_s') or 0:.2f} | {r.get('forward_tokens', '–')} | {best / r['tokens_per_s']:.2f}x |"
       for r in rows]
md += ["", f"Command: `.venv/bin/python benchmarks/generation.py --tokens {args.tokens} --window {args.window} "
       f"--chunk {args.chunk}" + (f" --context {args.context}" if args.context else "")
       + (" --skip-pipeline" if args.skip_pipeline else "") + f" --name {args.name}`"]
save(args.name, {"tokens": args.tokens, "window": args.window, "chunk": args.chunk, "context": lx, "rows": rows},
     "\n".join(md) + "\n")
