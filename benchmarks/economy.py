"""Economy: a short window plus Temp-Lora against plain, longer windows, on the same tokens, in one run.
Default: Temp-Lora at W=512 (Δ=256) vs the plain window at W=1024 and W=2048 (Δ=256: every configuration scores
the same chunks, each with W−Δ tokens of context), plus W=2048 with Δ=1024 (the cheap way to run a 2K window).

  .venv/bin/python benchmarks/economy.py [--tokens 32768]"""

import argparse

from common import save, setup

from infinictx import method_config, streaming_perplexity
from infinictx.tasks.perplexity import perplexity

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=32768)
p.add_argument("--lr", type=float, default=None)
args = p.parse_args()

lm, ids, book = setup()
ids = ids[:args.tokens]
runs = [("temp-lora", 512, 256), ("window", 1024, 256), ("window", 2048, 256), ("window", 2048, 1024)]
rows = []
for method, w, d in runs:
    lr = {"lr": args.lr} if args.lr and method == "temp-lora" else {}
    with method_config(method, window=w, chunk=d, **lr).make_session(lm) as s:
        r = streaming_perplexity(s, ids, progress=True)
    rows.append({"method": method, "window": w, "chunk": d, "ppl": perplexity(r.nll), "wall_s": r.wall_s,
                 "flops": r.cost["flops"], "peak_rss_bytes": r.cost["peak_rss_bytes"],
                 "buckets": r.buckets(8192)})
ref = next(r for r in rows if r["window"] == 2048 and r["chunk"] == 256)
md = [f"## Economy: {book}, first {len(ids)} tokens, in one run", "",
      "| method | W | Δ | PPL | wall s | wall / (W=2048, Δ=256) | TFLOP |", "|---|---|---|---|---|---|---|"]
md += [f"| {r['method']} | {r['window']} | {r['chunk']} | {r['ppl']:.3f} | {r['wall_s']:.0f} | "
       f"{r['wall_s'] / ref['wall_s']:.2f} | {r['flops'] / 1e12:.1f} |" for r in rows]
md += ["", "Per 8K-token bucket (PPL):", "", "| method | W | Δ | " + " | ".join(
    f"{b['start'] // 1024}K–{b['end'] // 1024}K" for b in rows[0]["buckets"]) + " |",
       "|---|---|---|" + "---|" * len(rows[0]["buckets"])]
md += [f"| {r['method']} | {r['window']} | {r['chunk']} | " + " | ".join(f"{b['ppl']:.2f}" for b in r["buckets"])
       + " |" for r in rows]
md += ["", f"Command: `.venv/bin/python benchmarks/economy.py --tokens {args.tokens}`"]
save("economy", {"tokens": len(ids), "rows": rows}, "\n".join(md) + "\n")
