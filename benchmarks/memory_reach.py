"""Perplexity vs reachable past (issue 18; FoT's "more memory, lower perplexity" curve): the memory method with its
memory capped at 2K, 8K, 32K tokens of the past (the oldest leaving first), the plain window beside it (= the
memory capped at 0: tested equal), on the same chunks of held-out books, one model at a time. Every row reads
with W=1024, Δ=512; the memory method re-reads each chunk's W−Δ local tokens (`local_context="reread"`, the
default) unless the row says `cache`; memory lookups dense (every entry) or, for `top128` rows, each query's 128 best
entries (the paper's kNN). Short-context quality: perplexity of each book's first 1K tokens (one
forward) for the model and the base SmolLM2.

Cells (model, book, row) are written to results/<name>.partial.json as they finish; a rerun continues.

  .venv/bin/python benchmarks/memory_reach.py [--models smollm2-fot] [--books paradise,alice] [--tokens 32768]"""

import argparse
import json
import time

import torch
from common import RESULTS, save

from infinictx import MemoryConfig, WindowConfig, load_model, read_text, streaming_perplexity
from infinictx.core.files import write_json
from infinictx.core.models import cpu_name
from infinictx.data.texts import strip_gutenberg, training_corpus
from infinictx.tasks.perplexity import perplexity

W, D = 1024, 512
TOPK = 128
ROWS = {   # label: memory cap in tokens, local context, lookup[, memory_share_tokens]; "window": the window method
    "window": None,
    "memory-2k": (2048, "reread", "dense"),
    "memory-8k": (8192, "reread", "dense"),
    "memory-32k": (32768, "reread", "dense"),
    "memory-32k-cache": (32768, "cache", "dense"),   # the local window as cached keys: what the method did before
    # the paper's kNN lookup: each query attends to its 128 best memory entries, not to all of them
    "memory-2k-top128": (2048, "reread", "topk"),
    "memory-8k-top128": (8192, "reread", "topk"),
    "memory-32k-top128": (32768, "reread", "topk"),
    # the fixed gate: beyond N entries, memory scores get −log(M/N) (the memory's softmax share stops growing)
    "memory-8k-share2k": (8192, "reread", "dense", 2048),
    "memory-32k-share2k": (32768, "reread", "dense", 2048),
    "memory-32k-share8k": (32768, "reread", "dense", 8192),
}


def book_text(name: str) -> tuple[str, str]:
    if name == "paradise":
        return read_text(None)
    corpus = dict(training_corpus())
    key = {"alice": "canterbury/alice29"}.get(name, name)
    if key not in corpus:
        raise SystemExit(f"unknown book {name!r}: paradise, alice or a corpus name")
    return strip_gutenberg(corpus[key]), key


def run_cell(lm, ids, row: str) -> dict:
    if row == "window":
        cfg = WindowConfig(window=W, chunk=D)
    else:
        cap, local, lookup, *share = ROWS[row]
        cfg = MemoryConfig(window=W, chunk=D, memory_tokens=cap, local_context=local, lookup=lookup, topk=TOPK,
                           memory_share_tokens=share[0] if share else 0)   # 0: off, whatever the checkpoint says
    t0 = time.perf_counter()
    held = 0
    with cfg.make_session(lm) as s:
        r = streaming_perplexity(s, ids, progress=True)
        if row != "window":
            held = s.kv_bytes()
    return {"ppl": perplexity(r.nll), "buckets": r.buckets(8192), "wall_s": round(time.perf_counter() - t0, 1),
            "dtype": str(lm.dtype).removeprefix("torch."), "cpu": cpu_name(),
            "kv_bytes_end": held}


