"""Long-document translation with Temp-Lora against the same window without it (issue 16; the paper's GuoFeng
experiment on a Bible book): Gemma-3-270M (base), CUV (simplified) ↔ KJV, a chapter per chunk, the previous
chapter as context (k1).

Cells (each one `infinictx translate` process; its JSON under results/translation/, a checkpoint after every
chapter, so a rerun of this script skips finished cells and resumes a stopped one):
  main   zh→en teacher-forced (the paper's protocol) on the whole --book, zh→en free-running (the model's own
         history and training targets) on its first --free-chapters chapters, en→zh teacher-forced on the whole
         --en-zh-book; window and temp-lora each, free-running also temp-lora-repeats (`--train-on-repeats`)
  lr     Temp-Lora's learning rate on the first --lr-chapters chapters, zh→en teacher-forced (run it first: the
         main cells use --lr)

  .venv/bin/python benchmarks/translation.py --parts lr
  .venv/bin/python benchmarks/translation.py --parts main --lr 1e-4

Writes results/translation.{json,md} and results/translation.png (reference PPL and chrF along the book)."""

from __future__ import annotations

import argparse
import json
import sys

from common import RESULTS, measured_on, run_cli, save

RUNS = {  # label: (source language, target language, free-running)
    "zh-en": ("zh", "en", False),
    "zh-en-free": ("zh", "en", True),
    "en-zh": ("en", "zh", False),
}


def scope(label: str, a) -> tuple[str, int | None]:
    """The book and chapter limit a run translates. zh→en teacher-forced: the whole --book (the ≥ 20K-token
    target). Free-running decodes one sentence after the other (about 6 s a verse on a 2-core CPU without AMX), so
    it covers the first --free-chapters chapters of --book (half of Judges' verses); en→zh the whole of the
    shorter --en-zh-book."""
    if label == "zh-en-free":
        return a.book, a.free_chapters
    if label == "en-zh":
        return a.en_zh_book, None
    return a.book, None


def scope_text(book: str, chapters: int | None) -> str:
    return f"{book} 1–{chapters}" if chapters else book


# a cell's method: the `--method` it runs and its extra flags. Free-running also runs Temp-Lora trained on its
# repeated outputs too (what the task did before it left them out of the loss): the collapse that rule prevents.
METHODS = {"window": ("window", []), "temp-lora": ("temp-lora", []),
           "temp-lora-repeats": ("temp-lora", ["--train-on-repeats"])}


def methods(label: str) -> list[str]:
    return ["window", "temp-lora", *(["temp-lora-repeats"] if RUNS[label][2] else [])]


METRICS = ("ref_ppl", "ref_ppl_sentence_weighted", "bleu", "chrf")


def cell(folder, name: str, book: str, src: str, tgt: str, free: bool, method: str, window: int, threads: int,
         extra: list[str]) -> dict | None:
    args = ["translate", f"bible:{book}", "--model", "gemma3-270m", "--method", method, "-W", str(window),
            "--src-lang", src, "--tgt-lang", tgt, "--threads", str(threads),
            "--checkpoint", str((folder / f"{name}.ckpt").relative_to(RESULTS.parent.parent)),
            *(["--free-running"] if free else []), *extra]
    summary = run_cli(name, args, folder / f"{name}.json")
    if summary is None:
        return None
    doc = summary["documents"][0]
    return {"command": summary["command"], "peak_rss_mib": summary["peak_rss_mib"], "cpu": summary["cpu"],
            "wall_s": summary["wall_s"],
            "sentences": summary["sentences"], "chunks": doc["chunks"], "ref_tokens": summary.get("ref_tokens"),
            **{k: summary.get(k) for k in METRICS}, "buckets": doc["buckets"], "cost": doc["cost"],
            "config": summary["config"]}


def paired_intervals(w: dict, t: dict, refs: dict[str, str], tgt: str, samples: int = 1000) -> dict:
    """95% bootstrap intervals of Temp-Lora's change against the window, resampling the sentences both cells
    translated (a paired bootstrap): reference PPL in % (from the per-sentence NLLs, in cells run since the JSON
    carries them), BLEU and chrF in points."""
    import numpy as np
    import sacrebleu

    from infinictx.data.parallel import LANGUAGES, to_simplified

    a, b = ({s["key"]: s for s in c["translations"]} for c in (w, t))
    keys = [k for k in a if k in b and k in refs]
    idx = np.random.default_rng(0).integers(0, len(keys), (samples, len(keys)))
    ci = lambda x: [round(float(v), 3) for v in np.percentile(x, [2.5, 97.5])]   # noqa: E731
    out = {"sentences": len(keys), "samples": samples}
    if all("ref_nll" in a[k] and "ref_nll" in b[k] for k in keys):
        n, na, nb = (np.array([d[k][f] for k in keys]) for d, f in ((a, "ref_tokens"), (a, "ref_nll"), (b, "ref_nll")))
        out["ref_ppl_pct"] = ci(100 * (np.exp((nb[idx].sum(1) - na[idx].sum(1)) / n[idx].sum(1)) - 1))
    ref_list = [[refs[k] for k in keys]]
    hyps = [[d[k]["hyp"] for k in keys] for d in (a, b)]
    if tgt == "zh":   # scored in simplified script, as the task scores them
        hyps = [to_simplified(h) for h in hyps]
    # sacrebleu's per-sentence sufficient statistics (what its own paired tests resample; the version is pinned)
    for name, metric in (("bleu", sacrebleu.BLEU(tokenize=LANGUAGES[tgt][1])), ("chrf", sacrebleu.CHRF())):
        sa, sb = (np.array(metric._extract_corpus_statistics(h, ref_list), dtype=float) for h in hyps)
        score = lambda st, i: metric._compute_score_from_stats(list(st[i].sum(0))).score   # noqa: E731
        out[name] = ci([score(sb, i) - score(sa, i) for i in idx])
    return out


