"""KV-cache policies side by side on the embedded model: passkey accuracy, perplexity, KV bytes, speed; and the
PyPI package kvpress (its own virtualenv, transformers < 5.3) on the very same passkey prompts.

Parts (--parts, comma-separated; each result is saved as soon as it is done, a rerun skips what is there):
  passkey   accuracy against prompt length per policy, KV bytes held after the prompt (--configs, --lengths)
  ppl       streaming perplexity of the first --ppl-tokens tokens of the default book, KV bytes at the end
  ppl-prompt  perplexity of the tokens after a --prompt-tokens prompt (up to --ppl-tokens), scored chunk by
            chunk once the prompt has ended (razor-dense compresses there: the decode-time cache, as in the paper)
  speed     prefill seconds and ms per generated token after a --speed-tokens prompt
  kvpress   kvpress presses (StreamingLLM, SnapKV, Knorm, DuoAttention-style) on the passkey prompts, at the
            compression ratio RazorAttention reached at that length

Configs: full | streaming | longcache (bf16 selection scores) | razor | razor-paper (the paper's 14% + 1% heads, C = 8) |
razor-mean / razor-none (compensation token unweighted / left out) | razor-dense (prompt read with full caches,
compressed when it ends) | ...+tl
(Temp-Lora on top: lr 3e-4, 2 steps, r 64, trained on each chunk with the W−Δ tokens before it).

  .venv/bin/python benchmarks/kv_policies.py --parts passkey --lengths 1k,2k,4k,8k --trials 10 \\
      --configs full,streaming,longcache,razor
  .venv/bin/python benchmarks/kv_policies.py --parts ppl --configs full,streaming,longcache,razor,longcache+tl,razor+tl"""

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, kv_config, machine, setup, venv_python

from infinictx import Sampler, method_config, streaming_perplexity
from infinictx.analysis.heads import retrieval_heads
from infinictx.core.files import atomic_write, write_json
from infinictx.core.models import resolve_model_path
from infinictx.tasks.retrieval import (
    PASSKEY_QUESTION,
    TRIAL_BUILDERS,
    answer_of,
    full_cache_bytes,
    parse_lengths,
    run_retrieval,
    tokens_of,
)

p = argparse.ArgumentParser()
p.add_argument("--parts", default="passkey")
p.add_argument("--configs", default="full,streaming,longcache,razor")
p.add_argument("--lengths", default="1k,2k,4k,8k")
p.add_argument("--trials", type=int, default=10)
p.add_argument("--window", type=int, default=1024, help="attention scope W of streaming and longcache")
p.add_argument("--ppl-tokens", type=int, default=8192)
p.add_argument("--prompt-tokens", type=int, default=4096)
p.add_argument("--speed-tokens", type=int, default=4096)
p.add_argument("--presses", default="streaming_llm,snapkv,knorm,duo")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--name", default="kv_policies")
args = p.parse_args()

path = RESULTS / f"{args.name}.json"
data = json.loads(path.read_text()) if path.exists() else {}
for part in ("passkey", "ppl", "ppl-prompt", "speed", "kvpress"):
    data.setdefault(part, {})
lm, book, book_name = setup()


def config(label: str):
    return kv_config(label, args.window)


def save():
    data["machine"] = machine()
    write_json(data, path)
    atomic_write(path.with_suffix(".md"), markdown())


def mib(x):
    return f"{x / 2**20:.1f}" if x is not None else "–"


