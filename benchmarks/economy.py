"""Economy: a short window plus Temp-Lora (and its cheaper variants) against plain, longer windows, on the same
tokens, in one run. Every configuration scores the same chunks; the plain windows at Δ=256 give each chunk W−Δ
tokens of context, W=2048/8192 with Δ=1024 are the cheap ways to run a long window. The machine's matmul peak
(fp32 and bf16, 2048², this run's threads) is measured at the start and the end, so achieved GFLOP/s (the cost
meter's analytic FLOPs over wall time) can be read as a fraction of it.

A row label may end in ":bf16" (or ":fp32"): that row runs on a copy of the model with its frozen weights in that
dtype (Temp-Lora's adapter, optimizer and the scores stay fp32), so dtypes are compared in one run. Rows without
a suffix use --dtype (default float32; "auto" is what `load_model` picks: bf16 on CPUs with AMX).

Rows are written to results/<name>.partial.json as they finish; a rerun continues with the missing ones.

  .venv/bin/python benchmarks/economy.py [--tokens 32768] [--book PATH] [--rows temp-lora,temp-lora:bf16]"""

import argparse
import json
import time

import torch
from common import RESULTS, save, setup

from infinictx import method_config, read_text, streaming_perplexity
from infinictx.core.files import write_json
from infinictx.core.models import cpu_name
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
REFERENCES = ("window-2048", "window-8192-d1024")   # the plain windows the targets are measured against


