"""`infinictx ngram-index` and `infinictx trace`: index a corpus with the model's tokenizer, then trace a task's
outputs back to it (Gen-vs-Mem; `infinictx.analysis.ngrams`).

  infinictx ngram-index CORPUS --out DIR [--model M] [--engine auto|infini-gram|numpy]
  infinictx trace TASK.jsonl --index DIR [--model M] [--window 64] [--ns 1,2,3] [--gamma 0.7] --json OUT.json"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..core.errors import InfinictxError


def add_parsers(sub):
    p = sub.add_parser("ngram-index", help="index a corpus's n-grams with the model's tokenizer (for `trace`)")
    p.add_argument("corpus", help="a .txt file, a folder of .txt files, or a .jsonl/.parquet with a text column")
    p.add_argument("--out", required=True, help="the index folder to create")
    p.add_argument("--model", default=None, help="whose tokenizer (default: the embedded model)")
    p.add_argument("--engine", default="auto", choices=["auto", "infini-gram", "numpy"])
    p.add_argument("--debug", action="store_true")
    t = sub.add_parser("trace", help="correlate a model's output probabilities with corpus n-gram statistics")
    t.add_argument("task", help="JSONL: one {\"input\": ..., \"output\": ...} per line")
    t.add_argument("--index", required=True, help="a folder made by `infinictx ngram-index`")
    t.add_argument("--model", default=None)
    t.add_argument("--engine", default="auto", choices=["auto", "infini-gram", "numpy"])
    t.add_argument("--window", type=int, default=64, help="co-occurrence: within this many tokens (64)")
    t.add_argument("--ns", default="1,2,3", help="n-gram sizes (1,2,3)")
    t.add_argument("--gamma", default="0.7", help="cosine threshold of the semantic filter, or none (0.7)")
    t.add_argument("--template", default="{input}", help="what the model reads before the output ({input})")
    t.add_argument("--no-infgram", action="store_true", help="skip the ∞-gram baseline")
    t.add_argument("--max-examples", type=int, default=None)
    t.add_argument("--json", dest="out_json", default=None, metavar="OUT.json")
    t.add_argument("--plot", dest="out_plot", default=None, metavar="OUT.png")
    t.add_argument("--device", default="auto")
    t.add_argument("--debug", action="store_true")


def _tokenizer(model):
    from transformers import AutoTokenizer

    from ..core.models import resolve_model_path

    directory, _ = resolve_model_path(model)
    return AutoTokenizer.from_pretrained(str(directory))


def cmd_ngram_index(args) -> int:
    from tqdm import tqdm

    from ..analysis.ngrams.corpus import build_index
    from ..data.texts import read_books

    path = Path(args.corpus).expanduser()
    if path.is_file() and path.suffix not in (".jsonl", ".parquet"):
        from ..data.texts import read_text

        texts = [read_text(path)[::-1]]   # (name, text)
    else:
        texts = read_books(path, "all")
    tokenizer = _tokenizer(args.model)
    with tqdm(unit="tok", unit_scale=True, desc="tokenizing", file=sys.stderr) as bar:
        out = build_index(texts, tokenizer, args.out, args.engine, progress=bar.update)
    print(json.dumps(out, indent=2))
    return 0


def read_task(path: str, limit: int | None) -> list[tuple[str, str]]:
    from ..data.texts import jsonl_rows

    rows = []
    for line, obj in jsonl_rows(Path(path)):
        if not isinstance(obj.get("input"), str) or not isinstance(obj.get("output"), str):
            raise InfinictxError(f"{path}:{line}: a row needs string fields \"input\" and \"output\"")
        rows.append((obj["input"], obj["output"]))
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise InfinictxError(f"{path} has no examples")
    return rows


def cmd_trace(args) -> int:
    from tqdm import tqdm

    from ..analysis.ngrams.corpus import tokenizer_name
    from ..analysis.ngrams.index import open_index
    from ..analysis.ngrams.taskgram import PairMiner
    from ..analysis.ngrams.trace import trace
    from ..core.files import write_json
    from ..core.models import load_model

    try:
        ns = tuple(int(n) for n in args.ns.split(","))
    except ValueError:
        raise InfinictxError(f"--ns takes sizes like 1,2,3 (got {args.ns!r})")
    gamma = None if args.gamma.lower() == "none" else float(args.gamma)
    examples = read_task(args.task, args.max_examples)
    index = open_index(args.index, args.engine)
    lm = load_model(args.model, device=args.device)
    if index.info.tokenizer != tokenizer_name(lm.tokenizer):
        raise InfinictxError(f"the index was built with another tokenizer ({index.info.tokenizer}); index the corpus "
                             f"with this model's")
    embedder = None
    if gamma is not None:
        from ..methods.rag.retrievers import load_embedder

        embedder = load_embedder(None, "cpu")
    miner = PairMiner(ns=ns, gamma=gamma, embedder=embedder)
    with tqdm(total=len(examples), unit="ex", desc="tracing", file=sys.stderr) as bar:
        result = trace(lm, index, examples, miner, args.window, args.template, infgram=not args.no_infgram,
                       progress=bar.update)
    result["settings"] = {"task": args.task, "index": args.index, "engine": type(index).__name__, "model": lm.name,
                          "window": args.window, "ns": ns, "gamma": gamma, "template": args.template,
                          "examples": len(examples)}
    print(report(result))
    if args.out_json:
        write_json(result, args.out_json)
    if args.out_plot:
        plot(result, args.out_plot)
    return 0


def report(result: dict) -> str:
    lines = ["| pairs | n | x seen | co-occurring | ρ task-gram~LLM (p) | τ (p) | ρ ∞-gram~LLM |",
             "|---|---|---|---|---|---|---|"]
    for name, b in result["summary"].items():
        c, inf = b["taskgram_vs_llm"], b.get("infgram_vs_llm", {})
        rho = f"{c['spearman']:+.3f} ({c['spearman_p']:.2g})" if c["spearman"] is not None else "–"
        tau = f"{c['kendall_tau']:+.3f} ({c['kendall_p']:.2g})" if c["kendall_tau"] is not None else "–"
        irho = f"{inf['spearman']:+.3f}" if inf.get("spearman") is not None else "–"
        lines.append(f"| {name} | {b['pairs']} | {b['x_seen']} | {b['cooccurring']} | {rho} | {tau} | {irho} |")
    return "\n".join(lines)


def plot(result: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..tasks.report import save_figure

    rows = [r for r in result["pairs"] if r["p_taskgram"]]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([r["p_taskgram"] for r in rows], [r["llm_logprob"] for r in rows], s=6, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("task-gram P(y-gram | x-gram)")
    ax.set_ylabel("model log P(y-gram)")
    c = result["summary"]["all"]["taskgram_vs_llm_cooccurring"]
    if c["spearman"] is not None:
        ax.set_title(f"Spearman ρ = {c['spearman']:+.3f} (p = {c['spearman_p']:.2g}, n = {c['n']})")
    save_figure(fig, path)
