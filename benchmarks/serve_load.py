"""`infinictx serve` under load (issue 20), against a real server process on 127.0.0.1 with the embedded model.

- isolation: 8 Temp-Lora sessions read 8 different texts at once; then every session scores every text on its own
  (`/score`: its adapter, no context): each adapter should lower the perplexity of its own text and leave the
  others' near the base model's; the base weights' hash is unchanged with the adapters alive and after.
- load: a bounded burst, 16 clients × (create + reads + generations + a describe) = 200 requests: latency p50/p95,
  requests/s, no 5xx, no lost read (every session's token count equals what its client sent); resident memory with
  no session, with 16 live Temp-Lora sessions, and after they are deleted.
- crash: 3 sessions read 6 pieces each (scored) on a server with --state-dir; the server is killed with SIGKILL
  in the middle of a read and started again; the clients retry with `offset` and finish. The per-piece
  perplexities must equal those of a server that was never killed.

Bounded and local: nothing listens beyond 127.0.0.1. Run alone (no other torch process).

  .venv/bin/python benchmarks/serve_load.py [--parts isolation,load,crash] [--threads 2]"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import save

ROOT = Path(__file__).resolve().parents[1]
KEY = {"Authorization": "Bearer bench"}


class Server:
    """`infinictx serve` as its own process on a free local port."""

    def __init__(self, threads: int, state_dir: Path | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [str(ROOT / ".venv" / "bin" / "infinictx"), "serve", "--port", str(self.port), "--api-key", "bench",
               "--threads", str(threads), "--max-sessions", "32", "--queue-size", "64", "--max-request-tokens",
               "8192"]
        if state_dir:
            cmd += ["--state-dir", str(state_dir)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 300
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/status", timeout=2).status_code == 200:
                    return
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {self.proc.stderr.read().decode()[-500:]}")
            time.sleep(0.3)
        self.kill()
        raise SystemExit("the server did not start in 300 s")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=KEY, timeout=1800)

    def memory_mib(self) -> dict:
        """Resident memory now and its peak so far (Linux /proc)."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = round(int(value.split()[0]) / 1024, 1)
        return {"rss_mib": fields["VmRSS"], "peak_rss_mib": fields["VmHWM"]}

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:   # a graceful stop waiting on a job in flight
            self.proc.kill()
            self.proc.wait()


def ok(r: httpx.Response) -> dict:
    if r.status_code != 200:
        raise SystemExit(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:300]}")
    return r.json()


