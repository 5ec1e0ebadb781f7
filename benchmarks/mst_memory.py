"""Mini-Sequence training (infinictx.training.mst) against standard and checkpointing-only LoRA steps on long sequences.

One training step (forward, backward, AdamW) of a Temp-Lora adapter (r 64, every linear layer but the LM head)
on the first N tokens of the default book, the embedded model in float32, per mode:
  standard       transformers' forward with labels (all logits, every activation kept)
  checkpointing  the same with transformers' gradient checkpointing (non-reentrant)
  mst            infinictx.training.mst: LM head + cross-entropy and MLP over mini-sequences, recomputed in backward,
                 with checkpointing (automatic chunk counts)
  mst-sa         the same with MSTConfig(save_attention=True): the attention kernel's output is kept, not
                 recomputed in backward (one more hidden-size tensor per layer)
Each (mode, length) runs in a fresh process, so its peak RSS (ru_maxrss) is its own; runs go one after another,
with glibc's mmap threshold fixed (--mmap-threshold) so that freed activations really leave the RSS.
A run whose peak, doubled from the previous length of its mode, would pass --max-rss-gib is skipped (recorded
as such). max_grad_diff: the largest absolute difference of any LoRA gradient against the standard step at
that length (against checkpointing where standard was skipped; `reference` says which). The results file is
rewritten after every run and a rerun skips what it holds (delete entries to redo them).

  .venv/bin/python benchmarks/mst_memory.py --seq-lens 2048,4096,8192,16384,32768 --json benchmarks/results/mst_memory.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("standard", "checkpointing", "mst", "mst-sa")
GIB = 2**30


def worker(mode: str, n: int, grads_out: str, threads: int):
    import resource

    import torch
    from common import setup

    from infinictx import TempLora, method_config
    from infinictx.core.attention import base_causal_lm
    from infinictx.training.mst import MSTConfig, causal_lm_loss

    lm, book, _ = setup(threads)
    ids = book.repeat((n + len(book) - 1) // len(book))[:n][None]
    lora = TempLora(lm, method_config("temp-lora", window=n, chunk=n // 2))
    model = lora.model
    if mode == "checkpointing":
        base_causal_lm(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # transformers checkpoints only in train mode; Llama has no dropout, LoRA dropout is 0
    rss_loaded = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t0, cpu0 = time.perf_counter(), time.process_time()
    mst = MSTConfig(save_attention=mode == "mst-sa")
    if mode.startswith("mst"):
        loss = causal_lm_loss(model, ids, mst=mst)
    else:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    torch.nn.utils.clip_grad_norm_(lora.params, 1.0)
    lora.optimizer.step()
    step_s, step_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    torch.save(grads, grads_out)
    config = base_causal_lm(model).config
    head, mlp = mst.head_chunks_for(n - 1, config), mst.mlp_chunks_for(n - 1, config)
    print(json.dumps({"mode": mode, "seq_len": n, "loss": loss.item(), "step_s": round(step_s, 2),
                      "step_cpu_s": round(step_cpu_s, 2),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rss_after_load_bytes": rss_loaded, "threads": torch.get_num_threads(),
                      **({"head_chunks": head, "mlp_chunks": mlp} if mode.startswith("mst") else {})}))


def max_diff(a: str, b: str) -> float:
    import torch

    ga, gb = torch.load(a), torch.load(b)
    return max(float((ga[k] - gb[k]).abs().max()) for k in ga)


def fit(rows: list[dict]):
    """Peak RSS as a + b·N through the two longest runs of a mode (attention is O(N) in memory here)."""
    if len(rows) < 2:
        return None
    r1, r2 = sorted(rows, key=lambda r: r["seq_len"])[-2:]
    b = (r2["peak_rss_bytes"] - r1["peak_rss_bytes"]) / (r2["seq_len"] - r1["seq_len"])
    return r2["peak_rss_bytes"] - b * r2["seq_len"], b


def summary(data: dict) -> dict:
    runs = [r for r in data["runs"] if "peak_rss_bytes" in r]
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in MODES}
    out = {}
    fits = {m: fit(rows) for m, rows in by_mode.items()}
    for m, f in fits.items():
        if f and f[1] > 0:
            out[f"{m}_longest_in_8gib"] = int((8 * GIB - f[0]) / f[1])   # extrapolated from the fit
        fitting = [r["seq_len"] for r in by_mode[m] if r["peak_rss_bytes"] <= 8 * GIB]
        if fitting:
            out[f"{m}_longest_measured_in_8gib"] = max(fitting)
    std = sorted(by_mode["standard"], key=lambda r: r["seq_len"])
    if std and fits["mst"]:
        a, b = fits["mst"]
        top = std[-1]
        same_peak = int((top["peak_rss_bytes"] - a) / b)
        out["mst_tokens_at_standard_peak"] = {"standard_seq_len": top["seq_len"],
                                              "peak_rss_bytes": top["peak_rss_bytes"], "mst_seq_len": same_peak,
                                              "ratio": round(same_peak / top["seq_len"], 2)}
    for mode, key in ((m, k) for m in ("mst", "mst-sa") for k in ("step_s", "step_cpu_s")):
        name = f"{mode.replace('-', '_')}_{'cpu_' if key == 'step_cpu_s' else ''}time_vs_checkpointing"
        ratios = {}
        for r in by_mode[mode]:
            c = next((x for x in by_mode["checkpointing"] if x["seq_len"] == r["seq_len"]), None)
            if c and key in r and key in c:
                ratios[str(r["seq_len"])] = round(r[key] / c[key], 3)
        out[name] = ratios
    return out


def markdown(data: dict) -> str:
    s = data.get("summary", {})
    md = ["# Mini-Sequence training: one LoRA step on N tokens (SmolLM2-135M, fp32, 2-core CPU)", "",
          "| N | mode | peak RSS GiB | step s (runs) | CPU s | ms / token | max grad diff (vs) |",
          "|---|---|---|---|---|---|---|"]
    for r in sorted(data["runs"], key=lambda r: (r["seq_len"], MODES.index(r["mode"]))):
        if "skipped" in r:
            md.append(f"| {r['seq_len']} | {r['mode']} | skipped: {r['skipped']} | | | | |")
            continue
        diff = f"{r['max_grad_diff']:.1e} ({r['reference']})" if "max_grad_diff" in r else "reference"
        times = r.get("step_s_runs", [])
        runs = ", ".join(f"{t:.1f}" for t in times) if len(times) > 1 else ""
        cpu = f"{r['step_cpu_s']:.1f}" if "step_cpu_s" in r else "–"
        md.append(f"| {r['seq_len']} | {r['mode']} | {r['peak_rss_bytes'] / GIB:.2f} | {r['step_s']:.1f}"
                  f"{f' ({runs})' if runs else ''} | {cpu} | {1000 * r['step_s'] / r['seq_len']:.2f} | {diff} |")
    md += ["", "Summary (longest-in-8-GiB values are extrapolated linearly through each mode's two longest runs):", "",
           "```", json.dumps(s, indent=2), "```", "",
           "Commands (rows are kept across runs):", "",
           *(f"    .venv/bin/python benchmarks/mst_memory.py {c}" for c in data.get("commands", []))]
    return "\n".join(md) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="2048,4096,8192,16384")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", default=None, help="results file (default benchmarks/results/mst_memory.json)")
    p.add_argument("--max-rss-gib", type=float, default=20.0, help="skip runs predicted to peak above this")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs per mode and length, in turn; the median step time "
                   "is quoted, the largest peak")
    p.add_argument("--mmap-threshold", type=int, default=262144, help="glibc MALLOC_MMAP_THRESHOLD_ of the runs")
    p.add_argument("--worker", nargs=3, metavar=("MODE", "N", "GRADS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2], args.threads)
        return
    from common import RESULTS, machine

    from infinictx.core.files import atomic_write, write_json

    out = Path(args.json) if args.json else RESULTS / "mst_memory.json"
    data = json.loads(out.read_text()) if out.exists() else {"runs": []}
    # every command that added rows to this file, oldest first
    commands = data.get("commands", []) + ([" ".join(data.pop("argv"))] if "argv" in data else [])
    command = " ".join(sys.argv[1:])
    data["commands"] = [c for c in commands if c != command] + [command]
    lengths = [int(x) for x in args.seq_lens.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= set(MODES):
        raise SystemExit(f"unknown mode in {args.modes!r}; choose from {', '.join(MODES)}")
    from infinictx.data.fetch import cache_dir

    grads_dir = cache_dir() / "bench" / "mst-grads"  # kept, so that a resumed run still compares gradients
    grads_dir.mkdir(parents=True, exist_ok=True)
    # glibc's default malloc raises its mmap threshold as big blocks are freed, then keeps later frees in its
    # heap: RSS then holds a GiB of freed fragments on a 2K-token MST step (2.7 GiB peak against 1.47 with this
    # fixed 256 KiB threshold, for 11% more time). Every mode runs under the same setting.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}

    def save():
        data["machine"] = machine()
        data["summary"] = summary(data)
        write_json(data, out)
        atomic_write(out.with_suffix(".md"), markdown(data))

    def run_once(mode: str, n: int) -> dict:
        proc = subprocess.run([sys.executable, __file__, "--worker", mode, str(n), str(grads_dir / f"{mode}-{n}.pt"),
                               "--threads", str(args.threads)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return {"mode": mode, "seq_len": n, "skipped": f"failed (exit {proc.returncode}): {tail}"}
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        return row

    for n in lengths:
        todo = []
        for mode in modes:
            if any(r["mode"] == mode and r["seq_len"] == n for r in data["runs"]):
                continue
            prev = [r for r in data["runs"] if r["mode"] == mode and r["seq_len"] < n and "peak_rss_bytes" in r]
            last = max(prev, key=lambda r: r["seq_len"]) if prev else None
            predicted = last["peak_rss_bytes"] * n / last["seq_len"] if last else 0
            if predicted > args.max_rss_gib * GIB:
                data["runs"].append({"mode": mode, "seq_len": n, "skipped": f"predicted {predicted / GIB:.0f} GiB "
                                     f"> --max-rss-gib {args.max_rss_gib:g}"})
                print(f"{mode} {n}: skipped (predicted {predicted / GIB:.1f} GiB)", flush=True)
            else:
                todo.append(mode)
        # modes in turn (A B C A B C ...): a drift of the machine's speed hits them alike; the median is quoted
        runs = {m: [] for m in todo}
        for _ in range(args.repeats):
            for mode in todo:
                if not runs[mode] or "skipped" not in runs[mode][-1]:
                    print(f"{mode} {n} ...", flush=True)
                    runs[mode].append(run_once(mode, n))
        for mode in todo:
            if "skipped" in runs[mode][-1]:
                data["runs"].append(runs[mode][-1])
                continue
            times = [r["step_s"] for r in runs[mode]]
            cpu = [r["step_cpu_s"] for r in runs[mode]]
            row = {**runs[mode][0], "step_s": statistics.median(times), "step_s_runs": times,
                   "step_cpu_s": statistics.median(cpu), "step_cpu_s_runs": cpu,
                   "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs[mode])}
            for ref in ("standard", "checkpointing"):
                ref_grads = grads_dir / f"{ref}-{n}.pt"
                if ref != mode and ref_grads.exists():
                    row["max_grad_diff"] = max_diff(str(grads_dir / f"{mode}-{n}.pt"), str(ref_grads))
                    row["reference"] = ref
                    break
            data["runs"].append(row)
        save()
    save()
    print(markdown(data))


if __name__ == "__main__":
    main()
