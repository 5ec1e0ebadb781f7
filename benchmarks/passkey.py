"""Passkey (or key-value) retrieval against prompt length, several methods in one run, same prompts (seeded).

Methods (pick with --configs, comma-separated):
  window              the last W tokens only (the baseline: near 0 beyond W)
  mem-first-dense     FoT memory, training-free, memory keys as if first, every entry
  mem-first-topk      same, top-k lookup (k=128)
  mem-distance-topk   memory keys at distance W (InfLLM's placement), top-k
  fot-first-topk      the CrossBatch fine-tuned model (`--model smollm2-fot`), top-k
  fot-first-dense     the same, dense
  ...-spread / -auto:N  a 4th part picks the memory layers (default: the checkpoint's, else auto = retrieval layers)

Results are saved after every (config, length), and a rerun skips what is done (delete the JSON to start over).

  .venv/bin/python benchmarks/passkey.py --lengths 1k,2k,4k,8k,16k,32k,64k --trials 20 --window 1024 \
      --configs window,mem-first-topk,mem-distance-topk,fot-first-topk [--task passkey] [--name passkey]"""

import argparse
import json
import time

from common import RESULTS, save, setup

from infinictx import load_model, method_config
from infinictx.methods.memory import parse_mem_layers
from infinictx.tasks.report import plot_accuracy
from infinictx.tasks.retrieval import parse_lengths, run_retrieval

p = argparse.ArgumentParser()
p.add_argument("--lengths", default="1k,2k,4k,8k")
p.add_argument("--trials", type=int, default=20)
p.add_argument("--window", type=int, default=1024)
p.add_argument("--task", default="passkey", choices=["passkey", "kv"])
p.add_argument("--configs", default="window,mem-first-dense,mem-first-topk,mem-distance-topk")
p.add_argument("--topk", type=int, default=128)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--name", default=None, help="results file name (default: <task>)")
args = p.parse_args()

name = args.name or args.task
path = RESULTS / f"{name}.json"
done = json.loads(path.read_text()) if path.exists() else {"runs": {}}
runs = done["runs"]
lengths = parse_lengths(args.lengths)
lm, _, _ = setup()
models = {"mem": lm}


def config(label: str):
    """The model and method a label names: "window", or "<mem|fot>-<positionals>-<lookup>[-<memory layers>]"
    (fot = the CrossBatch fine-tuned model `smollm2-fot`)."""
    if label == "window":
        return lm, method_config("window", window=args.window, chunk=args.window // 2)
    family, positionals, lookup, *layers = label.split("-")
    if family == "fot" and "fot" not in models:
        models["fot"] = load_model("smollm2-fot")
    return models[family], method_config("memory", window=args.window, chunk=args.window // 2,
                                         positionals=positionals, lookup=lookup, topk=args.topk,
                                         mem_layers=parse_mem_layers(layers[0]) if layers else None)


for spec in args.configs.split(","):
    model, cfg = config(spec)
    run = runs.setdefault(spec, {"label": spec, "results": []})
    for length in lengths:
        if any(r["length"] == length and r["trials"] == args.trials for r in run["results"]):
            continue
        t0 = time.perf_counter()
        res = run_retrieval(lambda: cfg.make_session(model), model.tokenizer, args.task, [length], args.trials,
                            seed=args.seed, progress=True)
        run.update({"method": res.method, "config": res.config, "task": args.task, "model": model.name})
        run["results"] = sorted([r for r in run["results"] if r["length"] != length] + res.results,
                                key=lambda r: r["length"])
        print(f"{spec} {length}: {res.results[0]['accuracy']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        save(name, {"task": args.task, "window": args.window, "trials": args.trials, "seed": args.seed, "runs": runs},
             "")

all_lengths = sorted({r["length"] for run in runs.values() for r in run["results"]})
lab = lambda n: f"{n // 1024}K" if n % 1024 == 0 else str(n)  # noqa: E731
md = [f"## {args.task} retrieval accuracy, W={args.window}, {args.trials} trials per length (needle depths spread "
      "evenly), seeded", "", "| method | " + " | ".join(lab(n) for n in all_lengths) + " |",
      "|---|" + "---|" * len(all_lengths)]
for spec, run in runs.items():
    acc = {r["length"]: f"{100 * r['accuracy']:.0f}%" for r in run["results"]}
    md.append(f"| {spec} | " + " | ".join(acc.get(n, "–") for n in all_lengths) + " |")
md += ["", "Seconds per trial:", "", "| method | " + " | ".join(lab(n) for n in all_lengths) + " |",
       "|---|" + "---|" * len(all_lengths)]
for spec, run in runs.items():
    sec = {r["length"]: f"{r['s_per_trial']:.0f}" for r in run["results"]}
    md.append(f"| {spec} | " + " | ".join(sec.get(n, "–") for n in all_lengths) + " |")
md += ["", f"Command: `.venv/bin/python benchmarks/passkey.py --lengths {args.lengths} --trials {args.trials} "
       f"--window {args.window} --configs {args.configs} --task {args.task} --name {name}` (rows of earlier runs kept "
       "in the JSON come from their own commands)"]
save(name, {"task": args.task, "window": args.window, "trials": args.trials, "seed": args.seed, "runs": runs},
     "\n".join(md) + "\n")
plot_accuracy([{**run, "task": args.task} for run in runs.values() if run.get("results")], RESULTS / f"{name}.png",
              title=f"{args.task}: {lm.name}, W={args.window}")
print("\n".join(md))
