"""Gen-vs-Mem, controlled (issue 21): two small Llamas pretrained from scratch on a corpus we fully index, with
facts planted at log-spaced frequencies and arithmetic whose test problems never appear; then the task-gram
language model of the corpus against each model's own probabilities, for factual QA and for arithmetic.

Parts (each cached under the work folder; a rerun continues with the missing ones):
  corpus      the project's public-domain training corpus (Shakespeare, Milton, Canterbury) + planted sentences;
              a byte-level BPE tokenizer trained on it
  models      the small (~5M parameters) and the larger (~23M) model, pretrained one epoch (resumable)
  index       the corpus indexed with the models' tokenizer (infini-gram)
  trace       both tasks traced for both models: Spearman / Kendall of task-gram vs model probability, the
              ∞-gram baseline, and the models' greedy accuracy per exposure level
  throughput  an index of >= 50M tokens (Python sources of the installed packages + the books, SmolLM2's
              tokenizer): tokens/s to build, ms per count and per co-occurrence query, peak memory

  .venv/bin/python benchmarks/gen_vs_mem.py [--parts corpus,models,index,trace,throughput] [--threads 2]"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, save

from infinictx.data.fetch import cache_dir

WORK = cache_dir() / "gen_vs_mem"
SMOKE = False   # --smoke: the whole pipeline on a sliver of everything (results not written under results/)
MODELS = {   # name: PretrainConfig settings
    "small": dict(hidden=256, layers=4, heads=4, intermediate=688, context=256, batch=16, lr=3e-3),
    "large": dict(hidden=512, layers=6, heads=8, intermediate=1376, context=256, batch=16, lr=1.5e-3),
}
TEMPLATE = "Question: {input}\nAnswer:"


def part_corpus() -> dict:
    from infinictx.analysis.ngrams.planted import build
    from infinictx.data.texts import training_corpus
    from infinictx.training.pretrain import train_tokenizer

    out = WORK / "corpus.json"
    if out.exists():
        return json.loads(out.read_text())["record"]
    books = training_corpus()
    if SMOKE:
        books = [(name, text[:40_000]) for name, text in books[:2]]
    planted = build(books, facts_per_level=1 if SMOKE else 8, levels=[1, 10, 30] if SMOKE else None, seed=0)
    tok = train_tokenizer([t for _, t in planted.documents], vocab_size=1000 if SMOKE else 8192)
    tok.save_pretrained(WORK / "tokenizer")
    record = {"documents": len(planted.documents), "characters": sum(len(t) for _, t in planted.documents),
              "facts": len(planted.facts), "exposure_levels": sorted({f["exposures"] for f in planted.facts}),
              "arithmetic_test_problems": len(planted.arithmetic), "vocab_size": len(tok)}
    WORK.mkdir(parents=True, exist_ok=True)
    for name, rows in (("qa", planted.qa), ("arithmetic", planted.arithmetic)):
        (WORK / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out.write_text(json.dumps({"record": record, "documents": planted.documents}))
    return record


def corpus_documents() -> list[tuple[str, str]]:
    return [tuple(d) for d in json.loads((WORK / "corpus.json").read_text())["documents"]]


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(WORK / "tokenizer"))


def part_models() -> dict:
    from infinictx.training.pretrain import PretrainConfig, pretrain

    texts = [t for _, t in corpus_documents()]
    out = {}
    for name, settings in MODELS.items():
        if SMOKE:
            settings = {**settings, "hidden": 32, "layers": 1, "heads": 2, "intermediate": 64, "context": 64}
        last = [0.0]

        def progress(step, total, loss, name=name):
            if time.time() - last[0] > 60 or step == total:
                last[0] = time.time()
                print(f"[{time.strftime('%H:%M:%S')}] {name}: step {step}/{total} loss {loss:.3f}", flush=True)

        rec = pretrain(texts, tokenizer(), PretrainConfig(**settings), WORK / f"model-{name}", progress=progress)
        out[name] = {k: v for k, v in rec.items() if k != "losses"}
    return out


def part_index() -> dict:
    from infinictx.analysis.ngrams.corpus import build_index

    folder = WORK / "ngram-index"
    record = WORK / "index.json"
    if record.exists():
        return json.loads(record.read_text())
    out = build_index(corpus_documents(), tokenizer(), folder, engine="infini-gram")
    record.write_text(json.dumps(out))
    return out


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (WORK / f"{name}.jsonl").read_text().splitlines()]


@torch.no_grad()
def greedy_accuracy(lm, task: list[dict], key: str | None) -> dict:
    """Greedy answers of the model (8 tokens); right when the expected answer's last word (the town, the sum) is
    among the answer's first three words. Per value of `key` (exposures for QA) and overall."""
    right: dict = {}
    for r in task:
        ids = lm.tokenizer(TEMPLATE.format(input=r["input"]), return_tensors="pt", add_special_tokens=False).input_ids
        out = lm.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
        words = [w.strip(".,?!") for w in lm.tokenizer.decode(out[0, ids.shape[1]:]).split()[:3]]
        right.setdefault(r[key] if key else "all", []).append(r["output"].split()[-1] in words)
    out = {str(g): {"right": sum(v), "n": len(v)} for g, v in sorted(right.items(), key=lambda kv: str(kv[0]).zfill(9))}
    every = [x for v in right.values() for x in v]
    out["all"] = {"right": sum(every), "n": len(every)}
    return out


