"""Fused vs unfused first training step (Temp-Lora with L_T = W − Δ): identical PPL, speed ratio.
Both runs use the same model and tokens in one process, in the order unfused, fused, unfused, fused
(`--repeats` pairs), and the ratio is taken from the medians.

  .venv/bin/python benchmarks/fused_step.py [--tokens 2048] [--repeats 1]"""

import argparse
import statistics

from common import save, setup

from infinictx import method_config, streaming_perplexity
from infinictx.tasks.perplexity import perplexity

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=2048)
p.add_argument("--repeats", type=int, default=1)
p.add_argument("--window", type=int, default=512)
p.add_argument("--chunk", type=int, default=256)
args = p.parse_args()

lm, ids, book = setup()
ids = ids[:args.tokens]
runs = {False: [], True: []}
ppl, flops, max_diff = {}, {}, 0.0
nll = {}
for _ in range(args.repeats):
    for fuse in (False, True):
        cfg = method_config("temp-lora", window=args.window, chunk=args.chunk, fuse_first_step=fuse)
        with cfg.make_session(lm) as s:
            r = streaming_perplexity(s, ids, progress=True)
        runs[fuse].append(r.wall_s)
        ppl[fuse], flops[fuse], nll[fuse] = perplexity(r.nll), r.cost["flops"], r.nll
    max_diff = max(max_diff, float(abs(nll[True] - nll[False]).max()))
med = {k: statistics.median(v) for k, v in runs.items()}
md = [f"## Fused vs unfused first Temp-Lora step: {book}, first {len(ids)} tokens, W={args.window}, Δ={args.chunk}",
      "", "| variant | PPL | wall s (median) | FLOPs |", "|---|---|---|---|",
      f"| unfused (score, then train 2 steps) | {ppl[False]:.4f} | {med[False]:.1f} | {flops[False]:.3e} |",
      f"| fused (score = first training forward) | {ppl[True]:.4f} | {med[True]:.1f} | {flops[True]:.3e} |", "",
      f"Speed-up (unfused / fused wall time): **{med[False] / med[True]:.3f}x**; FLOP ratio "
      f"{flops[False] / flops[True]:.3f}x; max |ΔNLL| per token {max_diff:.2e}.", "",
      f"Command: `.venv/bin/python benchmarks/fused_step.py --tokens {args.tokens} --repeats {args.repeats}`"]
save("fused_step", {"tokens": len(ids), "wall_s": {"unfused": runs[False], "fused": runs[True]},
                    "ppl": {"unfused": ppl[False], "fused": ppl[True]}, "max_abs_nll_diff": max_diff,
                    "speedup": med[False] / med[True], "flops": {"unfused": flops[False], "fused": flops[True]}},
     "\n".join(md) + "\n")
