"""Every method on the same long-document QA prompts (RULER-style facts planted in Paradise Lost: niah, multikey,
multivalue, vartrack; `infinictx/tasks/planted.py`), and the ChatQA 2 retrieval ablation.

Each cell (method × task × length) is one `infinictx passkey --task ...` run in its own process, so its peak RSS
is its own; its JSON (and the partial JSON while it runs) lives under results/long_qa/, and a rerun of this
script skips finished cells and continues unfinished ones from their last trial. The table collects them:
accuracy with its 95% Wilson interval (per item for multivalue and vartrack), seconds per trial, peak RSS,
bytes held (KV cache, memory or index), and for RAG how often the evidence was in the prompt it built.

Parts (--parts):
  table     --methods × --tasks × --lengths (full attention only up to 8K: the model's context)
  ablation  RAG (dense) at one length (--ablation-length): chunk size C ∈ {64, 128, 300, 600} at a fixed
            retrieved-token budget (top-k = 600 / C), top-k ∈ {1, 3, 5, 10} at C = 64, the prompt format
            (ChatQA's or plain) and the chunks' order (document, best first, best last)
  ann       the approximate (HNSW) dense index against the exact one: recall@10 over the default book cut into
            --ann-chunk-token chunks, one query per chunk's first sentence (in this process)

  .venv/bin/python benchmarks/long_qa.py --parts table --trials 10 --trials-for temp-lora=3,longcache@32k=5
  .venv/bin/python benchmarks/long_qa.py --parts ablation --ablation-length 16k

Writes results/long_qa.{json,md} and results/long_qa.png (accuracy against length per method, one panel per
task), with the command of every cell."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from common import RESULTS, measured_on, read_summary, run_cli, save

from infinictx.tasks.report import byte_size, length_label
from infinictx.tasks.retrieval import parse_lengths

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("niah", "multikey", "multivalue", "vartrack")
# label: (model or None for the embedded one, the method's flags); W = 1024 wherever a method has a window
METHODS = {
    "window": (None, ["--method", "window", "-W", "1024"]),
    "full": (None, ["--method", "full"]),
    "streaming": (None, ["--method", "streaming", "-W", "1024"]),
    "longcache": (None, ["--method", "longcache", "-W", "1024"]),
    "razor": (None, ["--method", "razor"]),
    "memory": ("smollm2-fot", ["--method", "memory", "--lookup", "topk", "--topk", "128", "-W", "1024"]),
    "temp-lora": (None, ["--method", "temp-lora", "-W", "1024"]),
    # the cheap variant of economy.md (1 step per chunk, adapters on the top 8 layers, lr 6e-4): ~4x less training
    "temp-lora-1step-top8": (None, ["--method", "temp-lora", "-W", "1024", "--steps", "1", "--lora-layers", "top:8",
                                    "--lr", "6e-4"]),
    "rag-dense": (None, ["--method", "rag", "--retriever", "dense"]),
    "rag-bm25": (None, ["--method", "rag", "--retriever", "bm25"]),
    "rag-hybrid": (None, ["--method", "rag", "--retriever", "hybrid"]),
    # the retrieved chunks best last, next to the question, instead of in document order
    "rag-dense-best-last": (None, ["--method", "rag", "--retriever", "dense", "--order", "best-last"]),
}
FULL_MAX = 8192
ABLATION_BUDGET = 600   # retrieved tokens in the chunk-size sweep (top-k = budget / C)
ABLATION = ([(f"C={c}", ["--chunk-tokens", str(c), "--top-k", str(ABLATION_BUDGET // c),
                         "--budget", str(ABLATION_BUDGET + 2 * (ABLATION_BUDGET // c))]) for c in (64, 128, 300, 600)]
            + [(f"k={k}", ["--chunk-tokens", "64", "--top-k", str(k)]) for k in (1, 3, 5, 10)]
            + [(f"format={f}", ["--prompt-format", f]) for f in ("chatqa", "plain")]
            + [(f"order={o}", ["--order", o]) for o in ("document", "score", "best-last")])


def trials_for(spec: str, default: int):
    """'temp-lora=3,longcache@32k=5' -> a function (method, length) -> trials."""
    rules = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, n = part.partition("=")
        label, _, length = key.partition("@")
        rules[(label, parse_lengths(length)[0] if length else None)] = int(n)

    def pick(method: str, length: int) -> int:
        return rules.get((method, length), rules.get((method, None), default))
    return pick


def flags_for(spec: str) -> dict[str, list[str]]:
    """'temp-lora=--steps 1 --lora-layers top:8; rag-dense=--top-k 8' -> {method: [flags]}."""
    import shlex

    out = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        label, _, flags = part.partition("=")
        if label.strip() not in METHODS:
            sys.exit(f"long_qa: --flags-for names an unknown method {label.strip()!r}")
        out[label.strip()] = shlex.split(flags)
    return out


def run_cell(cells: Path, name: str, model: str | None, flags: list[str], task: str, length: int, trials: int,
             threads: int) -> dict | None:
    """One `infinictx passkey` run (resumed from its partial JSON if it was stopped)."""
    args = ["passkey", "--task", task, "--lengths", str(length), "--trials", str(trials), "--threads", str(threads),
            *flags, *(["--model", model] if model else [])]
    return run_cli(name, args, cells / f"{name}.json")


def cell_row(summary: dict) -> dict:
    r = summary["results"][0]
    return {"accuracy": r["accuracy"], "ci95": r["ci95"], "trials": r["trials"], "correct": r["correct"],
            "items": r.get("items", r["trials"]), "s_per_trial": r["s_per_trial"], "kv_bytes": r.get("kv_bytes"),
            "evidence_shown": r.get("evidence_shown"), "peak_rss_mib": summary.get("peak_rss_mib"),
            "dtype": summary.get("dtype"), "cpu": summary.get("cpu"), "weights": summary.get("weights"),
            "command": summary["command"]}


def refresh(rows: dict, folder: Path):
    """Re-read every cell's files (fields added to the rows since, a sidecar filled in later), keeping each row's
    command and labels."""
    for name, row in rows.items():
        if (folder / f"{name}.json").exists():
            rows[name] = {**row, **cell_row({**read_summary(folder / f"{name}.json"), "command": row["command"]})}


MARKS = "†‡§¶"


def machine_of(row) -> tuple[str, str]:
    return row.get("cpu") or "CPU not recorded", row.get("dtype") or "dtype not recorded"


def machine_marks(rows) -> dict:
    """The most common (CPU, dtype) gets no mark; every other one a mark of its own, shown beside its cells."""
    ranked = [m for m, _ in sorted(Counter(machine_of(r) for r in rows).items(), key=lambda kv: (-kv[1], kv[0]))]
    return {m: ("" if i == 0 else MARKS[(i - 1) % len(MARKS)]) for i, m in enumerate(ranked)}


def cell_name(method: str, task: str, length: int) -> str:
    """A table cell's key in long_qa.json and the stem of its files under results/long_qa/."""
    return f"{method}_{task}_{length}"


