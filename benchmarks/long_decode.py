"""Decode speed after a long prompt, methods interleaved in one process: ms per generated token, and each method's
ratio to the window method's, burst by burst.

Why a benchmark of its own: `long_prefill.py` decodes 15 tokens per row, rows minutes apart, and this host's speed
drifts by 20-50% within minutes; a ratio of such numbers says little. Here every session reads the same seeded
passkey prompt first (long_prefill's, needle at mid depth), then the sessions take turns: a burst of `--tokens`
greedy tokens each, `--bursts` rounds, so each burst's ratio to the window's burst of the same round compares
tokens decoded seconds apart. Reported: the median ms/token per method, the median of the per-round ratios with
their range, and for the memory rows the keys re-scored in fp32 per decode lookup row (the bf16 copy's cost).

Rows: the labels of `long_prefill.py` (window, memory-fast, memory-reference, longcache-fast, razor, ...).
Run alone:  .venv/bin/python benchmarks/long_decode.py [--length 32k] [--rows window,memory-fast]
[--bursts 8] [--tokens 8] [--out benchmarks/results/long_decode.json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS, atomic_write, cpu_name, load_model, write_json
from long_prefill import ROWS, copy_rescored, matmul_peak

from infinictx import method_config
from infinictx.core.session import Sampler
from infinictx.tasks.retrieval import parse_lengths, passkey_trial

OUT = RESULTS / "long_decode.json"


def run(lm, labels: list[str], length: int, bursts: int, tokens: int) -> dict:
    trial = passkey_trial(lm.tokenizer, length, 0.5, random.Random(f"long-prefill-{length}"))
    sampler = Sampler(repetition_penalty=1.0, ban_eos=False)
    sessions, prefill = {}, {}
    for label in labels:
        method, settings, _ = ROWS[label]
        session = sessions[label] = method_config(method, **settings).make_session(lm)
        t0 = time.perf_counter()
        for s in range(0, len(trial.ids), session.chunk):
            session.absorb(trial.ids[s:s + session.chunk])
        session.end_prompt()
        # room in the window for every burst: a windowed session's cache is never rebuilt mid-measurement
        first = session.generate_chunk(1, min(len(trial.ids), session.window - bursts * tokens - 1), sampler)
        session.absorb(first)
        prefill[label] = round(time.perf_counter() - t0, 1)
        print(f"{label}: prompt read in {prefill[label]} s", flush=True)
    before = {label: copy_rescored(s) for label, s in sessions.items()}
    ms = {label: [] for label in labels}
    for _ in range(bursts):
        for label, session in sessions.items():
            t0 = time.perf_counter()
            out = session.generate_chunk(tokens, session.window - tokens, sampler)
            ms[label].append(1000 * (time.perf_counter() - t0) / len(out))
            session.absorb(out)
    rows = []
    for label, session in sessions.items():
        row = {"label": label, "method": ROWS[label][0], "prefill_s": prefill[label],
               "ms_per_token": [round(x, 1) for x in ms[label]],
               "median_ms_per_token": round(statistics.median(ms[label]), 1)}
        if "window" in ms and label != "window":
            ratios = [a / b for a, b in zip(ms[label], ms["window"])]
            row.update(ratio_to_window=round(statistics.median(ratios), 2),
                       ratio_range=[round(min(ratios), 2), round(max(ratios), 2)])
        rescored, lookups = (a - b for a, b in zip(copy_rescored(session), before[label]))
        if lookups:
            row["rescored_per_lookup_row"] = round(rescored / lookups, 1)
        rows.append(row)
        session.close()
    return {"length": length, "bursts": bursts, "tokens_per_burst": tokens, "rows": rows}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Decode after a long prompt: methods interleaved in one process", "",
             f"Machine: {m['cpu']}, {m['threads']} threads, fp32 2048² matmul {m['fp32_gflops']:.0f} GFLOP/s at the "
             f"start. Prompt: the seeded passkey prompt of long_prefill.py ({res['length'] // 1024}K tokens); then "
             f"{res['bursts']} rounds of {res['tokens_per_burst']} greedy tokens per method, methods taking turns. "
             "Ratio: the median over rounds of (method ms/token ÷ window ms/token in the same round), with its "
             "range.", "",
             "| method | row | prompt read s | median ms/token | ratio to window | ratio range | keys re-scored per "
             "lookup row |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        rng = r.get("ratio_range")
        lines.append(f"| {r['method']} | {r['label']} | {r['prefill_s']:.1f} | {r['median_ms_per_token']:.1f} | "
                     f"{r.get('ratio_to_window', 1.0):.2f} | {f'{rng[0]:.2f}–{rng[1]:.2f}' if rng else '–'} | "
                     f"{r.get('rescored_per_lookup_row', '–')} |")
    lines += [""] + [f"- {note}" for note in res.get("notes", [])]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", default="32k")
    ap.add_argument("--rows", default="window,memory-fast", help="long_prefill.py row labels")
    ap.add_argument("--bursts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    labels = args.rows.split(",")
    unknown = [x for x in labels if x not in ROWS]
    if unknown:
        raise SystemExit(f"error: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    (length,) = parse_lengths(args.length)
    out = Path(args.out)
    machine = {"cpu": cpu_name(), "threads": args.threads, "fp32_gflops": round(matmul_peak(torch.float32), 1)}
    res = {"machine": machine, **run(load_model(None, device="cpu", dtype="float32"), labels, length, args.bursts,
                                     args.tokens)}
    old = out.exists() and __import__("json").loads(out.read_text())
    if old and old.get("notes"):
        res["notes"] = old["notes"]   # notes are written by hand beside the numbers
    write_json(res, out)
    atomic_write(out.with_suffix(".md"), markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
