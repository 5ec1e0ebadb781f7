"""Ray scaling on this machine (issue 19): the same `ppl --books` job on 4 short books, single-process and on Ray
with different worker × thread splits, then a simulated 2-node cluster and a killed worker; from the measured
per-book seconds, the wall time a PG19-size dataset (100 books) would take on 1, 8 and 64 workers.

Every job is one `infinictx` command (its own process, run alone); the results must equal the single-process
run's (per-book PPL to 1e-6).

Each finished job is kept in the cache folder, so an interrupted run continues where it stopped.

  .venv/bin/python benchmarks/ray_scale.py [--tokens 2048] [--books 4]"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import save

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"


def make_books(folder: Path, n: int, tokens: int) -> Path:
    """n books from the project's training corpus (public domain), each cut to about `tokens` tokens' worth."""
    sys.path.insert(0, str(ROOT))
    from infinictx.data.texts import training_corpus

    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, text) in enumerate(training_corpus()[:n]):
        (folder / f"{i:02d}-{name.replace('/', '-')}.txt").write_text(text[:tokens * 5])   # ~5 chars per token
    return folder


def job(books: Path, out: Path, threads: int | None = None, ray: list[str] | None = None,
        checkpoint: Path | None = None, kill_after: float | None = None) -> dict:
    cmd = [str(BIN / "infinictx"), "ppl", str(books), "--books", "all", "--method", "temp-lora", "-W", "512",
           "--json", str(out), "--no-progress", *(["--threads", str(threads)] if threads else []), *(ray or []),
           *(["--checkpoint", str(checkpoint)] if checkpoint else [])]
    done = out.with_suffix(".run.json")
    if done.exists():   # measured by an earlier, interrupted run of this benchmark
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    if kill_after is not None:   # kill one Ray worker (a process running the model) mid-job
        time.sleep(kill_after)
        workers = subprocess.run(["pgrep", "-f", "ray::_Worker"], capture_output=True, text=True).stdout.split()
        if workers:
            killed = int(workers[0])
            os.kill(killed, signal.SIGKILL)
    log, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"ray_scale: {' '.join(cmd)} failed:\n{log[-2000:]}")
    wall = time.perf_counter() - t0
    summary = json.loads(out.read_text())
    record = {"command": " ".join(["infinictx", *cmd[1:]]), "wall_s": round(wall, 1), "killed_pid": killed,
              "book_ppl": [b["ppl"] for b in summary["books"]], "book_s": [b["wall_s"] for b in summary["books"]],
              "ppl": summary["ppl"]}
    done.write_text(json.dumps(record))
    return record


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--books", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from infinictx.data.fetch import cache_dir

    work = cache_dir() / f"ray_scale-{a.books}x{a.tokens}"   # finished jobs are kept: a rerun continues
    work.mkdir(parents=True, exist_ok=True)
    books = make_books(work / "books", a.books, a.tokens)
    runs = {"single process, 2 threads": job(books, work / "single.json", threads=2),
            "Ray, 1 worker × 2 threads": job(books, work / "r12.json",
                                             ray=["--ray", "--workers", "1", "--threads-per-worker", "2"]),
            "Ray, 2 workers × 1 thread": job(books, work / "r21.json",
                                             ray=["--ray", "--workers", "2", "--threads-per-worker", "1"])}
    # a simulated cluster: a head and a second node on this machine, one CPU each (`ray start` refuses a second
    # node on one host; Ray's own test cluster starts a raylet per node), joined by address from the job
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        runs["2 Ray nodes × 1 worker × 1 thread (--address)"] = job(
            books, work / "nodes.json", ray=["--ray", "--address", cluster.address, "--workers", "2"])
    finally:
        cluster.shutdown()
    runs["Ray, 2 workers, one killed mid-job"] = job(
        books, work / "killed.json", ray=["--ray", "--workers", "2"], checkpoint=work / "ckpt",
        kill_after=runs["Ray, 2 workers × 1 thread"]["wall_s"] / 3)
    reference = runs["single process, 2 threads"]["book_ppl"]
    for r in runs.values():
        r["max_rel_diff"] = max(abs(x - y) / y for x, y in zip(r["book_ppl"], reference))
    per_book = sum(runs["Ray, 2 workers × 1 thread"]["book_s"]) / a.books   # one worker's seconds per book
    # PG19 test: 100 books of ~70K tokens; a book here has a.tokens tokens, and Temp-Lora's cost is linear in length
    pg19_book = per_book * 70_000 / a.tokens
    model = {w: round(pg19_book * -(-100 // w) / 3600, 1) for w in (1, 8, 64)}
    md = [f"## Ray: {a.books} books × {a.tokens} tokens, Temp-Lora W=512 (`ppl --books all`), this 2-core machine", "",
          "| job | wall s | max relative PPL difference to single-process |", "|---|---|---|"]
    md += [f"| {k} | {r['wall_s']:.0f} | {r['max_rel_diff']:.1e} |" for k, r in runs.items()]
    md += ["", f"Seconds per book on one 1-thread worker: {per_book:.0f}. A PG19 test book (~70K tokens) would take "
           f"~{pg19_book / 60:.0f} min on such a worker; 100 books on 1, 8, 64 workers (whole books per worker, no "
           f"other limit): {model[1]} h, {model[8]} h, {model[64]} h.", "",
           "What 2 cores allow: two 1-thread workers against one 2-thread process is the only split there is; a "
           "model this small does not keep 2 threads busy in one process, so the split shows whether Ray's overhead "
           "(start-up, one model per worker) pays; the simulated nodes show the job spreading over nodes, not a "
           "speed-up."]
    save("ray_scale", {"books": a.books, "tokens": a.tokens, "runs": runs, "pg19_hours": model}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
