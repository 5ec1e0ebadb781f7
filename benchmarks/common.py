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
from infinictx.report import atomic_write, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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

    from infinictx.fetch import cache_dir

    venv = cache_dir() / name
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *packages], check=True)
    return py


def machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}


def save(name: str, data: dict, markdown: str):
    data = {"benchmark": name, "machine": machine(), **data}
    write_json(data, RESULTS / f"{name}.json")
    atomic_write(RESULTS / f"{name}.md", markdown)
    print(markdown)
    print(f"wrote {RESULTS / name}.json and .md")


def dumps(x) -> str:
    return json.dumps(x, indent=2)