def texts(n: int, chars: int) -> list[tuple[str, str]]:
    """n passages of the project's training corpus (public domain), `chars` characters each from a document's
    middle, each from a different document."""
    sys.path.insert(0, str(ROOT))
    from infinictx.data.texts import training_corpus

    docs = training_corpus()
    picked = [docs[i * len(docs) // n] for i in range(n)]
    out = []
    for name, text in picked:
        mid = len(text) // 2
        start = text.rfind("\n", 0, mid) + 1
        out.append((name, text[start:start + chars]))
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def isolation(threads: int) -> dict:
    passages = texts(8, 3000)
    settings = {"window": 512, "chunk": 128}
    server = Server(threads)
    try:
        with server.client() as c:
            sids = [ok(c.post("/v1/sessions", json={"method": "temp-lora", "settings": settings}))["id"]
                    for _ in passages]
            t0 = time.perf_counter()
            errors = []

            def read(sid, text):
                r = c.post(f"/v1/sessions/{sid}/read", json={"text": text})
                if r.status_code != 200:
                    errors.append(r.text)

            workers = [threading.Thread(target=read, args=(sid, text)) for sid, (_, text) in zip(sids, passages)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            read_s = time.perf_counter() - t0
            if errors:
                raise SystemExit(f"reads failed: {errors[0]}")
            alive = ok(c.get("/status", params={"weights": True}))["weights_unchanged"]
            base = [ok(c.post(f"/v1/sessions/{sids[0]}/score", json={"text": t, "base": True}))["ppl"]
                    for _, t in passages]
            ppl = [[ok(c.post(f"/v1/sessions/{sid}/score", json={"text": t}))["ppl"] for _, t in passages]
                   for sid in sids]
            tokens = [ok(c.get(f"/v1/sessions/{sid}"))["tokens"] for sid in sids]
            for sid in sids:
                ok(c.delete(f"/v1/sessions/{sid}"))
            after = ok(c.get("/status", params={"weights": True}))["weights_unchanged"]
    finally:
        server.kill(signal.SIGTERM)
    n = len(passages)
    own = [ppl[i][i] / base[i] for i in range(n)]
    other = [ppl[i][j] / base[j] for i in range(n) for j in range(n) if i != j]
    return {"texts": [name for name, _ in passages], "tokens": tokens, "settings": settings,
            "concurrent_read_s": round(read_s, 1), "base_ppl": base, "ppl": ppl,
            "own_ratio": own, "other_ratio_mean": statistics.mean(other), "other_ratio_min": min(other),
            "own_lowest_in_every_column": all(ppl[j][j] == min(ppl[i][j] for i in range(n)) for j in range(n)),
            "weights_unchanged_with_adapters": alive, "weights_unchanged_after": after}


def load(threads: int, clients: int = 16, requests: int = 200) -> dict:
    passages = texts(clients, 6000)
    settings = {"window": 128, "chunk": 64}   # a read of 250 characters is one chunk: one training step
    per_client = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    server = Server(threads)
    latencies: dict[str, list[float]] = {}
    statuses: dict[int, int] = {}
    expected, got = {}, {}
    lock = threading.Lock()
    try:
        memory = {"no_session": server.memory_mib()}
        with server.client() as c:
            def call(kind, method, path, **kw):
                t = time.perf_counter()
                r = c.request(method, path, **kw)
                with lock:
                    latencies.setdefault(kind, []).append(time.perf_counter() - t)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                return r

            def client(i):
                text, n = passages[i][1], per_client[i]
                r = call("create", "POST", "/v1/sessions", json={"method": "temp-lora", "settings": settings})
                if r.status_code != 200:
                    return
                sid, sent, pos = r.json()["id"], 0, 0
                for k in range(n - 2):   # create + ... + describe
                    if k % 4 == 3:
                        r = call("generate", "POST", f"/v1/sessions/{sid}/generate", json={"max_tokens": 8})
                        if r.status_code == 200:
                            sent += r.json()["tokens"]
                    else:
                        piece = text[pos:pos + 250]
                        pos += 250
                        r = call("read", "POST", f"/v1/sessions/{sid}/read", json={"text": piece})
                        if r.status_code == 200:
                            sent += r.json()["tokens_read"]
                r = call("describe", "GET", f"/v1/sessions/{sid}")
                with lock:
                    expected[sid] = sent
                    got[sid] = r.json()["tokens"] if r.status_code == 200 else None

            t0 = time.perf_counter()
            workers = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall = time.perf_counter() - t0
            memory["sessions_alive"] = server.memory_mib()
            for sid in list(expected):
                ok(c.delete(f"/v1/sessions/{sid}"))
            memory["after_delete"] = server.memory_mib()
            weights = ok(c.get("/status", params={"weights": True}))["weights_unchanged"]
    finally:
        server.kill(signal.SIGTERM)
    every = [x for v in latencies.values() for x in v]
    return {"clients": clients, "requests": sum(statuses.values()), "settings": settings, "wall_s": round(wall, 1),
            "requests_per_s": round(sum(statuses.values()) / wall, 2), "statuses": statuses,
            "server_errors": sum(n for s, n in statuses.items() if s >= 500),
            "latency_s": {k: {"n": len(v), "p50": round(pct(v, 0.5), 2), "p95": round(pct(v, 0.95), 2)}
                          for k, v in {"all": every, **latencies}.items()},
            "lost_reads": sum(1 for sid in expected if got[sid] != expected[sid]), "sessions": len(expected),
            "memory": memory, "mib_per_live_session": round((memory["sessions_alive"]["rss_mib"]
                                                             - memory["no_session"]["rss_mib"]) / clients, 1),
            "weights_unchanged": weights}


def crash(threads: int, pieces: int = 6) -> dict:
    passages = texts(3, 6 * 400)
    settings = {"window": 256, "chunk": 64}
    chunks = [[t[k * 400:(k + 1) * 400] for k in range(pieces)] for _, t in passages]

    def run(server: Server, sids, state, stop_at=None):
        """Read the remaining pieces of every session in turn (offset-checked); with `stop_at` = (session,
        piece), that read is sent in the background and the server is killed while it runs."""
        with server.client() as c:
            for k in range(pieces):
                for s, sid in enumerate(sids):
                    if state[s]["next"] > k:
                        continue
                    body = {"text": chunks[s][k], "score": True, "offset": state[s]["tokens"]}
                    if stop_at == (s, k):
                        def cut_off(path=f"/v1/sessions/{sid}/read", body=body):
                            with contextlib.suppress(httpx.HTTPError):
                                c.post(path, json=body)

                        threading.Thread(target=cut_off, daemon=True).start()
                        time.sleep(1.5)   # in the middle of the read (a Temp-Lora read of 400 chars takes longer)
                        server.kill()
                        return True
                    r = ok(c.post(f"/v1/sessions/{sid}/read", json=body))
                    state[s]["ppl"].append(r["ppl"])
                    state[s]["tokens"], state[s]["next"] = r["tokens"], k + 1
        return False

    def fresh_state():
        return [{"next": 0, "tokens": 0, "ppl": []} for _ in passages]

    reference = fresh_state()
    server = Server(threads)
    try:
        with server.client() as c:
            sids = [ok(c.post("/v1/sessions", json={"method": "temp-lora", "settings": settings}))["id"]
                    for _ in passages]
        t0 = time.perf_counter()
        run(server, sids, reference)
        uninterrupted_s = time.perf_counter() - t0
    finally:
        server.kill(signal.SIGTERM)

    with tempfile.TemporaryDirectory() as tmp:
        state = fresh_state()
        server = Server(threads, Path(tmp))
        with server.client() as c:
            sids = [ok(c.post("/v1/sessions", json={"method": "temp-lora", "settings": settings}))["id"]
                    for _ in passages]
        killed = run(server, sids, state, stop_at=(0, pieces // 2))
        t0 = time.perf_counter()
        server = Server(threads, Path(tmp))
        restart_s = time.perf_counter() - t0
        try:
            restored = ok(httpx.get(server.url + "/status")).get("restored")
            run(server, sids, state)
        finally:
            server.kill(signal.SIGTERM)
    diffs = [abs(a - b) / b for s in range(len(passages)) for a, b in zip(state[s]["ppl"], reference[s]["ppl"])]
    return {"sessions": len(passages), "pieces": pieces, "settings": settings, "killed_mid_read": killed,
            "restored": restored, "restart_s": round(restart_s, 1), "uninterrupted_s": round(uninterrupted_s, 1),
            "ppl_reference": [s["ppl"] for s in reference], "ppl_after_crash": [s["ppl"] for s in state],
            "tokens_equal": [s["tokens"] for s in state] == [s["tokens"] for s in reference],
            "max_relative_ppl_difference": max(diffs) if diffs else None}


def markdown(out: dict) -> str:
    lines = ["# infinictx serve under load (embedded model, one server process on 127.0.0.1)", ""]
    if "isolation" in out:
        r = out["isolation"]
        lines += ["## Isolation: 8 Temp-Lora sessions read 8 texts at once (W=512, Δ=128)", "",
                  f"Reads together: {r['concurrent_read_s']} s. Perplexity of each text read on its own by each "
                  "session's weights, as a ratio to the base model's:", "",
                  "| session \\ text | " + " | ".join(str(j) for j in range(len(r["texts"]))) + " |",
                  "|---|" + "---|" * len(r["texts"])]
        for i, row in enumerate(r["ppl"]):
            lines.append(f"| {i} | " + " | ".join(
                (f"**{p / b:.3f}**" if i == j else f"{p / b:.3f}") for j, (p, b) in enumerate(zip(row, r["base_ppl"])))
                + " |")
        lines += ["", f"Own text: ratio {min(r['own_ratio']):.3f}–{max(r['own_ratio']):.3f}; other texts: mean "
                  f"{r['other_ratio_mean']:.3f} (lowest {r['other_ratio_min']:.3f}). Own session lowest for every "
                  f"text: {r['own_lowest_in_every_column']}. Base weights unchanged with the adapters alive: "
                  f"{r['weights_unchanged_with_adapters']}, after: {r['weights_unchanged_after']}.", ""]
    if "load" in out:
        r = out["load"]
        lines += [f"## Load: {r['clients']} clients, {r['requests']} requests (Temp-Lora W={r['settings']['window']}, "
                  f"Δ={r['settings']['chunk']})", "",
                  f"{r['requests_per_s']} requests/s over {r['wall_s']} s; statuses {r['statuses']}; 5xx: "
                  f"{r['server_errors']}; lost reads: {r['lost_reads']} of {r['sessions']} sessions; base weights "
                  f"unchanged: {r['weights_unchanged']}.", "", "| requests | n | p50 s | p95 s |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['n']} | {v['p50']} | {v['p95']} |" for k, v in r["latency_s"].items()]
        m = r["memory"]
        lines += ["", f"Resident memory: {m['no_session']['rss_mib']} MiB with no session, "
                  f"{m['sessions_alive']['rss_mib']} MiB with {r['clients']} live sessions "
                  f"(≈ {r['mib_per_live_session']} MiB each), {m['after_delete']['rss_mib']} MiB after deleting "
                  f"them; peak {m['after_delete']['peak_rss_mib']} MiB.", ""]
    if "crash" in out:
        r = out["crash"]
        lines += [f"## Crash: SIGKILL in the middle of a read, restart on --state-dir ({r['sessions']} sessions × "
                  f"{r['pieces']} scored pieces)", "",
                  f"Killed mid-read: {r['killed_mid_read']}; sessions restored: {r['restored']} (restart "
                  f"{r['restart_s']} s); token counts equal to the uninterrupted run: {r['tokens_equal']}; largest "
                  f"relative difference of a piece's perplexity: {r['max_relative_ppl_difference']:.2e}.", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="isolation,load,crash")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out_path = ROOT / "benchmarks" / "results" / "serve_load.json"
    out = {}
    if out_path.exists():   # parts measured earlier are kept (a rerun of one part replaces only it)
        out = {k: v for k, v in json.loads(out_path.read_text()).items() if k in ("isolation", "load", "crash")}
    for part in args.parts.split(","):
        print(f"[{time.strftime('%H:%M:%S')}] {part}", flush=True)
        out[part] = {"isolation": isolation, "load": load, "crash": crash}[part](args.threads)
        save("serve_load", {"threads": args.threads, **out}, markdown(out))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
