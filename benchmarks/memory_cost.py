"""Focused Transformer memory: what the lookup costs.

1. ms per generated token against memory size (4K..64K entries per memory layer), dense vs top-k (torch below
   the faiss threshold, faiss at and above it), on the embedded model with its 3 memory layers and W=1024.
   The memory is filled with keys and values taken from the model on real text (the book, repeated as needed):
   the lookup cost does not depend on what the entries say, only on how many there are.
2. Peak memory of one memory-attention call (512 queries over 64K entries) against the grouping setting
   (query heads, queries per block), each in a fresh process so that its peak RSS is its own.

  .venv/bin/python benchmarks/memory_cost.py [--sizes 4096,16384,65536] [--tokens 32]"""

import argparse
import json
import subprocess
import sys
import time

import torch
from common import save, setup

from infinictx import Sampler, method_config
from infinictx.methods.memory import parse_mem_layers

p = argparse.ArgumentParser()
p.add_argument("--sizes", default="4096,8192,16384,32768,65536")
p.add_argument("--tokens", type=int, default=32, help="tokens generated per measurement")
p.add_argument("--window", type=int, default=1024)
p.add_argument("--mem-layers", default="spread", help="'spread' (3 layers, as the committed results), 'auto[:N]' or indices")
p.add_argument("--groupings", default="auto;9,512;3,512;3,128;1,64")
p.add_argument("--peak-memory-size", type=int, default=65536)
p.add_argument("--child", default=None, help=argparse.SUPPRESS)
args = p.parse_args()

if args.child:  # one grouping measurement in a fresh process: peak RSS of one memory-attention call
    from infinictx.methods.memory import Memory, memory_attention

    torch.manual_seed(0)
    grouping = None if args.child == "auto" else tuple(int(x) for x in args.child.split(","))
    M, T, L = args.peak_memory_size, 512, args.window
    mem = Memory(torch.float32)
    mem.append(torch.randn(1, 3, M, 64), torch.randn(1, 3, M, 64))
    q, k, v = torch.randn(1, 9, T, 64), torch.randn(1, 3, L, 64), torch.randn(1, 3, L, 64)

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (VmHWM) to the current RSS
        f.write("5")
    base = status("VmRSS:")
    t0 = time.perf_counter()
    memory_attention(q, k, v, q, mem, 0.125, grouping=grouping)
    dt = time.perf_counter() - t0
    print(json.dumps({"grouping": args.child, "extra_peak_bytes": status("VmHWM:") - base, "s": dt}))
    sys.exit(0)

lm, ids, book = setup()
mem_layers = parse_mem_layers(args.mem_layers)
sizes = [int(x) for x in args.sizes.split(",")]
rows = []
for lookup in ("dense", "topk"):
    cfg = method_config("memory", window=args.window, chunk=args.window // 2, lookup=lookup, topk=128,
                        mem_layers=mem_layers)
    with cfg.make_session(lm) as s:
        # real keys/values: absorb a window of the book once, then grow each memory by copying its own entries
        s.absorb(ids[:2 * args.window])
        for size in sizes:
            size = max(size, len(next(iter(s.memory.values()))))
            for m in s.memory.values():
                while len(m) < size:
                    n = min(len(m), size - len(m))
                    m.append(m.keys()[:, :, :n].clone(), m.values()[:, :, :n].clone())
            s.generate_chunk(2, 0, Sampler())  # warm-up
            t0 = time.perf_counter()
            s.generate_chunk(args.tokens, 0, Sampler())
            dt = (time.perf_counter() - t0) / args.tokens
            m0 = next(iter(s.memory.values()))
            rows.append({"lookup": lookup, "size": size, "memory_entries": len(m0), "ms_per_token": round(1000 * dt, 2),
                         "faiss": m0.indexes is not None, "memory_bytes": sum(m.nbytes() for m in s.memory.values())})
            print(rows[-1], flush=True)
# the same without memory layers: the plain local-window cost per token
with method_config("memory", window=args.window, chunk=args.window // 2, mem_layers=[]).make_session(lm) as s:
    s.absorb(ids[:2 * args.window])
    s.generate_chunk(2, 0, Sampler())
    t0 = time.perf_counter()
    s.generate_chunk(args.tokens, 0, Sampler())
    no_memory_ms = round(1000 * (time.perf_counter() - t0) / args.tokens, 2)

peaks = []
for g in args.groupings.split(";"):
    out = subprocess.run([sys.executable, __file__, "--child", g, "--peak-memory-size", str(args.peak_memory_size),
                          "--window", str(args.window)], capture_output=True, text=True, check=True)
    peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(peaks[-1], flush=True)

md = [f"## FoT memory lookup cost: {lm.name}, W={args.window}, memory layers {args.mem_layers}", "",
      f"Generation, ms per token (mean of {args.tokens}); local window only (no memory layers): {no_memory_ms} ms.", "",
      "| memory entries per layer | dense ms/token | top-128 ms/token | top-k backend | memory MiB (3 layers) |",
      "|---|---|---|---|---|"]
for size in sizes:
    d = next(r for r in rows if r["lookup"] == "dense" and r["size"] == size)
    t = next(r for r in rows if r["lookup"] == "topk" and r["size"] == size)
    md.append(f"| {size:,} | {d['ms_per_token']} | {t['ms_per_token']} | {'faiss' if t['faiss'] else 'torch'} "
              f"| {d['memory_bytes'] / 2**20:.0f} |")
md += ["", f"Peak extra memory of one memory-attention call: 512 queries × 9 heads over {args.peak_memory_size:,} "
       "entries + 1024 local (fresh process each):", "",
       "| grouping (query heads, queries) | extra peak MiB | s |", "|---|---|---|"]
md += [f"| {p['grouping']} | {p['extra_peak_bytes'] / 2**20:.0f} | {p['s']:.2f} |" for p in peaks]
md += ["", f"Command: `.venv/bin/python benchmarks/memory_cost.py --sizes {args.sizes} --tokens {args.tokens}`"]
save("memory_cost", {"window": args.window, "rows": rows, "no_memory_ms_per_token": no_memory_ms,
                     "grouping_peaks": peaks}, "\n".join(md) + "\n")
print("\n".join(md))
