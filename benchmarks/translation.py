"""Long-document translation with Temp-Lora against the same window without it (issue 16; the paper's GuoFeng
experiment on a Bible book): Gemma-3-270M (base), CUV (simplified) ↔ KJV, a chapter per chunk, the previous
chapter as context (k1).

Cells (each one `infinictx translate` process; its JSON under results/translation/, a checkpoint after every
chapter, so a rerun of this script skips finished cells and resumes a stopped one):
  main   zh→en teacher-forced (the paper's protocol) on the whole --book, zh→en free-running (the model's own
         history and training targets) on its first --free-chapters chapters, en→zh teacher-forced on the whole
         --en-zh-book; window and temp-lora each, free-running also the variants of FREE_ONLY (below)
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


def scope(label: str, a, method: str = "window") -> tuple[str, int | None]:
    """The book and chapter limit a cell translates. zh→en teacher-forced: the whole --book (the ≥ 20K-token
    target). Free-running decodes one sentence after the other (about 6 s a verse on a 2-core CPU without AMX), so
    it covers the first --free-chapters chapters of --book (half of Judges' verses), and the ways to stop its drift
    that failed there the first --variant-chapters (the drift shows by chapter 3); en→zh the whole of the shorter
    --en-zh-book."""
    if label == "zh-en-free":
        return a.book, a.variant_chapters if method in SHORT_FIXES else a.free_chapters
    if label == "en-zh":
        return a.en_zh_book, None
    return a.book, None


def scope_text(book: str, chapters: int | None) -> str:
    return f"{book} 1–{chapters}" if chapters else book


# a cell's method: the `--method` it runs and its extra flags (an --lr here replaces the benchmark's --lr).
# Free-running also runs Temp-Lora trained on its repeated outputs too (what the task did before it left them out
# of the loss): the collapse that rule prevents; and three ways to stop the drift of training on its own outputs
# (DRIFT_FIXES): the loss on the source lines (the document's true text) instead, a 10× lower learning rate, or
# only the outputs the model is sure of (self-training's confidence filter; None: `confidence_floor`'s threshold).
METHODS = {"window": ("window", []), "temp-lora": ("temp-lora", []),
           "temp-lora-repeats": ("temp-lora", ["--train-on-repeats"]),
           "temp-lora-source": ("temp-lora", ["--loss-on", "source"]),
           "temp-lora-lr-1e-5": ("temp-lora", ["--lr", "1e-5"]),
           "temp-lora-confident": ("temp-lora", ["--min-confidence", None])}
DRIFT_FIXES = ("temp-lora-source", "temp-lora-lr-1e-5", "temp-lora-confident")
# the fixes first ran over --variant-chapters; these did not hold there, the lower learning rate did and runs over
# --free-chapters, as the main cells
SHORT_FIXES = ("temp-lora-source", "temp-lora-confident")
FREE_ONLY = ("temp-lora-repeats", *DRIFT_FIXES)


def methods(label: str) -> list[str]:
    return ["window", "temp-lora", *(FREE_ONLY if RUNS[label][2] else [])]


METRICS = ("ref_ppl", "ref_ppl_sentence_weighted", "bleu", "chrf")


def confidence_floor(folder, a) -> float:
    """The confidence filter's threshold: the lower quartile of the unadapted model's output confidence (the
    geometric mean of its tokens' probabilities) on another text, free-running Ruth 1 (22 verses) with the window,
    so that it is not set on the text it is measured on."""
    import numpy as np

    name = "calibration_ruth-1"
    if cell(folder, name, "Ruth", "zh", "en", True, "window", a.window, a.threads, ["--max-chunks", "1"]) is None:
        sys.exit("translation: the calibration cell failed")
    confidence = [t["confidence"] for t in json.loads((folder / f"{name}.json").read_text())["translations"]]
    return round(float(np.exp(np.percentile(confidence, 25))), 3)


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
    """Temp-Lora's change against the window on the sentences both cells translated (`point`), and its 95%
    bootstrap intervals, resampling those sentences (a paired bootstrap): reference PPL in % (from the
    per-sentence NLLs, in cells run since the JSON carries them), BLEU and chrF in points."""
    import numpy as np

    from infinictx.tasks.translation import as_scored, scorers

    a, b = ({s["key"]: s for s in c["translations"]} for c in (w, t))
    keys = [k for k in a if k in b and k in refs]
    idx = np.random.default_rng(0).integers(0, len(keys), (samples, len(keys)))
    ci = lambda x: [round(float(v), 3) for v in np.percentile(x, [2.5, 97.5])]   # noqa: E731
    out = {"sentences": len(keys), "samples": samples, "point": {}}
    if all("ref_nll" in a[k] and "ref_nll" in b[k] for k in keys):
        n, na, nb = (np.array([d[k][f] for k in keys]) for d, f in ((a, "ref_tokens"), (a, "ref_nll"), (b, "ref_nll")))
        out["ref_ppl_pct"] = ci(100 * (np.exp((nb[idx].sum(1) - na[idx].sum(1)) / n[idx].sum(1)) - 1))
        paper = lambda nll: (n * np.exp(nll / n)).sum() / n.sum()   # noqa: E731
        out["point"] |= {"ref_ppl_pct": 100 * float(np.expm1((nb.sum() - na.sum()) / n.sum())),
                         "ref_ppl_paper_pct": 100 * float(paper(nb) / paper(na) - 1)}
    ref_list = [[refs[k] for k in keys]]
    hyps = [as_scored([d[k]["hyp"] for k in keys], tgt) for d in (a, b)]
    # sacrebleu's per-sentence sufficient statistics (what its own paired tests resample; the version is pinned)
    for name, metric in scorers(tgt).items():
        sa, sb = (np.array(metric._extract_corpus_statistics(h, ref_list), dtype=float) for h in hyps)
        score = lambda st, i: metric._compute_score_from_stats(list(st[i].sum(0))).score   # noqa: E731
        out[name] = ci([score(sb, i) - score(sa, i) for i in idx])
        everything = np.arange(len(keys))
        out["point"][name] = float(score(sb, everything) - score(sa, everything))
    return out


def references(book: str, src: str, tgt: str) -> dict[str, str]:
    from infinictx.data.parallel import read_parallel

    return {p.key: p.ref for doc in read_parallel(f"bible:{book}", None, src, tgt) for p in doc.pairs}


def interval(x) -> str:
    return f" [{x[0]:+.1f}, {x[1]:+.1f}]" if x else ""


def change(a, b) -> str:
    return "–" if a is None or b is None else f"{100 * (b - a) / a:+.1f}%"


def table(cells: dict, intervals: dict, scopes: dict) -> list[str]:
    """Each cell's numbers, then each method's change against the window on the sentences both translated (a
    variant that covers fewer chapters is compared on those)."""
    lines = ["| run | text | method | reference PPL | PPL (paper) | BLEU | chrF | wall s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label in RUNS:
        w = cells.get(f"{label}_window")
        for method in methods(label):
            c = cells.get(f"{label}_{method}")
            if c:
                lines.append(f"| {label} | {scope_text(*scopes[f'{label}_{method}'])} | {method} | "
                             f"{c['ref_ppl']:.3f} | {c['ref_ppl_sentence_weighted']:.3f} | "
                             f"{c['bleu']:.2f} | {c['chrf']:.2f} | {c['wall_s']:.0f} | {c['peak_rss_mib']:.0f} |")
        for method in methods(label)[1:]:
            t = cells.get(f"{label}_{method}")
            if not (w and t):
                continue
            ci = intervals.get(f"{label}_{method}", {})
            point = ci.get("point", {})
            pct = lambda key, field: (f"{point[key]:+.1f}%" if key in point   # noqa: E731
                                      else change(w[field], t[field]))
            diff = lambda key: point.get(key, t[key] - w[key])   # noqa: E731
            same = scopes[f"{label}_{method}"] == scopes[f"{label}_window"]
            ratio = f"{t['wall_s'] / w['wall_s']:.2f}×" if same else "–"
            lines.append(f"| {label} | {scope_text(*scopes[f'{label}_{method}'])} | change ({method}) | "
                         f"{pct('ref_ppl_pct', 'ref_ppl')}{interval(ci.get('ref_ppl_pct'))} | "
                         f"{pct('ref_ppl_paper_pct', 'ref_ppl_sentence_weighted')} | "
                         f"{diff('bleu'):+.2f}{interval(ci.get('bleu'))} | "
                         f"{diff('chrf'):+.2f}{interval(ci.get('chrf'))} | "
                         f"{ratio} | |")
    return lines


def bucket_table(cells: dict, scopes: dict) -> list[str]:
    lines = []
    for label, method in ((label, m) for label in RUNS for m in methods(label)[1:]):
        w, t = cells.get(f"{label}_window"), cells.get(f"{label}_{method}")
        if not (w and t) or scopes[f"{label}_{method}"] != scopes[f"{label}_window"]:
            continue   # a variant over fewer chapters: in the chapter table
        lines += [f"**{label}** ({scope_text(*scopes[f'{label}_window'])}), {method}, along the text (chapters):",
                  "", "| chapters | PPL window | PPL Temp-Lora | change | chrF window | chrF Temp-Lora | BLEU window | "
                  "BLEU Temp-Lora |", "|---|---|---|---|---|---|---|---|"]
        for bw, bt in zip(w["buckets"], t["buckets"]):
            lines.append(f"| {bw['chunks'][0] + 1}–{bw['chunks'][1]} | {bw['ref_ppl']:.3f} | {bt['ref_ppl']:.3f} | "
                         f"{change(bw['ref_ppl'], bt['ref_ppl'])} | {bw['chrf']:.2f} | {bt['chrf']:.2f} | "
                         f"{bw['bleu']:.2f} | {bt['bleu']:.2f} |")
        lines.append("")
    return lines


def chapter_table(label: str, runs: dict[str, dict], refs: dict[str, str], tgt: str) -> list[str]:
    """Reference PPL and chrF chapter by chapter for each method of a run (free-running's drift)."""
    from infinictx.tasks.translation import SentenceResult, quality

    def sentences(run, chapter):
        return [SentenceResult(t["key"], t["chunk"], "", refs[t["key"]], t["hyp"], t.get("ref_nll"),
                               t.get("ref_tokens", 0)) for t in run["translations"]
                if t["chunk"] == chapter and t["key"] in refs]

    chapters = sorted({t["chunk"] for run in runs.values() for t in run["translations"]})
    lines = [f"**{label}**, chapter by chapter: reference PPL / chrF", "",
             "| chapter | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for c in chapters:
        cols = []
        for run in runs.values():
            part = sentences(run, c)
            q = quality(part, tgt) if part else {}
            cols.append(f"{q['ref_ppl']:.1f} / {q['chrf']:.1f}" if "ref_ppl" in q else "")
        lines.append(f"| {c + 1} | " + " | ".join(cols) + " |")
    return lines + [""]


def plot(cells: dict, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [label for label in RUNS if cells.get(f"{label}_window") and cells.get(f"{label}_temp-lora")]
    if not shown:
        return False
    fig, axes = plt.subplots(2, len(shown), figsize=(4.2 * len(shown), 6), squeeze=False)
    for col, label in enumerate(shown):
        for method in ("window", "temp-lora", "temp-lora-lr-1e-5"):
            if f"{label}_{method}" not in cells:
                continue
            b = cells[f"{label}_{method}"]["buckets"]
            x = [(r["chunks"][0] + r["chunks"][1]) / 2 for r in b]
            axes[0][col].plot(x, [r["ref_ppl"] for r in b], "o-", label=method)
            axes[1][col].plot(x, [r["chrf"] for r in b], "o-", label=method)
        axes[0][col].set_title(label)
        axes[0][col].set_yscale("log")   # free-running's drift spans four decades
        axes[1][col].set_xlabel("chapter")
    axes[0][0].set_ylabel("reference PPL")
    axes[1][0].set_ylabel("chrF")
    for ax in axes[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="main")
    ap.add_argument("--book", default="Judges", help="a Bible book with ≥ 20K target tokens either way")
    ap.add_argument("--free-chapters", type=int, default=10, help="chapters of --book the free-running cells cover")
    ap.add_argument("--variant-chapters", type=int, default=5,
                    help="chapters of --book the free-running drift fixes in SHORT_FIXES cover")
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
            for method in methods(label):
                book, chapters = scope(label, a, method)
                runs_as, flags = METHODS[method]
                if None in flags:
                    flags = [str(confidence_floor(folder, a)) if f is None else f for f in flags]
                lr = ["--lr", str(a.lr)] if runs_as == "temp-lora" and "--lr" not in flags else []
                extra = lr + flags + (
                    ["--max-chunks", str(chapters)] if chapters else [])
                c = cell(folder, f"{label}_{method}", book, src, tgt, free, runs_as, a.window, a.threads, extra)
                if c:
                    cells[f"{label}_{method}"] = c
    scopes = {f"{label}_{m}": scope(label, a, m) for label in RUNS for m in methods(label)}
    intervals, chapters = {}, []
    for label, (src, tgt, free) in RUNS.items():
        runs = {m: json.loads(path.read_text()) for m in methods(label)
                if (path := folder / f"{label}_{m}.json").exists()}
        if "window" not in runs or len(runs) < 2:
            continue
        refs = references(scopes[f"{label}_window"][0], src, tgt)
        for method in list(runs)[1:]:
            intervals[f"{label}_{method}"] = paired_intervals(runs["window"], runs[method], refs, tgt)
        if free:
            chapters += chapter_table(label, runs, refs, tgt)
    md = ["## Long-document translation: Temp-Lora against the same window (Bible, CUV ↔ KJV)", "",
          "Gemma-3-270M (base, Q4_K_M GGUF dequantized to fp32), W = "
          f"{a.window}, a chapter per chunk, the previous chapter as context (k1); greedy, repetition penalty 1.12; "
          "Temp-Lora: r = 64, 2 steps per chapter on the context + chapter, loss on the target lines only. "
          "Teacher-forced: the target history and the training targets are the reference; free-running: the "
          "model's own translations (the reference only scores). Reference PPL: token-weighted, and the paper's "
          "mean of per-sentence PPLs; BLEU (sacrebleu, 13a for English, zh for Chinese) and chrF. "
          "[brackets]: 95% interval of the change, a paired bootstrap over sentences (1000 resamples; the PPL "
          "interval needs the per-sentence NLLs that cells run before they were in the JSON lack). A change is "
          "measured on the sentences both cells translated.", "",
          "Free-running variants: temp-lora-repeats also trains on outputs that repeat another (the rule before "
          "repeats carried no loss); temp-lora-source puts the loss on the source lines instead of the model's "
          "own translations; temp-lora-lr-1e-5 trains at a 10× lower learning rate; temp-lora-confident trains only "
          "on outputs whose tokens' geometric-mean probability is at least "
          + (f"{confidence_floor(folder, a)}" if (folder / "calibration_ruth-1.json").exists() else "a threshold")
          + " (the unadapted model's lower quartile on Ruth 1, free-running).", ""]
    cpus = sorted({c.get("cpu") or "CPU not recorded" for c in [*cells.values(), *sweep.values()]})
    if cpus:
        md += [measured_on(cpus), ""]
    if cells:
        md += table(cells, intervals, scopes) + [""] + bucket_table(cells, scopes) + chapters
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
