"""Reports: Markdown tables (also printed) and plots of the tasks' summaries. Figures are written atomically
(temporary file, then rename), so an interrupted run never leaves half a plot."""

from __future__ import annotations

import os
from pathlib import Path


def _fmt_gflops(flops) -> str:
    return f"{flops / 1e12:.2f} TFLOP" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP"


def ppl_markdown(s: dict) -> str:
    has_base = "base_ppl" in s
    # Temp-Lora's settings: the config itself (the temp-lora method) or its learner on top of another method
    tl = s["config"] if s["method"] == "temp-lora" else s["config"].get("temp_lora")
    lines = [f"## Streaming perplexity: {s['method']} on {s.get('text', 'text')} ({s['tokens']} tokens)", "",
             f"model `{s.get('model', '?')}`, W={s['window']}, Δ={s['chunk']}"
             + (f", L_T={tl['train_context']}, lr={tl['lr']}, steps={tl['steps']}, r={tl['rank']}" if tl else ""), ""]
    head = "| tokens | PPL |" + (" base PPL | ratio |" if has_base else "")
    lines += [head, "|---|---|" + ("---|---|" if has_base else "")]
    for b in s["buckets"]:
        row = f"| {b['start']}–{b['end']} | {b['ppl']:.3f} |"
        if has_base:
            row += f" {b['base_ppl']:.3f} | {b['ppl'] / b['base_ppl']:.3f} |"
        lines.append(row)
    row = f"| **all** | **{s['ppl']:.3f}** |"
    if has_base:
        row += f" **{s['base_ppl']:.3f}** | **{s['ppl_ratio_vs_base']:.3f}** |"
    lines += [row, ""]
    lines.append(f"PPL as in Temp-Lora's code (token-weighted mean of chunk PPLs): {s['ppl_chunk_weighted']:.3f}"
                 + (f" (base {s['base_ppl_chunk_weighted']:.3f})" if has_base else ""))
    lines += ["", cost_markdown(s)]
    return "\n".join(lines) + "\n"


def cost_markdown(s: dict) -> str:
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in s.get("wall_s_by_phase", {}).items())
    tok = s.get("tokens_processed", {})
    mem = s.get("peak_cuda_bytes") or s.get("peak_rss_bytes", 0)
    return (f"Cost: wall {s['wall_s']:.1f} s ({phases}); {_fmt_gflops(s.get('flops', 0))} "
            f"(forward {_fmt_gflops(s['flops_by_kind']['forward'])}, backward "
            f"{_fmt_gflops(s['flops_by_kind']['backward'])}); tokens through forward {tok.get('forward', 0)}, "
            f"backward {tok.get('backward', 0)}, generated {tok.get('generated', 0)}; "
            f"peak memory {mem / 2**20:.0f} MiB")


