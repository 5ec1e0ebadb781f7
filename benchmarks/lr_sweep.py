"""Temp-Lora learning-rate sweep for the embedded model on the default book (W=512, Δ=256, L_T=256, r=64,
2 steps). The base (plain window) is scored once; every lr is compared with it on identical inputs.

  .venv/bin/python benchmarks/lr_sweep.py [--tokens 6144] [--lrs 1e-4,3e-4,1e-3]"""

import argparse

from common import save, setup

from infinictx import method_config, streaming_perplexity
from infinictx.tasks.perplexity import perplexity

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=6144)
p.add_argument("--lrs", default="1e-4,3e-4,1e-3")
p.add_argument("--window", type=int, default=512)
p.add_argument("--chunk", type=int, default=256)
args = p.parse_args()

lm, ids, book = setup()
ids = ids[:args.tokens]
with method_config("window", window=args.window, chunk=args.chunk).make_session(lm) as s:
    base = streaming_perplexity(s, ids, progress=True)
half = len(base.nll) // 2
rows = []
for lr in [float(x) for x in args.lrs.split(",")]:
    with method_config("temp-lora", window=args.window, chunk=args.chunk, lr=lr).make_session(lm) as s:
        r = streaming_perplexity(s, ids, progress=True)
    rows.append({"lr": lr, "ppl": perplexity(r.nll), "ppl_second_half": perplexity(r.nll[half:]),
                 "ratio_vs_base": perplexity(r.nll) / perplexity(base.nll),
                 "ratio_second_half": perplexity(r.nll[half:]) / perplexity(base.nll[half:]), "wall_s": r.wall_s})
md = [f"## Temp-Lora lr sweep: {book}, first {len(ids)} tokens, W={args.window}, Δ={args.chunk}, r=64, 2 steps",
      "", f"Base (plain window) PPL {perplexity(base.nll):.3f}, second half {perplexity(base.nll[half:]):.3f}.", "",
      "| lr | PPL | ratio vs base | PPL 2nd half | ratio 2nd half | wall s |", "|---|---|---|---|---|---|"]
md += [f"| {r['lr']:g} | {r['ppl']:.3f} | {r['ratio_vs_base']:.3f} | {r['ppl_second_half']:.3f} | "
       f"{r['ratio_second_half']:.3f} | {r['wall_s']:.0f} |" for r in rows]
md += ["", "Command: `.venv/bin/python benchmarks/lr_sweep.py " + f"--tokens {args.tokens} --lrs {args.lrs}`"]
save("lr_sweep", {"tokens": len(ids), "window": args.window, "chunk": args.chunk,
                  "base_ppl": perplexity(base.nll), "rows": rows}, "\n".join(md) + "\n")