@torch.no_grad()
def first_k_ppl(lm, ids, k: int = 1024) -> float:
    x = ids[:k].to(lm.device)[None]
    logits = lm.model(x).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, x[0, 1:]).exp())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-fot", help="comma-separated model names or paths")
    p.add_argument("--books", default="paradise,alice")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="memory_reach")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = args.rows.split(",")
    if set(rows) - set(ROWS):
        raise SystemExit(f"unknown rows {sorted(set(rows) - set(ROWS))}; choose from {', '.join(ROWS)}")
    partial = RESULTS / f"{args.name}.partial.json"
    state = json.loads(partial.read_text()) if partial.exists() else {"cells": {}, "first_1k": {}}
    base = None
    for model in args.models.split(","):
        lm = load_model(model)
        for book in args.books.split(","):
            text, title = book_text(book)
            ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][:args.tokens]
            if len(ids) < args.tokens:
                print(f"{title}: only {len(ids)} tokens")
            key = f"{lm.name}|{title}"
            if key not in state["first_1k"]:
                base = base or load_model(None)
                state["first_1k"][key] = {"model": first_k_ppl(lm, ids), "base": first_k_ppl(base, ids)}
                write_json(state, partial)
            for row in rows:
                cell = f"{key}|{row}"
                if cell not in state["cells"]:
                    print(f"[{time.strftime('%H:%M:%S')}] {cell}", flush=True)
                    state["cells"][cell] = {"tokens": len(ids), **run_cell(lm, ids, row)}
                    write_json(state, partial)
    save(args.name, {"window": W, "chunk": D, **state}, markdown(state, args))


def markdown(state: dict, args) -> str:
    md = ["## Perplexity vs reachable past: the memory method, its memory capped (W=1024, Δ=512)", "",
          "Rows: the plain window (= memory capped at 0 tokens, tested equal); the memory method with the newest "
          "2K / 8K / 32K tokens of the past in memory, each chunk's local context re-read (the default), every "
          "query attending to all memory entries (dense) or to its 128 best (top128, the paper's kNN lookup); "
          "`-cache`: the local context as cached keys (the method's behaviour before issue 18); `shareN`: the fixed "
          "gate, memory scores −log(M/N) beyond N entries (`--memory-share-tokens N`). Ratio: to the window.",
          ""]
    keys = sorted({c.rsplit("|", 1)[0] for c in state["cells"]})
    for key in keys:
        model, title = key.split("|")
        cells = {c.rsplit("|", 1)[1]: v for c, v in state["cells"].items() if c.startswith(key + "|")}
        win, any_cell = cells.get("window"), next(iter(cells.values()))
        first = state["first_1k"].get(key)
        short = (f"First 1K tokens in one forward: PPL {first['model']:.2f} (base SmolLM2 {first['base']:.2f}, "
                 f"{100 * (first['model'] / first['base'] - 1):+.1f}%)." if first else "")
        spans = [f"{b['start'] // 1024}K–{b['end'] // 1024}K" for b in any_cell["buckets"]]
        where = (f"Frozen weights in {any_cell['dtype']} on {any_cell['cpu']}." if "cpu" in any_cell
                 else "(Dtype and CPU not recorded in these cells.)")
        md += [f"### {model} on {title} ({any_cell['tokens']} tokens)", "", short, where, "",
               "| row | PPL | ratio to window | " + " | ".join(spans) + " | wall s | KV held at end (MiB) |",
               "|---|---|---|" + "---|" * len(spans) + "---|---|"]
        for row in ROWS:
            if row in cells:
                c = cells[row]
                ratio = f"{c['ppl'] / win['ppl']:.3f}" if win else "–"
                md.append(f"| {row} | {c['ppl']:.2f} | {ratio} | " + " | ".join(f"{b['ppl']:.1f}" for b in c["buckets"])
                          + f" | {c['wall_s']:.0f} | {c['kv_bytes_end'] / 2**20:.1f} |")
        md.append("")
    md.append(f"Command: `.venv/bin/python benchmarks/memory_reach.py --models {args.models} --books {args.books} "
              f"--rows {args.rows} --tokens {args.tokens} --name {args.name}`")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