def part_trace() -> dict:
    from infinictx import load_model
    from infinictx.analysis.ngrams.index import open_index
    from infinictx.analysis.ngrams.taskgram import PairMiner
    from infinictx.analysis.ngrams.trace import trace

    index = open_index(WORK / "ngram-index", "infini-gram")
    out = {}
    for model in MODELS:
        lm = load_model(WORK / f"model-{model}", device="cpu", dtype="float32")
        for task, key in (("qa", "exposures"), ("arithmetic", None)):
            path = WORK / f"trace-{model}-{task}.json"
            if not path.exists():
                examples = [(r["input"], r["output"]) for r in rows(task)]
                result = trace(lm, index, examples, PairMiner(ns=(1, 2, 3), gamma=None), window=64,
                               template=TEMPLATE)
                result["accuracy"] = greedy_accuracy(lm, rows(task), key)
                path.write_text(json.dumps(result))
            result = json.loads(path.read_text())
            out[f"{model}/{task}"] = {"summary": result["summary"], "accuracy": result["accuracy"]}
    return out


def code_corpus(limit_tokens: int, seen: list[int]):
    """(name, text) of Python sources under the installed packages, then the books, until the indexer has counted
    `limit_tokens` tokens (`seen[0]`, which it updates as it tokenizes)."""
    from infinictx.data.texts import training_corpus

    roots = sorted({Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()})
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if seen[0] >= limit_tokens:
                return
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                yield str(path.relative_to(root)), text
    yield from training_corpus()


