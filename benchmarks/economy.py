"""Economy: a short window plus Temp-Lora (and its cheaper variants) against plain, longer windows, on the same
tokens, in one run. Every configuration scores the same chunks; the plain windows at Δ=256 give each chunk W−Δ
tokens of context, W=2048/8192 with Δ=1024 are the cheap ways to run a long window. The machine's matmul peak
(fp32 and bf16, 2048², this run's threads) is measured at the start and the end, so achieved GFLOP/s (the cost
meter's analytic FLOPs over wall time) can be read as a fraction of it.

Rows are written to results/<name>.partial.json as they finish; a rerun continues with the missing ones.

  .venv/bin/python benchmarks/economy.py [--tokens 32768] [--book PATH] [--rows temp-lora,window-2048]"""

import argparse
import json
import time

import torch
from common import RESULTS, save, setup

from infinictx import method_config, read_text, streaming_perplexity
from infinictx.core.files import write_json
from infinictx.tasks.perplexity import perplexity

# label: (method, W, Δ, settings)
ROWS = {
    "temp-lora": ("temp-lora", 512, 256, {}),
    "temp-lora-top8": ("temp-lora", 512, 256, {"lora_layers": "top:8"}),
    "temp-lora-1step": ("temp-lora", 512, 256, {"steps": 1, "lr": 6e-4}),
    "temp-lora-1step-top8": ("temp-lora", 512, 256, {"steps": 1, "lr": 6e-4, "lora_layers": "top:8"}),
    "temp-lora-every2": ("temp-lora", 512, 256, {"train_every": 2}),
    "temp-lora-r8": ("temp-lora", 512, 256, {"rank": 8, "alpha": 8}),
    "window-1024": ("window", 1024, 256, {}),
    "window-2048": ("window", 2048, 256, {}),
    "window-2048-d1024": ("window", 2048, 1024, {}),
    "window-8192-d1024": ("window", 8192, 1024, {}),
}
REFERENCE = "window-2048"   # the plain 2K window the target is measured against


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """GFLOP/s of an n×n matmul in `dtype` on this process's threads."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def run_row(lm, ids, label: str) -> dict:
    method, w, d, extra = ROWS[label]
    with method_config(method, window=w, chunk=d, **extra).make_session(lm) as s:
        r = streaming_perplexity(s, ids, progress=True)
    return {"label": label, "method": method, "window": w, "chunk": d, "settings": extra, "ppl": perplexity(r.nll),
            "wall_s": r.wall_s, "wall_s_by_phase": r.cost["wall_s_by_phase"], "flops": r.cost["flops"],
            "gflops_per_s": r.cost["flops"] / r.wall_s / 1e9, "peak_rss_bytes": r.cost["peak_rss_bytes"],
            "buckets": r.buckets(8192)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--book", default=None, help="a text file (default: the default book)")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="economy")
    args = p.parse_args()
    labels = args.rows.split(",")
    unknown = [r for r in labels if r not in ROWS]
    if unknown:
        raise SystemExit(f"economy: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    lm, ids, book = setup(args.threads)
    if args.book:
        text, book = read_text(args.book)
        ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    ids = ids[:args.tokens]
    partial = RESULTS / f"{args.name}.partial.json"
    state = json.loads(partial.read_text()) if partial.exists() else {}
    if state and (state.get("tokens") != len(ids) or state.get("book") != book):
        raise SystemExit(f"economy: {partial} is another run's (book or tokens differ); delete it or use --name")
    state.update({"tokens": len(ids), "book": book})
    peaks = state.setdefault("peaks", [])
    peaks.append({"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)})
    rows = state.setdefault("rows", {})
    for label in labels:
        if label not in rows:
            rows[label] = run_row(lm, ids, label)
            write_json(state, partial)
    peaks.append({"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)})
    write_json(state, partial)

    fp32 = max(p["fp32"] for p in peaks)
    bf16 = max(p["bf16"] for p in peaks)
    ref = rows.get(REFERENCE)
    shown = [rows[label] for label in ROWS if label in rows]
    md = [f"## Economy: {book}, first {len(ids)} tokens", "",
          f"Matmul peak on {args.threads} threads (2048², best of the measurements in the runs that wrote these rows):"
          f" fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s. Achieved: the cost meter's analytic FLOPs over wall "
          "time, as a fraction of the fp32 peak (every row runs in fp32).", "",
          "| row | method | W | Δ | settings | PPL | wall s | wall / window-2048 | training s | TFLOP | GFLOP/s | "
          "of fp32 peak |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in shown:
        ratio = f"{r['wall_s'] / ref['wall_s']:.2f}" if ref else "–"
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "–"
        md.append(f"| {r['label']} | {r['method']} | {r['window']} | {r['chunk']} | {settings} | {r['ppl']:.3f} | "
                  f"{r['wall_s']:.0f} | {ratio} | {r['wall_s_by_phase'].get('training', 0):.0f} | "
                  f"{r['flops'] / 1e12:.1f} | {r['gflops_per_s']:.0f} | {100 * r['gflops_per_s'] / fp32:.0f}% |")
    first = shown[0]["buckets"]
    md += ["", "Per 8K-token bucket (PPL):", "", "| row | " + " | ".join(
        f"{b['start'] // 1024}K–{b['end'] // 1024}K" for b in first) + " |", "|---|" + "---|" * len(first)]
    md += [f"| {r['label']} | " + " | ".join(f"{b['ppl']:.2f}" for b in r["buckets"]) + " |" for r in shown]
    md += ["", f"Command: `.venv/bin/python benchmarks/economy.py --tokens {args.tokens}"
           + (f" --book {args.book}" if args.book else "") + f" --name {args.name}`"]
    if set(ROWS) <= set(rows) or set(labels) <= set(rows):
        save(args.name, {"tokens": len(ids), "book": book, "peaks": peaks, "rows": shown}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
