"""Reports: a Markdown table (also printed), a JSON file and a PPL-vs-position plot. Files are written
atomically (temporary file, then rename), so an interrupted run never leaves half a report."""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path: str | Path, data: str | bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode) as f:
        f.write(data)
    os.replace(tmp, path)


def write_json(summary: dict, path: str | Path):
    atomic_write(path, json.dumps(summary, indent=2, default=_jsonable) + "\n")


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def _fmt_gflops(flops) -> str:
    return f"{flops / 1e12:.2f} TFLOP" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP"


def ppl_markdown(s: dict) -> str:
    has_base = "base_ppl" in s
    lines = [f"## Streaming perplexity: {s['method']} on {s.get('text', 'text')} ({s['tokens']} tokens)", "",
             f"model `{s.get('model', '?')}`, W={s['window']}, Δ={s['chunk']}"
             + (f", L_T={s['config']['train_context']}, lr={s['config']['lr']}, steps={s['config']['steps']}, "
                f"r={s['config']['rank']}" if s["method"] == "temp-lora" else ""), ""]
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
        from .evaluate import perplexity
        import numpy as np

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