def machines_line(rows) -> str:
    """Which CPU and dtype the cells ran on: seconds compare only within one machine."""
    rows = list(rows)
    counts = Counter(machine_of(r) for r in rows)
    marks = machine_marks(rows)
    parts = [f"{cpu}, {dtype} ({counts[cpu, dtype]} cells" + (f", marked {mark})" if mark else ")")
             for (cpu, dtype), mark in marks.items()]
    return measured_on(parts)


def weights_lines(cells: dict, methods: list[str], lengths: list[int]) -> list[str]:
    """A method whose cells ran different weights (a checkpoint rebuilt on another machine, e.g. `smollm2-fot`)
    says which cells ran which: their accuracies then compare only within one checkpoint. The fingerprint is of
    the weights as loaded, so it tells checkpoints apart only between cells loaded in the same dtype."""
    lines = []
    for m in methods:
        by_dtype = {}
        for task in TASKS:
            for n in lengths:
                c = cells.get(cell_name(m, task, n))
                if c and c.get("weights"):
                    by_dtype.setdefault(c.get("dtype"), {}).setdefault(c["weights"], []).append(
                        f"{task} {length_label(n)}")
        for dtype, by_weights in by_dtype.items():
            if len(by_weights) > 1:
                lines.append(f"- {m} ran {len(by_weights)} different checkpoints in {dtype}: " + "; ".join(
                    f"`{w}` for {', '.join(names)}" for w, names in by_weights.items()) + ".")
    return lines


