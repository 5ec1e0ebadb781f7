"""Helpers shared by the benchmark scripts: load the embedded model and book once, write results as JSON and
Markdown under benchmarks/results/. Benchmarks must run alone (no other torch process): timings are compared
as ratios within one run."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infinictx import load_model, read_text  # noqa: E402
from infinictx.core.files import atomic_write, write_json  # noqa: E402
from infinictx.core.models import cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# KV-cache policy configurations by label (kv_policies.py, reproduce.py): registry specs, {W} = the scope;
# "label+tl" puts Temp-Lora on top (W = the scope, Δ = W/4)
KV_PRESETS = {
    "full": "full:chunk=512",
    "streaming": "streaming:window={W}",
    "longcache": "longcache:window={W}:select_dtype=bfloat16",
    "razor": "razor",
    "razor-paper": "razor:echo_ratio=0.01:keep_ratio=0.125",   # the paper's 14% + 1% heads, C = 8
    "razor-dense": "razor:prefill=dense",   # prompt read with full caches, compressed when it ends (paper, kvpress)
    "razor-mean": "razor:compensation=mean",   # the compensation token unweighted
    "razor-none": "razor:compensation=none",   # ... or left out
}


def kv_config(label: str, window: int = 1024):
    """The config a KV-policy label names (see KV_PRESETS)."""
    from infinictx.core.registry import method_from_spec

    name, _, extra = label.partition("+")
    if name not in KV_PRESETS or extra not in ("", "tl"):
        raise SystemExit(f"unknown config {label!r}; choose from {', '.join(KV_PRESETS)} (with +tl for Temp-Lora)")
    temp_lora = {"window": window, "chunk": window // 4} if extra == "tl" else None
    return method_from_spec(KV_PRESETS[name].format(W=window), temp_lora=temp_lora)


def setup(threads: int | None = None):
    if threads:
        torch.set_num_threads(threads)
    lm = load_model(None)
    text, name = read_text(None)
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return lm, ids, name


def venv_python(name: str, packages: list[str]) -> Path:
    """The python of a separate virtualenv in the cache (for a package whose pins clash with ours), created and
    filled with `packages` on first use. torch is pinned in `packages` by the caller (an unpinned one is CUDA)."""
    import subprocess

    from infinictx.data.fetch import cache_dir

    venv = cache_dir() / name
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *packages], check=True)
    return py


def run_cli(name: str, args: list[str], out: Path) -> dict | None:
    """One `infinictx ARGS --json OUT` command in its own process, so that its peak RSS is its own; skipped when
    OUT exists (a rerun continues a stopped command through the command's own resume: a partial JSON, a
    checkpoint). Returns OUT's summary with `peak_rss_mib` and `command`, or None if the command failed."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    cmd = [str(root / ".venv" / "bin" / "infinictx"), *args, "--json", str(out.relative_to(root)), "--no-progress"]
    rss_file = out.with_name(out.stem + ".rss.json")
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        log = proc.stdout.read()
        if status != 0:
            print(f"  failed: {log.strip().splitlines()[-1] if log.strip() else status}", flush=True)
            return None
        peak = usage.ru_maxrss / 1024   # KiB -> MiB (Linux)
        before = json.loads(rss_file.read_text())["peak_rss_mib"] if rss_file.exists() else 0
        # the CPU beside the peak: a table's cells can come from different machines (timings are per machine)
        rss_file.write_text(json.dumps({"peak_rss_mib": round(max(before, peak), 1), "cpu": cpu_name()}))
    return {**read_summary(out), "command": " ".join(["infinictx", *cmd[1:]])}


def read_summary(out: Path) -> dict:
    """A `run_cli` command's summary JSON with the peak RSS and CPU of its sidecar (None where not recorded)."""
    summary = json.loads(out.read_text())
    rss_file = out.with_name(out.stem + ".rss.json")
    side = json.loads(rss_file.read_text()) if rss_file.exists() else {}
    summary["peak_rss_mib"], summary["cpu"] = side.get("peak_rss_mib"), side.get("cpu")
    return summary


def machine() -> dict:
    # the CPU changes between machines (an Intel one with AMX, an AMD EPYC without): timings are per machine
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d")}


def measured_on(machines) -> str:
    """The Markdown line saying which machines (CPU, and dtype where it varies) measured a benchmark's cells:
    sessions resume on another CPU, and seconds compare only within one machine."""
    machines = list(machines)
    tail = " Seconds compare only between cells of one machine." if len(machines) > 1 else ""
    return "Measured on " + "; ".join(machines) + "." + tail


def save(name: str, data: dict, markdown: str):
    data = {"benchmark": name, "machine": machine(), **data}
    write_json(data, RESULTS / f"{name}.json")
    atomic_write(RESULTS / f"{name}.md", markdown)
    print(markdown)
    print(f"wrote {RESULTS / name}.json and .md")


def dumps(x) -> str:
    return json.dumps(x, indent=2)