DTYPE_SUFFIX = {"fp32": "float32", "bf16": "bfloat16"}


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """GFLOP/s of an n×n matmul in `dtype` on this process's threads."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def split_label(label: str, default_dtype: str) -> tuple[str, str]:
    """"temp-lora:bf16" -> ("temp-lora", "bfloat16")."""
    row, _, suffix = label.partition(":")
    if row not in ROWS or (suffix and suffix not in DTYPE_SUFFIX):
        raise SystemExit(f"economy: unknown row {label!r}; choose from {', '.join(ROWS)}, optionally with "
                         f":{' or :'.join(DTYPE_SUFFIX)}")
    return row, DTYPE_SUFFIX[suffix] if suffix else default_dtype


def run_row(lm, ids, label: str, row: str) -> dict:
    method, w, d, extra = ROWS[row]
    with method_config(method, window=w, chunk=d, **extra).make_session(lm) as s:
        r = streaming_perplexity(s, ids, progress=True)
    return {"label": label, "method": method, "dtype": str(lm.dtype).removeprefix("torch."), "window": w,
            "chunk": d, "settings": extra, "ppl": perplexity(r.nll),
            "wall_s": r.wall_s, "wall_s_by_phase": r.cost["wall_s_by_phase"], "flops": r.cost["flops"],
            "gflops_per_s": r.cost["flops"] / r.wall_s / 1e9, "peak_rss_bytes": r.cost["peak_rss_bytes"],
            "buckets": r.buckets(8192)}


def main():
    from infinictx import load_model
    from infinictx.core.models import cpu_flags, cpu_has_fast_bf16, pick_dtype

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--book", default=None, help="a text file (default: the default book)")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--dtype", default="float32", help="rows without a :fp32/:bf16 suffix (auto, float32, bfloat16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="economy")
    args = p.parse_args()
    default_dtype = str(pick_dtype(args.dtype, torch.device("cpu"))).removeprefix("torch.")
    labels = args.rows.split(",")
    plan = {label: split_label(label, default_dtype) for label in labels}
    lm, ids, book = setup(args.threads)
    if args.book:
        text, book = read_text(args.book)
        ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    ids = ids[:args.tokens]
    models = {str(lm.dtype).removeprefix("torch."): lm}
    partial = RESULTS / f"{args.name}.partial.json"
    state = json.loads(partial.read_text()) if partial.exists() else {}
    if state and (state.get("tokens") != len(ids) or state.get("book") != book):
        raise SystemExit(f"economy: {partial} is another run's (book or tokens differ); delete it or use --name")
    state.update({"tokens": len(ids), "book": book, "cpu": cpu_name(), "cpu_amx": "amx_bf16" in cpu_flags()})
    # without bf16 in hardware a bf16 matmul is emulated (~70x slower than fp32 here): a smaller one keeps it short
    bf16_n = 2048 if cpu_has_fast_bf16() else 512
    peaks = state.setdefault("peaks", [])
    peaks.append({"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16, bf16_n), "bf16_n": bf16_n})
    rows = state.setdefault("rows", {})
    for label in labels:
        if label not in rows:
            row, dtype = plan[label]
            if dtype not in models:
                models[dtype] = load_model(None, dtype=dtype)
            rows[label] = run_row(models[dtype], ids, label, row)
            write_json(state, partial)
    peaks.append({"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16, bf16_n), "bf16_n": bf16_n})
    write_json(state, partial)

    peak = {"float32": max(p["fp32"] for p in peaks), "bfloat16": max(p["bf16"] for p in peaks)}
    # each row is compared with the reference windows in its own dtype ("window-2048" or "window-2048:bf16")
    refs = {(r["label"].partition(":")[0], r.get("dtype", "float32")): r for r in rows.values()}
    order = {label: k for k, label in enumerate(ROWS)}
    shown = sorted(rows.values(), key=lambda r: (order[r["label"].partition(":")[0]], r["label"]))
    md = [f"## Economy: {book}, first {len(ids)} tokens", "",
          f"CPU: {state['cpu']} ({'with' if state['cpu_amx'] else 'without'} AMX), {args.threads} threads. Matmul "
          f"peak (best of the measurements in the runs that wrote these rows): fp32 {peak['float32']:.0f} GFLOP/s "
          f"(2048²), bf16 {peak['bfloat16']:.1f} GFLOP/s ({peaks[-1].get('bf16_n', 2048)}²). Achieved: the cost "
          "meter's analytic FLOPs over wall time, as a fraction of the peak of the row's dtype (the frozen "
          "weights' dtype; adapters and scores are fp32).", "",
          "| row | method | dtype | W | Δ | settings | PPL | wall s | wall / window-2048 | wall / window-8192-d1024 | "
          "training s | TFLOP | GFLOP/s | of peak |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in shown:
        dtype = r.get("dtype", "float32")
        ratios = " | ".join(f"{r['wall_s'] / refs[ref, dtype]['wall_s']:.2f}" if (ref, dtype) in refs else "–"
                            for ref in REFERENCES)
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "–"
        md.append(f"| {r['label']} | {r['method']} | {dtype} | {r['window']} | {r['chunk']} | {settings} | "
                  f"{r['ppl']:.3f} | {r['wall_s']:.0f} | {ratios} | {r['wall_s_by_phase'].get('training', 0):.0f} | "
                  f"{r['flops'] / 1e12:.1f} | {r['gflops_per_s']:.0f} | {100 * r['gflops_per_s'] / peak[dtype]:.0f}% |")
    first = shown[0]["buckets"]
    md += ["", "Per 8K-token bucket (PPL):", "", "| row | " + " | ".join(
        f"{b['start'] // 1024}K–{b['end'] // 1024}K" for b in first) + " |", "|---|" + "---|" * len(first)]
    md += [f"| {r['label']} | " + " | ".join(f"{b['ppl']:.2f}" for b in r["buckets"]) + " |" for r in shown]
    md += ["", f"Command: `.venv/bin/python benchmarks/economy.py --tokens {args.tokens}"
           + (f" --book {args.book}" if args.book else "") + f" --rows {','.join(rows)} --name {args.name}`"]
    if set(labels) <= set(rows):
        save(args.name, {"tokens": len(ids), "book": book, "cpu": state["cpu"], "cpu_amx": state["cpu_amx"],
                         "peaks": peaks, "rows": shown}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
