"""Long prompts at the machine's limit: prefill and decode speed of every long-input method, fast vs reference
kernels side by side, in one run.

For each (method, kernel, length) row: a seeded passkey prompt of that length (needle at mid depth) is read
chunk by chunk, then 16 tokens are decoded greedily. Reported: prefill seconds (up to the first answer token)
and tokens/s, decode ms/token (the other 15),
the peak resident memory during the row (sampled), the FLOPs the session's cost meter counted and the achieved
GFLOP/s as a fraction of this machine's fp32 matmul peak, measured in the same run (2048² matmul, and bf16 beside
it: a CPU without AMX / AVX-512-BF16 runs bf16 matmul far slower, which decides whether bf16 paths can help).

  memory     the stock model with smollm2-fot's 12 memory layers, exact top-128, W=1024 (the same compute as
             `--model smollm2-fot`: weights differ, the work does not); local keys cached (fast, reference) or
             re-read with each chunk (reread: the method's default, twice the forward work)
  longcache  W=1024, exact selection: fast (on a CPU with AMX, bf16 scores find candidates, fp32 re-scores them;
             fastfp32: fp32 scores only) and reference (bf16select: bf16 scores on the fp32 model, opt-in, not
             exact)
  window, razor (W=1024 defaults), full (≤ 8K: its cache grows with the prompt and positions pass the trained 8K)

--dtype bfloat16 runs the whole model in bf16 (a separate, measured option, not the fast path: on a CPU with AMX
its matmuls are several times faster, these prefills were not: long_prefill_amx.md); its rows carry the dtype and
their fraction is of the bf16 peak.
Rows are appended to the JSON as they finish; a rerun skips rows already there (a long measurement is taken in
parts). Run alone:  .venv/bin/python benchmarks/long_prefill.py [--lengths 8k,16k,32k] [--rows memory,...]
[--dtype float32|bfloat16] [--out benchmarks/results/long_prefill_amx.json]
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time
from pathlib import Path

import torch
from common import RESULTS, atomic_write, cpu_name, load_model, write_json

from infinictx import method_config
from infinictx.core.session import Sampler
from infinictx.tasks.retrieval import parse_lengths, passkey_trial

FOT_LAYERS = [2, 5, 8, 14, 15, 17, 18, 20, 21, 22, 23, 24]   # smollm2-fot's memory layers (CrossBatch, auto)
MEMORY = {"window": 1024, "mem_layers": FOT_LAYERS, "lookup": "topk", "topk": 128}
ROWS = {   # label: (method, settings, longest length it runs at)
    # local keys as cached when read (the FoT paper's reading, and what the passkey results used)
    "memory-fast": ("memory", {**MEMORY, "local_context": "cache"}, None),
    "memory-reference": ("memory", {**MEMORY, "local_context": "cache", "kernel": "reference"}, None),
    # fast, without the bf16 copy of the memory keys that decode lookups read
    "memory-nocopy": ("memory", {**MEMORY, "local_context": "cache", "decode_copy": False}, None),
    # the memory method's default since issue 18: each chunk re-reads its W−Δ local tokens (2x the forward work)
    "memory-reread": ("memory", MEMORY, None),
    # fast: exact; on a CPU with AMX bf16 scores find candidates that fp32 re-scores (fastfp32: fp32 scores only)
    "longcache-fast": ("longcache", {"window": 1024}, None),
    "longcache-fastfp32": ("longcache", {"window": 1024, "kernel": "fast-fp32"}, None),
    "longcache-reference": ("longcache", {"window": 1024, "kernel": "reference"}, None),
    # opt-in, not exact: selection scores in bf16 (AMX) on an fp32 model; the selected blocks can differ
    "longcache-bf16select": ("longcache", {"window": 1024, "select_dtype": "bfloat16"}, None),
    "window": ("window", {"window": 1024}, None),
    "razor": ("razor", {}, None),
    "full": ("full", {}, 8192),
}
DECODE_TOKENS = 16
OUT = RESULTS / "long_prefill.json"


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of an n×n matmul in `dtype` (best of a few)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self):
        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def copy_rescored(session, kind: str = "bf16_copy") -> tuple[int, int]:
    """(keys re-scored in fp32, lookup rows) so far by the memory's key copies of one kind (bf16_copy: decode
    lookups; int8_copy: prefill lookups on a CPU with AMX); (0, 0) without them."""
    copies = [getattr(m, kind, None) for m in getattr(session, "memory", {}).values()]
    return sum(c.rescored for c in copies if c is not None), sum(c.rows for c in copies if c is not None)


def per_row(counts: tuple[int, int]) -> float:
    return counts[1] and round(counts[0] / counts[1], 1)


def measure(lm, label: str, length: int, peak_gflops: float) -> dict:
    method, settings, _ = ROWS[label]
    trial = passkey_trial(lm.tokenizer, length, 0.5, random.Random(f"long-prefill-{length}"))
    with PeakRSS() as rss, method_config(method, **settings).make_session(lm) as session:
        t0 = time.perf_counter()
        for s in range(0, len(trial.ids), session.chunk):
            session.absorb(trial.ids[s:s + session.chunk])
        session.end_prompt()
        # the first answer token closes the prefill: the window method only encodes its W tokens there
        sampler = Sampler(repetition_penalty=1.0, ban_eos=False)
        first = session.generate_chunk(1, min(len(trial.ids), session.window - DECODE_TOKENS), sampler)
        prefill = time.perf_counter() - t0
        flops = sum(session.meter.flops.values()) - session.meter.flops.get("attention", 0)
        t1 = time.perf_counter()
        session.absorb(first)   # generated tokens join the history (stateful sessions processed them already)
        rest = session.generate_chunk(DECODE_TOKENS - 1, min(len(trial.ids) + 1, session.window - DECODE_TOKENS + 1),
                                      sampler)
        decode = time.perf_counter() - t1
        out = torch.cat([first, rest])
        policy = getattr(session, "policy", None)
        rescored = getattr(policy, "bf16_rows", 0) and round(policy.rescored / policy.bf16_rows, 1)
        copies = {"decode_rescored_per_row": per_row(copy_rescored(session, "bf16_copy")),
                  "prefill_rescored_per_row": per_row(copy_rescored(session, "int8_copy"))}
    answer = lm.tokenizer.decode(out.tolist())
    extra = {"rescored_per_row": rescored} if rescored else {}
    extra.update({key: value for key, value in copies.items() if value})
    return {**extra, "label": label, "method": method, "length": length, "prefill_s": round(prefill, 2),
            "tokens_per_s": round(length / prefill, 1),
            "decode_ms_per_token": round(1000 * decode / (DECODE_TOKENS - 1), 1),
            "peak_rss_mib": round(rss.peak / 2**20), "prefill_tflop": round(flops / 1e12, 3),
            "gflops": round(flops / prefill / 1e9, 1),
            "fraction_of_peak": round(flops / prefill / 1e9 / peak_gflops, 3),
            "passkey_ok": trial.answer in answer, "output": answer.strip()[:30]}


def row_dtype(row: dict) -> str:
    return row.get("dtype", "float32")   # rows written before --dtype existed are fp32


def markdown(res: dict) -> str:
    peaks = sorted({r["machine_fp32_gflops"] for r in res["rows"]})
    machine = res["machine"]
    fast_bf16 = machine["bf16_gflops"] > machine["fp32_gflops"]
    bf16_peaks = sorted({r["machine_bf16_gflops"] for r in res["rows"] if row_dtype(r) == "bfloat16"})
    all_bf16 = sorted({r.get("machine_bf16_gflops", machine["bf16_gflops"]) for r in res["rows"]})
    lines = ["# Long prompts: prefill and decode speed, fast vs reference kernels", "",
             f"Machine: {machine.get('cpu', 'CPU not recorded')}, {machine['threads']} threads; fp32 2048² matmul "
             f"{', '.join(f'{p:.0f}' for p in peaks)} GFLOP/s in the runs that wrote these rows (each row's fraction "
             + (f"uses its own run's peak); bf16 {', '.join(f'{p:.0f}' for p in all_bf16)} GFLOP/s (AMX: the bf16 rows "
                "run the whole model in bf16, a separate option, and their fraction is of their run's bf16 peak, "
                f"{', '.join(f'{p:.0f}' for p in bf16_peaks) or '–'} GFLOP/s). " if fast_bf16 else
                f"uses its own run's peak); bf16 {machine['bf16_gflops']:.1f} GFLOP/s (no AMX / AVX-512-BF16 on this "
                "CPU: bf16 paths cannot help here). ")
             + "FLOPs: the cost meter's count (model linears, attention, memory / selection scores). "
             "Passkey: whether this one prompt (needle at mid depth) was answered; the memory rows use the stock "
             "model (same compute as smollm2-fot, which is trained to use its memory; the stock model is not).", "",
             "| method | kernel | dtype | length | prefill s | tokens/s | decode ms/token | peak RSS MiB | TFLOP | "
             "GFLOP/s | of peak | passkey |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(res["rows"], key=lambda r: (r["method"], r["length"], row_dtype(r), r["label"])):
        kernel = r["label"].split("-")[1] if "-" in r["label"] else "–"
        kernel = {"reread": "fast, re-read", "bf16select": "fast, bf16 selection", "nocopy": "fast, no decode copy",
                  "fastfp32": "fast, fp32 scores only"}.get(kernel, kernel)
        dtype = {"float32": "fp32", "bfloat16": "bf16"}[row_dtype(r)]
        lines.append(f"| {r['method']} | {kernel} | {dtype} | {r['length'] // 1024}K | {r['prefill_s']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['decode_ms_per_token']:.0f} | {r['peak_rss_mib']} | "
                     f"{r['prefill_tflop']:.2f} | {r['gflops']:.0f} | {100 * r['fraction_of_peak']:.0f}% | "
                     f"{'yes' if r['passkey_ok'] else 'no'} |")
    speedups = []
    for method in ("memory", "longcache"):
        for n in sorted({r["length"] for r in res["rows"]}):
            fp32 = [r for r in res["rows"] if r["length"] == n and row_dtype(r) == "float32"]
            fast = [r for r in fp32 if r["label"] == f"{method}-fast"]
            ref = [r for r in fp32 if r["label"] == f"{method}-reference"]
            if fast and ref:
                speedups.append(f"{method} {n // 1024}K: {ref[0]['prefill_s'] / fast[0]['prefill_s']:.2f}x")
    lines += [""] + [f"- {note}" for note in res.get("notes", [])]
    if speedups:
        lines += ["", "Prefill speed-up of the fast kernels over the reference path "
                  "(rows from different runs where the notes say so): " + ", ".join(speedups)
                  + "."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="8k,16k,32k")
    ap.add_argument("--rows", default=",".join(ROWS), help="row labels, in the order to run them")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the model's dtype (bfloat16: the whole model in bf16, a separate option)")
    ap.add_argument("--markdown-only", action="store_true")
    ap.add_argument("--out", default=str(OUT), help="results JSON (the Markdown goes beside it)")
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    import json

    res = json.loads(out.read_text()) if out.exists() else {"rows": []}
    if not args.markdown_only:
        bf16 = matmul_peak(torch.bfloat16, n=512, repeats=1)   # emulated bf16 (no AMX) is too slow for 2048²
        if bf16 > 20:   # AMX (emulated bf16 runs at ~1 GFLOP/s; a 512² matmul underrates AMX)
            bf16 = matmul_peak(torch.bfloat16)
        res["machine"] = {"cpu": cpu_name(), "threads": args.threads,
                          "fp32_gflops": round(matmul_peak(torch.float32), 1), "bf16_gflops": round(bf16, 1)}
        print(f"matmul peak: fp32 {res['machine']['fp32_gflops']} GFLOP/s, bf16 {res['machine']['bf16_gflops']}",
              flush=True)
        lm = load_model(None, device="cpu", dtype=args.dtype)
        peak = res["machine"]["bf16_gflops" if args.dtype == "bfloat16" else "fp32_gflops"]
        for n in parse_lengths(args.lengths):
            for label in args.rows.split(","):
                limit = ROWS[label][2]
                if (limit and n > limit) or any(r["label"] == label and r["length"] == n and row_dtype(r) == args.dtype
                                                for r in res["rows"]):
                    continue
                row = measure(lm, label, n, peak)
                row.update(dtype=args.dtype, machine_fp32_gflops=res["machine"]["fp32_gflops"],
                           machine_bf16_gflops=res["machine"]["bf16_gflops"])
                res["rows"].append(row)
                print(row, flush=True)
                write_json(res, out)
                atomic_write(out.with_suffix(".md"), markdown(res))
    atomic_write(out.with_suffix(".md"), markdown(res))


if __name__ == "__main__":
    main()