def plot_ppl(s: dict, path: str | Path, points: int = 20, nll=None, base_nll=None):
    """PPL against position. Uses the report's buckets, or ~`points` finer ones when the run has few buckets
    and the per-token NLLs are given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = s["buckets"]
    if len(buckets) < 4 and nll is not None:
        import numpy as np

        from .perplexity import perplexity

        size = max(s["chunk"], (len(nll) // points) // s["chunk"] * s["chunk"] or s["chunk"])
        pos = np.arange(1, len(nll) + 1)
        buckets = []
        for start in range(0, len(nll) + 1, size):
            sel = (pos >= start) & (pos < start + size)
            if sel.any():
                row = {"start": start, "end": start + size, "ppl": perplexity(nll[sel])}
                if base_nll is not None:
                    row["base_ppl"] = perplexity(base_nll[sel])
                buckets.append(row)
    mid = [(b["start"] + min(b["end"], s["tokens"])) / 2 for b in buckets]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if "base_ppl" in buckets[0]:
        ax.plot(mid, [b["base_ppl"] for b in buckets], "o-", label=f"base (window W={s['window']})")
    label = "Temp-Lora" if s["method"] == "temp-lora" else s["method"]
    ax.plot(mid, [b["ppl"] for b in buckets], "o-", label=f"{label} (W={s['window']}, Δ={s['chunk']})")
    ax.set_xlabel("position in text (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{s.get('text', '')} — {s.get('model', '')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def wilson_interval(correct: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion correct / trials (sound at 0/n and n/n, unlike the normal
    approximation)."""
    if trials <= 0:
        return (0.0, 1.0)
    p = correct / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * ((p * (1 - p) / trials + z * z / (4 * trials * trials)) ** 0.5) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def byte_size(n: int) -> str:
    """Bytes for a table: MiB, or KiB below one MiB."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def accuracy_markdown(s: dict) -> str:
    """Retrieval accuracy per prompt length."""
    c = s["config"]
    settings = ", ".join(f"{k}={v}" for k, v in c.items() if v is not None)
    lines = [f"## {s['task']} retrieval: {s['method']} ({settings}) — {s.get('model', '')}", "",
             "| length (tokens) | accuracy | 95% interval | correct / trials | s per trial | bytes held | "
             "full KV bytes |",
             "|---|---|---|---|---|---|---|"]
    for r in s["results"]:
        held = byte_size(r["kv_bytes"]) if r.get("kv_bytes") is not None else "–"
        lo, hi = r.get("ci95") or wilson_interval(r["correct"], r.get("items", r["trials"]))
        unfinished = "" if r.get("complete", True) else f" (of {len(r['per_trial'])}, unfinished)"
        counted = (f"{r['correct']} / {r['items']} items, {r['trials_right']} / {r['trials']} trials all right"
                   if "items" in r else f"{r['correct']} / {r['trials']}")
        lines.append(f"| {length_label(r['length'])} | {100 * r['accuracy']:.0f}% | {100 * lo:.0f}–{100 * hi:.0f}% "
                     f"| {counted}{unfinished} | {r['s_per_trial']:.1f} | {held} "
                     f"| {r['kv_bytes_full'] / 2**20:.1f} MiB |")
    shown = [(r["length"], r["evidence_shown"]) for r in s["results"] if r.get("evidence_shown") is not None]
    if shown:
        lines += ["", "Evidence in the prompt the retriever built (recall of the needles the answer needs): " +
                  ", ".join(f"{length_label(n)} {100 * e:.0f}%" for n, e in shown) + "."]
    lines += ["", "Bytes held: keys and values, memory or retrieval index kept of the prompt; full KV bytes: a full "
              "cache of the whole prompt."]
    misses = miss_lines(s)
    if misses:
        lines += ["", "Misses (needle depth; its first token's position, and that position within the method's "
                  "chunk (RAG: its retrieval chunk) of the given tokens; for RAG whether the evidence was in its "
                  "prompt; the answer given):", "", *misses]
    return "\n".join(lines) + "\n"


def miss_lines(s: dict) -> list[str]:
    """One Markdown bullet per missed trial: where its needle sat and what came out instead."""
    c = s["config"]
    chunk = c.get("chunk_tokens") or c.get("chunk")   # RAG: where its retrieval chunks start, every C − O tokens
    step = chunk - (c.get("overlap") or 0) if c.get("chunk_tokens") else chunk
    out = []
    for r in s["results"]:
        for row in r["per_trial"]:
            if row is None or row["ok"]:
                continue
            where = ""
            if row.get("needle_at") is not None:
                where = f", token {row['needle_at']:,}"
                if chunk:
                    where += f" ({row['needle_at'] % step} into a {chunk}-token chunk)"
            if row.get("evidence_shown") is not None:
                where += f", evidence in the prompt {100 * row['evidence_shown']:.0f}%"
            out.append(f"- {length_label(r['length'])}, depth {row['depth']:.2f}{where}: expected {row['answer']}, "
                       f"got “{row['output']}”".replace("\n", "⏎"))
    return out


def plot_accuracy(summaries: list[dict], path: str | Path, title: str | None = None):
    """Accuracy against prompt length (log scale), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for s in summaries:
        xs = [r["length"] for r in s["results"]]
        label = s.get("label") or f"{s['method']} (W={s['config'].get('window')})"
        ax.plot(xs, [100 * r["accuracy"] for r in s["results"]], "o-", label=label)
    ax.set_xscale("log", base=2)
    lengths = sorted({r["length"] for s in summaries for r in s["results"]})
    ax.set_xticks(lengths, [length_label(n) for n in lengths])
    ax.set_ylim(-5, 105)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel(f"{summaries[0]['task']} accuracy (%)")
    ax.set_title(title or summaries[0].get("model", ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: str | Path):
    """Write a figure atomically (a temporary file renamed into place) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def translation_markdown(s: dict) -> str:
    """A translation run: overall quality, per document and per position bucket, and the cost."""
    def row(label: str, q: dict) -> str:
        cells = [f"{q[k]:.3f}" if k in q else "–" for k in ("ref_ppl", "ref_ppl_sentence_weighted")]
        cells += [f"{q[k]:.2f}" if k in q else "–" for k in ("bleu", "chrf")]
        return f"| {label} | {q.get('sentences', '–')} | " + " | ".join(cells) + " |"

    mode = "free-running" if s["free_running"] else "teacher-forced"
    lines = [f"## Translation {s['src_lang']}→{s['tgt_lang']}: {s['method']} on {s['source']} ({mode})", "",
             f"model `{s['model']}`, W={s['config'].get('window')}, context chunks {s['context_chunks']}"
             + (f", lr={s['config']['lr']}, steps={s['config']['steps']}, r={s['config']['rank']}"
                if "lr" in s["config"] else ""), "",
             "| part | sentences | reference PPL | PPL (paper's formula) | BLEU | chrF |", "|---|---|---|---|---|---|",
             row("**all**", s)]
    for d in s["documents"]:
        if len(s["documents"]) > 1:
            lines.append(row(d["name"], d))
        for b in d["buckets"]:
            lines.append(row(f"{d['name'] if len(s['documents']) > 1 else ''} chunks {b['chunks'][0] + 1}–"
                             f"{b['chunks'][1]}".strip(), b))
    for d in s["documents"]:
        if d["dropped"]:
            lines += ["", f"{d['name']}: {len(d['dropped'])} sentences only one side has were left out "
                      f"({', '.join(d['dropped'][:5])}{' ...' if len(d['dropped']) > 5 else ''})"]
    cost = s["documents"][0]["cost"] if len(s["documents"]) == 1 else None
    if cost:
        lines += ["", cost_markdown({**cost, "wall_s": s["wall_s"]})]
    return "\n".join(lines) + "\n"


def books_markdown(s: dict) -> str:
    """A dataset's perplexity: a row per book, then position buckets pooled over the books."""
    has_base = "base_ppl" in s
    lines = [f"## Streaming perplexity over {len(s['books'])} books: {s['method']} on {s.get('dataset', 'dataset')} "
             f"({s['tokens']} tokens)", "", f"model `{s.get('model', '?')}`, W={s['window']}, Δ={s['chunk']}", "",
             "| book | tokens | PPL |" + (" base PPL |" if has_base else "") + " wall s |",
             "|---|---|---|" + ("---|" if has_base else "") + "---|"]
    for b in s["books"]:
        lines.append(f"| {b['name']} | {b['tokens']} | {b['ppl']:.3f} |" + (f" {b['base_ppl']:.3f} |" if has_base
                     else "") + f" {b['wall_s']:.1f} |")
    lines.append(f"| **all** | **{s['tokens']}** | **{s['ppl']:.3f}** |" + (f" **{s['base_ppl']:.3f}** |"
                 if has_base else "") + f" {s['wall_s']:.1f} |")
    lines += ["", "Position buckets pooled over the books:", "", "| positions | tokens | PPL |"
              + (" base PPL |" if has_base else ""), "|---|---|---|" + ("---|" if has_base else "")]
    for b in s["buckets"]:
        lines.append(f"| {b['start']}–{b['end']} | {b['tokens']} | {b['ppl']:.3f} |"
                     + (f" {b['base_ppl']:.3f} |" if has_base else ""))
    return "\n".join(lines) + "\n"