def table_markdown(cells: dict, methods: list[str], lengths: list[int]) -> list[str]:
    lines = []
    marks = machine_marks(cells.values())
    for task in TASKS:
        rows = {m: {n: cells.get(cell_name(m, task, n)) for n in lengths} for m in methods}
        if not any(c for r in rows.values() for c in r.values()):
            continue
        head = " | ".join(length_label(n) for n in lengths)
        lines += [f"### {task}", "", f"| method | {head} | s per trial | peak RSS (MiB) | bytes held |",
                  "|---|" + "---|" * (len(lengths) + 3)]
        for m, by_length in rows.items():
            acc = []
            for n in lengths:
                c = by_length[n]
                acc.append("–" if c is None else f"{100 * c['accuracy']:.0f}%{marks[machine_of(c)]} "
                           f"({100 * c['ci95'][0]:.0f}–"
                           f"{100 * c['ci95'][1]:.0f}, n={c['trials']})" +
                           (f", evidence {100 * c['evidence_shown']:.0f}%" if c["evidence_shown"] is not None
                            else ""))
            done = [by_length[n] for n in lengths if by_length[n]]
            speed = " / ".join(f"{c['s_per_trial']:.0f}{marks[machine_of(c)]}" for c in done) or "–"
            rss = " / ".join(f"{c['peak_rss_mib']:.0f}" for c in done if c["peak_rss_mib"]) or "–"
            held = " / ".join(byte_size(c["kv_bytes"]) for c in done if c["kv_bytes"]) or "–"
            lines.append(f"| {m} | " + " | ".join(acc) + f" | {speed} | {rss} | {held} |")
        lines.append("")
    return lines