def markdown() -> str:
    md = [f"# KV-cache policies on {lm.name} (2-core CPU, fp32)", ""]
    if data["passkey"]:
        lengths = sorted({int(n) for rows in data["passkey"].values() for n in rows})
        md += ["## Passkey accuracy (KV MiB held after the prompt / full cache)", "",
               "| policy | " + " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths) + " |",
               "|---|" + "---|" * len(lengths)]
        for spec, rows in data["passkey"].items():
            cells = []
            for n in lengths:
                r = rows.get(str(n))
                cells.append("" if r is None else f"{r['accuracy']:.0%} ({mib(r.get('kv_bytes'))}/{mib(r['kv_bytes_full'])}, "
                             f"{r['s_per_trial']:.0f} s)")
            md.append(f"| {spec} | " + " | ".join(cells) + " |")
        md += ["", "Cell: accuracy (KV MiB held / full-cache MiB, seconds per trial); trials per cell in the JSON."]
    if data["kvpress"]:
        md += ["", "## kvpress on the same prompts (context compressed before the question, question not compressed)",
               "", "| press | length | ratio | accuracy | KV MiB held |", "|---|---|---|---|---|"]
        for key, r in data["kvpress"].items():
            md.append(f"| {r['press']} | {r['length']} | {r['ratio']:.2f} | {r['accuracy']:.0%} | {mib(r['kv_bytes'])} |")
    if data["ppl"]:
        md += ["", f"## Perplexity, first {args.ppl_tokens} tokens of {book_name}", "",
               "| policy | PPL | vs full | KV MiB at the end | wall s |", "|---|---|---|---|---|"]
        full = data["ppl"].get("full", {}).get("ppl")
        for spec, r in data["ppl"].items():
            rel = f"{r['ppl'] / full - 1:+.2%}" if full else "–"
            md.append(f"| {spec} | {r['ppl']:.3f} | {rel} | {mib(r['kv_bytes'])} | {r['wall_s']:.0f} |")
    if data["ppl-prompt"]:
        md += ["", f"## Perplexity of tokens {args.prompt_tokens}..{args.ppl_tokens} of {book_name}, scored after a "
               f"{args.prompt_tokens}-token prompt", "",
               "| policy | PPL | vs full | KV MiB at the end |", "|---|---|---|---|"]
        full = data["ppl-prompt"].get("full", {}).get("ppl")
        for spec, r in data["ppl-prompt"].items():
            rel = f"{r['ppl'] / full - 1:+.2%}" if full else "–"
            md.append(f"| {spec} | {r['ppl']:.3f} | {rel} | {mib(r['kv_bytes'])} |")
    if data["speed"]:
        md += ["", f"## Speed after a {args.speed_tokens}-token prompt", "",
               "| policy | prefill s | ms / generated token | KV MiB held |", "|---|---|---|---|"]
        for spec, r in data["speed"].items():
            md.append(f"| {spec} | {r['prefill_s']:.1f} | {r['ms_per_token']:.0f} | {mib(r['kv_bytes'])} |")
    md += ["", "Command: `.venv/bin/python benchmarks/kv_policies.py " + " ".join(sys.argv[1:]) + "` (each part "
           "appends to the same JSON)."]
    return "\n".join(md)


def run_passkey():
    for spec in args.configs.split(","):
        rows = data["passkey"].setdefault(spec, {})
        for n in parse_lengths(args.lengths):
            if str(n) in rows and rows[str(n)]["trials"] >= args.trials:
                continue
            cfg = config(spec)
            res = run_retrieval(lambda: cfg.make_session(lm), lm.tokenizer, "passkey", [n], args.trials, seed=args.seed)
            rows[str(n)] = res.results[0] | {"config": res.config}
            print(spec, n, rows[str(n)]["accuracy"], flush=True)
            save()


def run_ppl():
    ids = book[:args.ppl_tokens]
    for spec in args.configs.split(","):
        if spec in data["ppl"]:
            continue
        with config(spec).make_session(lm) as session:
            r = streaming_perplexity(session, ids)
            data["ppl"][spec] = {"ppl": r.summary()["ppl"], "kv_bytes": session.kv_bytes(), "wall_s": r.wall_s,
                                 "tokens": len(ids), "config": session.describe()}
        print(spec, data["ppl"][spec]["ppl"], flush=True)
        save()


def run_ppl_prompt():
    prompt, rest = book[:args.prompt_tokens], book[args.prompt_tokens:args.ppl_tokens]
    for spec in args.configs.split(","):
        if spec in data["ppl-prompt"]:
            continue
        with config(spec).make_session(lm) as session:
            for s in range(0, len(prompt), session.chunk):
                session.absorb(prompt[s:s + session.chunk])
            session.end_prompt()
            nll = torch.cat([session.score_and_absorb(rest[s:s + session.chunk])[0]
                             for s in range(0, len(rest), session.chunk)])
            data["ppl-prompt"][spec] = {"ppl": float(nll.double().mean().exp()), "kv_bytes": session.kv_bytes(),
                                        "prompt_tokens": len(prompt), "scored_tokens": len(nll)}
        print(spec, data["ppl-prompt"][spec]["ppl"], flush=True)
        save()