def part_throughput(tokens: int = 50_000_000) -> dict:
    import random

    from transformers import AutoTokenizer

    from infinictx.analysis.ngrams.corpus import build_index
    from infinictx.analysis.ngrams.index import open_index
    from infinictx.core.models import resolve_model_path

    folder = WORK / "throughput-index"
    record = WORK / "throughput.json"
    if record.exists():
        return json.loads(record.read_text())
    tok = AutoTokenizer.from_pretrained(str(resolve_model_path(None)[0]))
    if folder.exists():   # an interrupted build: start again
        import shutil

        shutil.rmtree(folder)
    seen = [0]
    built = build_index(code_corpus(200_000 if SMOKE else tokens, seen), tok, folder, engine="infini-gram",
                        progress=lambda n: seen.__setitem__(0, seen[0] + n))
    index = open_index(folder, "infini-gram")
    rng = random.Random(0)
    data = np.fromfile(folder / "tokenized.0", dtype=index.info.np_dtype)
    sep = np.iinfo(index.info.np_dtype).max
    starts = [rng.randrange(len(data) - 8) for _ in range(300)]
    grams = [[int(t) for t in data[s:s + rng.randint(1, 4)]] for s in starts]
    grams = [g for g in grams if sep not in g]
    t0 = time.perf_counter()
    counts = [index.count(g) for g in grams]
    t_count = (time.perf_counter() - t0) / len(grams)
    pairs = list(zip(grams[::2], grams[1::2]))[:100]
    t0 = time.perf_counter()
    for a, b in pairs:
        index.cooccur([a], [b], 64)
    t_cooc = (time.perf_counter() - t0) / len(pairs)
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out = {**built, "count_ms": round(1000 * t_count, 3), "cooccur_ms": round(1000 * t_cooc, 3),
           "median_count": sorted(counts)[len(counts) // 2], "queries": len(grams),
           "indexer_peak_rss_mib": round(peak_children, 1),
           "this_process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    record.write_text(json.dumps(out))
    return out


def fmt(c: dict) -> str:
    if not c or c.get("spearman") is None:
        return "–"
    return f"{c['spearman']:+.3f} (p={c['spearman_p']:.2g}, n={c['n']})"


def markdown(out: dict) -> str:
    lines = ["# Gen-vs-Mem, controlled: task-gram vs model probabilities on a fully indexed pretraining corpus", ""]
    if "corpus" in out:
        c = out["corpus"]
        lines += [f"Corpus: {c['documents']} documents, {c['characters']:,} characters, {c['facts']} planted facts "
                  f"at exposures {c['exposure_levels']}, {c['arithmetic_test_problems']} held-out sums; BPE "
                  f"vocabulary {c['vocab_size']}.", ""]
    if "models" in out:
        lines += ["| model | parameters (non-embedding) | tokens | seconds | loss first → last 50 |",
                  "|---|---|---|---|---|"]
        for name, m in out["models"].items():
            lines.append(f"| {name} | {m['parameters']:,} ({m['non_embedding_parameters']:,}) | {m['tokens_seen']:,} "
                         f"| {m['seconds']} | {m['loss_first']} → {m['loss_last_50']} |")
        lines.append("")
    if "index" in out:
        i = out["index"]
        lines += [f"Index: {i['tokens']:,} tokens, built in {i['index_s']} s ({i['engine']}).", ""]
    if "trace" in out:
        lines += ["| model / task | pairs | ρ task-gram~model (all seen x) | ρ (co-occurring) | ρ ∞-gram~model | "
                  "greedy accuracy |", "|---|---|---|---|---|---|"]
        for name, r in out["trace"].items():
            s = r["summary"]["all"]
            acc = r["accuracy"]["all"]
            lines.append(f"| {name} | {s['pairs']} | {fmt(s['taskgram_vs_llm'])} | "
                         f"{fmt(s['taskgram_vs_llm_cooccurring'])} | {fmt(s.get('infgram_vs_llm'))} | "
                         f"{acc['right']}/{acc['n']} |")
        lines.append("")
        for name, r in out["trace"].items():
            if name.endswith("/qa"):
                per = ", ".join(f"{k}: {v['right']}/{v['n']}" for k, v in r["accuracy"].items() if k != "all")
                lines.append(f"- {name} accuracy by exposures: {per}")
        lines.append("")
    if "throughput" in out:
        t = out["throughput"]
        lines += [f"Throughput: {t['tokens']:,} tokens ({t['documents']:,} documents) tokenized in "
                  f"{t['tokenize_s']} s, "
                  f"indexed in {t['index_s']} s ({t['tokens_per_s_index']:,} tokens/s); {t['bytes'] / 2**20:.0f} MiB "
                  f"on disk; count {t['count_ms']} ms, co-occurrence (window 64) {t['cooccur_ms']} ms per query; "
                  f"indexer peak RSS {t['indexer_peak_rss_mib']} MiB.", ""]
    return "\n".join(lines)


PARTS = {"corpus": part_corpus, "models": part_models, "index": part_index, "trace": part_trace,
         "throughput": part_throughput}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="corpus,models,index,trace,throughput")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="a sliver of everything, to check the pipeline")
    args = ap.parse_args()
    global WORK, SMOKE
    if args.smoke:
        WORK, SMOKE = cache_dir() / "gen_vs_mem_smoke", True
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    WORK.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "gen_vs_mem.json"
    out = {}
    if path.exists() and not SMOKE:   # parts measured earlier are kept
        out = {k: v for k, v in json.loads(path.read_text()).items() if k in PARTS}
    for part in args.parts.split(","):
        if part not in PARTS:
            raise SystemExit(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
        print(f"[{time.strftime('%H:%M:%S')}] {part}", flush=True)
        out[part] = PARTS[part]()
        if SMOKE:
            print(markdown(out))
        else:
            save("gen_vs_mem", {"work": str(WORK), **out}, markdown(out))


if __name__ == "__main__":
    main()