def plot(cells: dict, methods: list[str], lengths: list[int], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.6), sharey=True)
    for ax, task in zip(axes, TASKS):
        for m in methods:
            pts = [(n, cells[cell_name(m, task, n)]["accuracy"]) for n in lengths if cells.get(cell_name(m, task, n))]
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [length_label(n) for n in lengths])
        ax.set_title(task)
        ax.set_xlabel("prompt tokens")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ann_recall(chunk_tokens: int, queries: int, k: int = 10) -> dict:
    """Recall@k of the HNSW index against exact search on the book's chunks (the same embeddings)."""
    import random

    from infinictx import load_model, read_text
    from infinictx.methods.rag.chunks import chunk_spans
    from infinictx.methods.rag.retrievers import DenseRetriever

    lm = load_model(None)
    text, _ = read_text(None)
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    texts = [lm.tokenizer.decode(ids[a:b]) for a, b in chunk_spans(len(ids), chunk_tokens, 0)]
    t0 = time.perf_counter()
    exact = DenseRetriever(None, "cpu", ann_min=10**9)
    exact.sync(texts)
    embed_s = time.perf_counter() - t0
    approx = DenseRetriever(None, "cpu", ann_min=0)
    approx.load(exact.state())
    rng = random.Random(0)
    picks = rng.sample(range(len(texts)), min(queries, len(texts)))
    asked = [texts[i].strip().split(".")[0][:200] or texts[i][:200] for i in picks]
    hits, times = 0, {"exact": 0.0, "hnsw": 0.0}
    exact.rank(asked[0], k), approx.rank(asked[0], k)   # the indexes are built at the first search: not timed
    t0 = time.perf_counter()
    for q in asked:   # each rank() embeds its query first: timed apart, so that the search's own time shows
        exact._embed([q])
    embed_query_s = time.perf_counter() - t0
    for q in asked:
        t0 = time.perf_counter()
        want = set(exact.rank(q, k))
        times["exact"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        got = set(approx.rank(q, k))
        times["hnsw"] += time.perf_counter() - t0
        hits += len(want & got)
    recall = hits / (k * len(asked))
    return {"chunks": len(texts), "pieces": int(len(exact.emb)), "chunk_tokens": chunk_tokens, "queries": len(asked),
            "k": k, "recall": round(recall, 4), "embed_s": round(embed_s, 1),
            "ms_per_query": {m: round(1000 * t / len(asked), 2) for m, t in times.items()},
            "search_ms_per_query": {m: round(1000 * max(0.0, t - embed_query_s) / len(asked), 3)
                                    for m, t in times.items()},
            "embed_ms_per_query": round(1000 * embed_query_s / len(asked), 2),
            "index_bytes": {"exact": exact.nbytes(), "hnsw": approx.nbytes()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="table")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--lengths", default="4k,16k,32k")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--flags-for", default="", help="extra flags of a method, e.g. 'temp-lora=--steps 1 "
                    "--lora-layers top:8' (methods separated by ';'); recorded in each cell's command, not its "
                    "name: change --name with them")
    ap.add_argument("--trials-for", default="", help="fewer trials where a method is slow: temp-lora=3,"
                    "longcache@32k=5")
    ap.add_argument("--ablation-length", default="16k")
    ap.add_argument("--ann-chunk-tokens", type=int, default=32)
    ap.add_argument("--ann-queries", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="long_qa", help="results/<name>.{json,md,png}, cells under results/<name>/")
    a = ap.parse_args()
    methods, tasks, lengths = a.methods.split(","), a.tasks.split(","), parse_lengths(a.lengths)
    unknown = [m for m in methods if m not in METHODS] + [t for t in tasks if t not in TASKS]
    if unknown:
        sys.exit(f"long_qa: unknown method or task {', '.join(unknown)}")
    pick = trials_for(a.trials_for, a.trials)
    extra = flags_for(a.flags_for)
    parts = a.parts.split(",")
    path = RESULTS / f"{a.name}.json"
    folder = RESULTS / a.name
    data = json.loads(path.read_text()) if path.exists() else {}
    cells, ablation, ann = data.get("cells", {}), data.get("ablation", {}), data.get("ann")
    if "table" in parts:
        for m in methods:
            model, flags = METHODS[m]
            flags = [*flags, *extra.get(m, [])]
            for task in tasks:
                for n in lengths:
                    if m == "full" and n > FULL_MAX:
                        continue
                    name = cell_name(m, task, n)
                    summary = run_cell(folder, name, model, flags, task, n, pick(m, n), a.threads)
                    if summary:
                        cells[name] = cell_row(summary)
    if "ablation" in parts:
        n = parse_lengths(a.ablation_length)[0]
        for label, extra in ABLATION:
            for task in tasks:
                name = cell_name(f"rag-{label}", task, n)
                summary = run_cell(folder, name, None, [*METHODS["rag-dense"][1], *extra], task, n, a.trials,
                                   a.threads)
                if summary:
                    ablation[name] = {**cell_row(summary), "setting": label, "task": task, "length": n}
    if "ann" in parts:
        ann = ann_recall(a.ann_chunk_tokens, a.ann_queries)
    refresh(cells, folder)
    refresh(ablation, folder)
    all_lengths = sorted({int(k.rsplit("_", 1)[1]) for k in cells})
    shown = [m for m in METHODS if any(k.startswith(f"{m}_") for k in cells)]
    md = ["## Long-document QA: every method on the same prompts", "",
          "RULER-style facts planted in *Paradise Lost* (tasks/planted.py); SmolLM2-135M-Instruct (memory: "
          "`smollm2-fot`); W = 1024 for every method with a window; accuracy (95% Wilson interval, trials n; per "
          "item for multivalue and vartrack); for RAG, how often the evidence was in its prompt. s per trial, "
          "peak RSS and bytes held per length, left to right. Full attention only up to 8K (the model's context).",
          "", machines_line(cells.values()), ""]
    mixed = weights_lines(cells, shown, all_lengths)
    if mixed:
        md += ["Weights (fingerprints as loaded) differ between cells of one method and dtype:", "", *mixed, ""]
    md += table_markdown(cells, shown, all_lengths)
    if ablation:
        md += ["### RAG ablation (dense, ChatQA 2 §): chunk size at a fixed budget, top-k at C = 64", "",
               machines_line(ablation.values()) + " Evidence: the whole planted sentence inside one retrieved "
               "chunk, so with small chunks a sentence cut by a chunk boundary counts as not shown even where the "
               "chunk holding its number was.", "",
               "| setting | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
        for label, _ in ABLATION:
            row = []
            for task in TASKS:
                c = next((v for v in ablation.values() if v["setting"] == label and v["task"] == task), None)
                row.append("–" if c is None else f"{100 * c['accuracy']:.0f}% (evidence "
                           f"{100 * (c['evidence_shown'] or 0):.0f}%, {c['s_per_trial']:.0f} s)")
            md.append(f"| {label} | " + " | ".join(row) + " |")
        md.append("")
    if ann:
        md += [f"### Approximate dense index: HNSW recall@{ann['k']} = {100 * ann['recall']:.1f}% against exact search "
               f"({ann['chunks']:,} chunks of {ann['chunk_tokens']} tokens of the book, {ann['queries']} queries; "
               f"{ann['ms_per_query']['hnsw']} ms per query against {ann['ms_per_query']['exact']} exact" +
               (f", of which the query's embedding {ann['embed_ms_per_query']} ms, the search "
                f"{ann['search_ms_per_query']['hnsw']} against {ann['search_ms_per_query']['exact']} ms"
                if "embed_ms_per_query" in ann else "") + "; "
               f"embedding the book: {ann['embed_s']} s)", ""]
    if cells:
        plot(cells, shown, all_lengths, RESULTS / f"{a.name}.png")
        md += [f"![accuracy against length]({a.name}.png)", ""]
    save(a.name, {"cells": cells, "ablation": ablation, "ann": ann}, "\n".join(md))


if __name__ == "__main__":
    main()
