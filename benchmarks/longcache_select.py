"""LongCache's selection kernels on book text: prefill seconds of the first N tokens of the default book (W=1024,
the method's defaults) under each kernel, in one run, with the keys the bf16-candidate kernel re-scored in fp32
per row (what its error bound costs). The passkey prompt of `long_prefill.py` repeats a few sentences, so its
best keys come in hundreds of near-identical copies; real text is what the default kernel is chosen for.

  .venv/bin/python benchmarks/longcache_select.py [--tokens 16384] [--kernels fast,fast-fp32,reference]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import save

from infinictx import load_model, method_config, read_text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--kernels", default="fast,fast-fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="longcache_select_amx")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(None, device="cpu", dtype="float32")   # fp32: the kernels' choice is about an fp32 model
    text, book = read_text(None)
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][:args.tokens]
    rows = []
    for kernel in args.kernels.split(","):
        with method_config("longcache", window=1024, kernel=kernel).make_session(lm) as s:
            t0 = time.perf_counter()
            for i in range(0, len(ids), s.chunk):
                s.absorb(ids[i:i + s.chunk])
            seconds = time.perf_counter() - t0
            p = s.policy
            rows.append({"kernel": kernel, "tokens": len(ids), "prefill_s": round(seconds, 1),
                         "rescored_per_row": round(p.rescored / p.bf16_rows, 1) if p.bf16_rows else None})
        print(rows[-1], flush=True)
    base = rows[-1]["prefill_s"]
    lines = [f"# LongCache selection kernels on book text ({book}, first {len(ids)} tokens, W=1024, fp32)", "",
             "| kernel | prefill s | vs last row | keys re-scored per row (bf16 candidates) |", "|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['prefill_s']} | {base / r['prefill_s']:.2f}x | {r['rescored_per_row'] or '–'} |"
              for r in rows]
    save(args.name, {"book": book, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
