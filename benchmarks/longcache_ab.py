"""LongCache's selection kernels A/B inside one read: the AMX tile kernel (split-bf16 scores) against the bf16 matmul
kernel, alternating per prefill chunk in ABBA order over the passkey prompt of `long_prefill.py`, so both halves
see the same host speed (on a shared machine whose AMX throughput drifts 2-4x within minutes, separate runs cannot
be compared). Both kernels select the same keys (tests): only the time differs. Reported: prefill seconds per half,
their ratio, and the keys re-scored in fp32 per row by each.

  .venv/bin/python benchmarks/longcache_ab.py [--tokens 32768] [--name longcache_ab_32k]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from common import save

from infinictx import load_model, method_config
from infinictx.core import native
from infinictx.methods.kv import longcache
from infinictx.tasks.retrieval import passkey_trial


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not native.has_amx():
        raise SystemExit("this CPU (or this build) has no AMX tiles: nothing to compare")
    lm = load_model(None, device="cpu", dtype="float32")
    trial = passkey_trial(lm.tokenizer, args.tokens, 0.5, random.Random(f"long-prefill-{args.tokens}"))
    seconds = {"amx": 0.0, "matmul": 0.0}
    rescored = {"amx": [0, 0], "matmul": [0, 0]}
    with method_config("longcache", window=1024).make_session(lm) as s:
        for j, i in enumerate(range(0, len(trial.ids), s.chunk)):
            name = "amx" if j % 4 in (0, 3) else "matmul"   # ABBA
            longcache._AMX = name == "amx"
            before = (s.policy.rescored, s.policy.bf16_rows)
            t0 = time.perf_counter()
            s.absorb(trial.ids[i:i + s.chunk])
            seconds[name] += time.perf_counter() - t0
            rescored[name][0] += s.policy.rescored - before[0]
            rescored[name][1] += s.policy.bf16_rows - before[1]
    longcache._AMX = None
    per_row = {k: round(v[0] / v[1], 1) if v[1] else None for k, v in rescored.items()}
    ratio = seconds["amx"] / seconds["matmul"]
    name = args.name or f"longcache_ab_{args.tokens // 1024}k"
    md = "\n".join([
        f"# LongCache selection kernels, A/B per chunk inside one {args.tokens:,}-token read", "",
        f"{args.threads} threads, fp32 model, W=1024, the passkey prompt of long_prefill.py; chunks alternate ABBA "
        "between the AMX tile kernel (split-bf16 scores) and the bf16 matmul kernel (same selection).", "",
        "| kernel | prefill s (its half of the chunks) | keys re-scored per row |", "|---|---|---|",
        *(f"| {k} | {seconds[k]:.1f} | {per_row[k]} |" for k in ("amx", "matmul")), "",
        f"Ratio AMX / matmul: **{ratio:.3f}**.", "",
        f"Command: `.venv/bin/python benchmarks/longcache_ab.py --tokens {args.tokens}`"])
    save(name, {"tokens": args.tokens, "threads": args.threads, "seconds": seconds, "ratio": round(ratio, 3),
                "rescored_per_row": per_row}, md)


if __name__ == "__main__":
    main()