def references(book: str, src: str, tgt: str) -> dict[str, str]:
    from infinictx.data.parallel import read_parallel

    return {p.key: p.ref for doc in read_parallel(f"bible:{book}", None, src, tgt) for p in doc.pairs}


def interval(x) -> str:
    return f" [{x[0]:+.1f}, {x[1]:+.1f}]" if x else ""


def change(a, b) -> str:
    return "–" if a is None or b is None else f"{100 * (b - a) / a:+.1f}%"


def table(cells: dict, intervals: dict, scopes: dict) -> list[str]:
    lines = ["| run | text | method | reference PPL | PPL (paper) | BLEU | chrF | wall s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label in RUNS:
        w = cells.get(f"{label}_window")
        text = scope_text(*scopes[label])
        for method in methods(label):
            c = cells.get(f"{label}_{method}")
            if c:
                lines.append(f"| {label} | {text} | {method} | {c['ref_ppl']:.3f} | "
                             f"{c['ref_ppl_sentence_weighted']:.3f} | "
                             f"{c['bleu']:.2f} | {c['chrf']:.2f} | {c['wall_s']:.0f} | {c['peak_rss_mib']:.0f} |")
        for method in methods(label)[1:]:
            t = cells.get(f"{label}_{method}")
            if not (w and t):
                continue
            ci = intervals.get(f"{label}_{method}", {})
            lines.append(f"| {label} | {text} | change ({method}) | "
                         f"{change(w['ref_ppl'], t['ref_ppl'])}{interval(ci.get('ref_ppl_pct'))} | "
                         f"{change(w['ref_ppl_sentence_weighted'], t['ref_ppl_sentence_weighted'])} | "
                         f"{t['bleu'] - w['bleu']:+.2f}{interval(ci.get('bleu'))} | "
                         f"{t['chrf'] - w['chrf']:+.2f}{interval(ci.get('chrf'))} | "
                         f"{t['wall_s'] / w['wall_s']:.2f}× | |")
    return lines


def bucket_table(cells: dict, scopes: dict) -> list[str]:
    lines = []
    for label, method in ((label, m) for label in RUNS for m in methods(label)[1:]):
        w, t = cells.get(f"{label}_window"), cells.get(f"{label}_{method}")
        if not (w and t):
            continue
        lines += [f"**{label}** ({scope_text(*scopes[label])}), {method}, along the text (chapters):", "",
                  "| chapters | PPL window | PPL Temp-Lora | change | chrF window | chrF Temp-Lora | BLEU window | "
                  "BLEU Temp-Lora |", "|---|---|---|---|---|---|---|---|"]
        for bw, bt in zip(w["buckets"], t["buckets"]):
            lines.append(f"| {bw['chunks'][0] + 1}–{bw['chunks'][1]} | {bw['ref_ppl']:.3f} | {bt['ref_ppl']:.3f} | "
                         f"{change(bw['ref_ppl'], bt['ref_ppl'])} | {bw['chrf']:.2f} | {bt['chrf']:.2f} | "
                         f"{bw['bleu']:.2f} | {bt['bleu']:.2f} |")
        lines.append("")
    return lines


def plot(cells: dict, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [label for label in RUNS if cells.get(f"{label}_window") and cells.get(f"{label}_temp-lora")]
    if not shown:
        return False
    fig, axes = plt.subplots(2, len(shown), figsize=(4.2 * len(shown), 6), squeeze=False)
    for col, label in enumerate(shown):
        for method in ("window", "temp-lora"):
            b = cells[f"{label}_{method}"]["buckets"]
            x = [(r["chunks"][0] + r["chunks"][1]) / 2 for r in b]
            axes[0][col].plot(x, [r["ref_ppl"] for r in b], "o-", label=method)
            axes[1][col].plot(x, [r["chrf"] for r in b], "o-", label=method)
        axes[0][col].set_title(label)
        axes[1][col].set_xlabel("chapter")
    axes[0][0].set_ylabel("reference PPL")
    axes[1][0].set_ylabel("chrF")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="main")
    ap.add_argument("--book", default="Judges", help="a Bible book with ≥ 20K target tokens either way")
    ap.add_argument("--free-chapters", type=int, default=10, help="chapters of --book the free-running cells cover")
    ap.add_argument("--en-zh-book", default="Esther", help="the book the en→zh cells translate")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=1e-4, help="Temp-Lora's learning rate in the main cells")
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    ap.add_argument("--lr-chapters", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="translation")
    a = ap.parse_args()
    runs = a.runs.split(",")
    if any(r not in RUNS for r in runs):
        sys.exit(f"translation: unknown run in {a.runs}; choose from {', '.join(RUNS)}")
    folder = RESULTS / a.name
    path = RESULTS / f"{a.name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    cells, sweep = data.get("cells", {}), data.get("lr_sweep", {})
    if "lr" in a.parts.split(","):
        short = ["--max-chunks", str(a.lr_chapters)]
        base = cell(folder, f"lr_window_{a.lr_chapters}", a.book, "zh", "en", False, "window", a.window, a.threads,
                    short)
        if base:
            sweep["window"] = base
        for lr in a.lrs.split(","):
            c = cell(folder, f"lr_{lr}_{a.lr_chapters}", a.book, "zh", "en", False, "temp-lora", a.window,
                     a.threads, [*short, "--lr", lr])
            if c:
                sweep[lr] = c
    if "main" in a.parts.split(","):
        for label in runs:
            src, tgt, free = RUNS[label]
            book, chapters = scope(label, a)
            for method in methods(label):
                runs_as, flags = METHODS[method]
                extra = (["--lr", str(a.lr)] if runs_as == "temp-lora" else []) + flags + (
                    ["--max-chunks", str(chapters)] if chapters else [])
                c = cell(folder, f"{label}_{method}", book, src, tgt, free, runs_as, a.window, a.threads, extra)
                if c:
                    cells[f"{label}_{method}"] = c
    scopes = {label: scope(label, a) for label in RUNS}
    intervals = {}
    for label, method in ((label, m) for label in RUNS for m in methods(label)[1:]):
        paths = [folder / f"{label}_{m}.json" for m in ("window", method)]
        if all(p.exists() for p in paths):
            src, tgt, _ = RUNS[label]
            intervals[f"{label}_{method}"] = paired_intervals(*(json.loads(p.read_text()) for p in paths),
                                                              references(scopes[label][0], src, tgt), tgt)
    md = ["## Long-document translation: Temp-Lora against the same window (Bible, CUV ↔ KJV)", "",
          "Gemma-3-270M (base, Q4_K_M GGUF dequantized to fp32), W = "
          f"{a.window}, a chapter per chunk, the previous chapter as context (k1); greedy, repetition penalty 1.12; "
          "Temp-Lora: r = 64, 2 steps per chapter on the context + chapter, loss on the target lines only. "
          "Teacher-forced: the target history and the training targets are the reference; free-running: the "
          "model's own translations (the reference only scores). Reference PPL: token-weighted, and the paper's "
          "mean of per-sentence PPLs; BLEU (sacrebleu, 13a for English, zh for Chinese) and chrF. "
          "[brackets]: 95% interval of the change, a paired bootstrap over sentences (1000 resamples; the PPL "
          "interval needs the per-sentence NLLs that cells run before they were in the JSON lack).", ""]
    cpus = sorted({c.get("cpu") or "CPU not recorded" for c in [*cells.values(), *sweep.values()]})
    if cpus:
        md += [measured_on(cpus), ""]
    if cells:
        md += table(cells, intervals, scopes) + [""] + bucket_table(cells, scopes)
        if plot(cells, RESULTS / f"{a.name}.png"):
            md += [f"![reference PPL and chrF along the book]({a.name}.png)", ""]
    if sweep:
        md += [f"### Temp-Lora's learning rate (zh→en teacher-forced, first {a.lr_chapters} chapters)", "",
               "| lr | reference PPL | change | PPL (paper) | BLEU | chrF | wall s | peak RSS MiB |",
               "|---|---|---|---|---|---|---|---|"]
        w = sweep.get("window")
        for lr, c in sweep.items():
            vs_window = change(w and w['ref_ppl'], c['ref_ppl']) if c is not w else "–"
            md.append(f"| {lr} | {c['ref_ppl']:.3f} | {vs_window} | "
                      f"{c['ref_ppl_sentence_weighted']:.3f} | {c['bleu']:.2f} | {c['chrf']:.2f} | {c['wall_s']:.0f} | "
                      f"{c['peak_rss_mib']:.0f} |")
        md.append("")
    save(a.name, {"book": a.book, "scopes": {k: scope_text(*v) for k, v in scopes.items()}, "window": a.window,
                  "lr": a.lr, "cells": cells, "intervals": intervals,
                  "lr_sweep": sweep}, "\n".join(md))


if __name__ == "__main__":
    main()