def run_speed():
    prompt = book[:args.speed_tokens]
    for spec in args.configs.split(","):
        if spec in data["speed"] or "+" in spec:
            continue
        with config(spec).make_session(lm) as session:
            t0 = time.perf_counter()
            session.absorb(prompt)
            prefill = time.perf_counter() - t0
            held = session.kv_bytes()
            session.generate_chunk(2, 0, Sampler())  # warm-up
            n = 32
            t0 = time.perf_counter()
            session.generate_chunk(n, 0, Sampler())
            data["speed"][spec] = {"prefill_s": prefill, "ms_per_token": 1000 * (time.perf_counter() - t0) / n,
                                   "kv_bytes": held, "kv_bytes_full": full_cache_bytes(lm.model, len(prompt), lm.dtype),
                                   "prompt_tokens": len(prompt)}
        print(spec, data["speed"][spec], flush=True)
        save()


def kvpress_python() -> Path:
    return venv_python("venv-kvpress", ["torch==2.13.0", "transformers==5.2.0", "kvpress==0.5.5"])


def run_kvpress():
    """The same seeded prompts as the passkey part; the press sees the context (everything before the question)."""
    question = tokens_of(lm.tokenizer, PASSKEY_QUESTION)
    defaults = method_config("razor")
    heads = retrieval_heads(lm.model, defaults.induction_ratio, defaults.echo_ratio, bos_id=lm.tokenizer.bos_token_id)
    razor = data["passkey"].get("razor", {})
    for n in parse_lengths(args.lengths):
        if str(n) not in razor:
            print(f"kvpress at {n}: run the razor passkey part first (its compression ratio is the target)")
            continue
        ratio = round(1 - razor[str(n)]["kv_bytes"] / razor[str(n)]["kv_bytes_full"], 2)
        presses = [p for p in args.presses.split(",") if f"{p}-{n}" not in data["kvpress"]]
        if not presses:
            continue
        rng = random.Random(f"{args.seed}-passkey-{n}")   # exactly run_retrieval's prompts
        depths = [t / (args.trials - 1) if args.trials > 1 else 0.5 for t in range(args.trials)]
        trials = [TRIAL_BUILDERS["passkey"](lm.tokenizer, n, d, rng) for d in depths]
        for t in trials:
            assert t.ids[-len(question):].tolist() == question
        job = {"model_dir": str(resolve_model_path(None)[0]), "presses": presses, "ratio": ratio,
               "threads": torch.get_num_threads(), "retrieval_heads": {str(k): v for k, v in heads.items()},
               "trials": [{"context": t.ids[:-len(question)].tolist(), "question": question} for t in trials]}
        job_file = RESULTS.parent / f".kvpress-job-{n}.json"
        job_file.write_text(json.dumps(job))
        try:
            proc = subprocess.run([str(kvpress_python()), str(Path(__file__).with_name("kvpress_runner.py")),
                                   str(job_file)], capture_output=True, text=True)
        finally:
            job_file.unlink()
        if proc.returncode:
            raise SystemExit(f"kvpress runner failed:\n{proc.stderr[-3000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        for press, r in out.items():
            answers = [lm.tokenizer.decode(o) for o in r["outputs"]]
            ok = [answer_of(a) == t.answer for a, t in zip(answers, trials)]
            data["kvpress"][f"{press}-{n}"] = {
                "press": press, "length": n, "ratio": ratio, "accuracy": sum(ok) / len(ok), "trials": len(ok),
                "kv_bytes": r["kv_bytes"], "kv_bytes_full": full_cache_bytes(lm.model, n, lm.dtype),
                "s_per_trial": r["s_per_trial"], "per_trial": [{"depth": d, "ok": o, "output": a.strip()[:40]}
                                                               for d, o, a in zip(depths, ok, answers)]}
            print(press, n, ratio, sum(ok) / len(ok), flush=True)
        save()


for part in args.parts.split(","):
    {"passkey": run_passkey, "ppl": run_ppl, "ppl-prompt": run_ppl_prompt, "speed": run_speed,
     "kvpress": run_kvpress}[part]()
print(markdown())
