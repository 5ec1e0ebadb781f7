"""The native top-k kernels of an earlier commit against the working tree's, in one process, on the same inputs.

Both libraries are built from source (the earlier one from `git show REV:infinictx/core/native.py`) and their
calls alternate in ABBA order, so the host's drift (20-50% within minutes here) cancels in the ratio. Also
torch.topk against the native top-k on short rows (memories of a few thousand entries).

Run alone:  .venv/bin/python benchmarks/native_ab.py [--rev HEAD~1] [--threads 2]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import time

import torch

from infinictx.core import native


def library_at(rev: str):
    """The native library built from `rev`'s source (cached like the working tree's)."""
    text = subprocess.run(["git", "show", f"{rev}:infinictx/core/native.py"], capture_output=True, text=True,
                          check=True).stdout
    source = re.search(r'SOURCE = r"""(.*?)"""', text, re.S).group(1)
    current = native.SOURCE
    native.SOURCE = source
    try:
        flags = native.FLAGS + (native.OPENMP_FLAGS if native.uses_openmp() else [])
        return native._load(native._compile(shutil.which("cc") or shutil.which("gcc"), flags))
    finally:
        native.SOURCE = current


def abba(libs: dict, f, reps: int = 20) -> dict:
    """Seconds per call of f under each library, calls alternating new, old, old, new, ..."""
    total = dict.fromkeys(libs, 0.0)
    for j in range(reps):
        name = "new" if j % 4 in (0, 3) else "old"
        native._lib = libs[name]
        t0 = time.perf_counter()
        f()
        total[name] += time.perf_counter() - t0
    native._lib = libs["new"]
    return {name: t / (reps // 2) for name, t in total.items()}


def best_of(f, repeats: int = 5) -> float:
    f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD~1", help="the earlier commit")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit("the native kernels are not available here (no C compiler)")
    libs = {"new": native._lib, "old": library_at(args.rev)}
    torch.manual_seed(0)
    print(f"top-k, k=128, 3 heads x 1,536 rows (a memory lookup's block), {args.rev} (old) vs the working tree (new)")
    for n in (4096, 8192, 16384, 32768):
        gaussian = torch.randn(1, 3, 1536, n)
        spiky = gaussian.clone()
        spiky[..., ::97] += 3.0   # a few large scores, as real text has
        for name, s in (("gaussian", gaussian), ("spiky", spiky)):
            t = abba(libs, lambda: native.topk_rows(s, 128))
            print(f"  {n:>6} keys {name:>8}: new/old {t['new'] / t['old']:.2f}  "
                  f"({1000 * t['new']:.1f} vs {1000 * t['old']:.1f} ms)", flush=True)
    print("short rows: torch.topk vs the native top-k (working tree), k=128, 3 x 1,536 rows")
    for n in (256, 1024, 2048, 4000):
        s = torch.randn(1, 3, 1536, n)
        t_torch, t_native = best_of(lambda: s.topk(128, dim=-1)), best_of(lambda: native.topk_rows(s, 128))
        print(f"  {n:>6} keys: torch {1000 * t_torch:.1f} ms, native {1000 * t_native:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
