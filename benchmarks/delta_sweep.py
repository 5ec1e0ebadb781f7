"""Chunk size Δ at a fixed window: Temp-Lora vs base (identical inputs) for Δ in {128, 256, 512} at W=1024.
The paper reports lower PPL for smaller Δ (more, smaller updates, and more context per scored token).

  .venv/bin/python benchmarks/delta_sweep.py [--tokens 32768] [--deltas 128,256,512] [--window 1024]"""

import argparse

from common import save, setup

from infinictx import method_config, streaming_perplexity
from infinictx.tasks.perplexity import perplexity

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=32768)
p.add_argument("--deltas", default="128,256,512")
p.add_argument("--window", type=int, default=1024)
args = p.parse_args()

lm, ids, book = setup()
ids = ids[:args.tokens]
rows = []
for d in [int(x) for x in args.deltas.split(",")]:
    with method_config("temp-lora", window=args.window, chunk=d).make_session(lm) as s:
        r = streaming_perplexity(s, ids, compare_base=True, progress=True)
    rows.append({"chunk": d, "ppl": perplexity(r.nll), "base_ppl": perplexity(r.base_nll),
                 "ratio": perplexity(r.nll) / perplexity(r.base_nll), "wall_s": r.wall_s,
                 "wall_s_by_phase": r.cost["wall_s_by_phase"], "flops": r.cost["flops"]})
md = [f"## Δ sweep: Temp-Lora vs base at W={args.window}, {book}, first {len(ids)} tokens", "",
      "| Δ | Temp-Lora PPL | base PPL | ratio | wall s (incl. base scoring) |", "|---|---|---|---|---|"]
md += [f"| {r['chunk']} | {r['ppl']:.3f} | {r['base_ppl']:.3f} | {r['ratio']:.3f} | {r['wall_s']:.0f} |"
       for r in rows]
md += ["", f"Command: `.venv/bin/python benchmarks/delta_sweep.py --tokens {args.tokens} --deltas {args.deltas} "
       f"--window {args.window}`"]
save("delta_sweep", {"tokens": len(ids), "window": args.window, "rows": rows}, "\n".join(md) + "\n")
