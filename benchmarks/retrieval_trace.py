"""Where a memory retrieval trial looks: for chosen trials of a `passkey --method memory` result (JSON or its
.partial.json), rerun the prompt exactly as the run did and trace, at the last prompt token (the one whose logits
give the answer's first token), every memory layer: how many query heads hold a needle token among their top-k
memory entries, the best needle rank, and the largest share of a head's attention that lands on the needle. So
a miss can be pinned on a layer (the needle not retrieved) or on what comes after (retrieved, not copied).

  .venv/bin/python benchmarks/retrieval_trace.py --json benchmarks/results/passkey_long_fot.json [--trials misses]

Writes benchmarks/results/<json stem>_trace.{json,md}. One trial costs one prompt read (a 32K prompt: ~4 min)."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import save  # noqa: E402

from infinictx import InfinictxError, load_model  # noqa: E402
from infinictx.core.registry import method_config  # noqa: E402
from infinictx.tasks.retrieval import TRIAL_BUILDERS, answer_of, ask  # noqa: E402


class LastTokenTrace:
    """A memory session's `on_lookup` observer: for each memory layer's lookup it looks at the last query row
    only, with plain exact arithmetic independent of the session's kernel, and keeps each layer's latest look."""

    def __init__(self, needle: range, topk: int):
        self.needle, self.topk = needle, topk
        self.latest: dict[int, dict] = {}
        self.recording = True

    def __call__(self, layer, q, k, q_mem, memory, scale):
        if self.recording:
            self.latest[layer] = self._look(q, k, q_mem, memory, scale)

    @torch.no_grad()
    def _look(self, q, k, q_mem, memory, scale) -> dict:
        Hq, Hkv = q.shape[1], k.shape[1]
        g = Hq // Hkv
        keys = memory.keys()[0].float()
        lo, hi = self.needle.start, self.needle.stop
        in_memory = max(0, min(hi, len(memory)) - lo)
        heads = []
        for h in range(Hq):
            s_mem = (keys[h // g] @ q_mem[0, h, -1].float()) * scale
            s_loc = (k[0, h // g].float() @ q[0, h, -1].float()) * scale    # the last query sees every local key
            kk = min(self.topk, len(s_mem))
            top_vals, top_idx = s_mem.topk(kk)
            p = torch.softmax(torch.cat([top_vals, s_loc]), dim=0)
            on_needle = (top_idx >= lo) & (top_idx < hi)
            best = float(s_mem[lo:min(hi, len(s_mem))].max()) if in_memory else None
            heads.append({"in_topk": bool(on_needle.any()), "mass": float(p[:kk][on_needle].sum()),
                          "rank": int((s_mem > best).sum()) if best is not None else None})
        return {"memory_entries": len(memory), "needle_in_memory": in_memory, "heads": heads}


def trace_trial(lm, config, trial, tokenizer) -> dict:
    session = config.make_session(lm)
    tracer = LastTokenTrace(trial.needle, config.topk)
    session.on_lookup = tracer
    real_generate = session.generate_chunk

    def generate(*args, **kwargs):   # the prompt is in: keep its last forward's looks
        tracer.recording = False
        return real_generate(*args, **kwargs)

    session.generate_chunk = generate
    layers = sorted(session.memory)
    with session:
        out, _ = ask(session, trial.ids, question_at=trial.question_start)
    text = tokenizer.decode(out.tolist()).strip()
    rows = []
    for layer in layers:
        # a layer whose memory was still empty at the last prompt token made no lookup: the needle is local
        call = tracer.latest.get(layer, {"memory_entries": 0, "needle_in_memory": 0, "heads": []})
        ranks = [h["rank"] for h in call["heads"] if h["rank"] is not None]
        rows.append({"layer": layer, "heads_with_needle": sum(h["in_topk"] for h in call["heads"]),
                     "heads": len(call["heads"]), "max_mass": round(max((h["mass"] for h in call["heads"]),
                                                                        default=0.0), 4),
                     "best_rank": min(ranks) if ranks else None, "needle_in_memory": call["needle_in_memory"],
                     "memory_entries": call["memory_entries"]})
    return {"depth": trial.depth, "needle_at": trial.needle_at, "answer": trial.answer, "output": text[:40],
            "ok": answer_of(text) == trial.answer, "layers": rows}


def markdown(result: dict) -> str:
    lines = [f"## Memory trace of {result['source']} ({result['task']}, {result['length']:,} tokens, top-"
             f"{result['topk']})", "",
             "Per memory layer, at the last prompt token: query heads with a needle token in their top-k / heads, "
             "the largest attention share on the needle (%), the best needle rank among all memory entries.", ""]
    for t in result["trials"]:
        lines.append(f"- depth {t['depth']:.2f}, needle at token {t['needle_at']:,}, expected {t['answer']}, got "
                     f"“{t['output']}” ({'hit' if t['ok'] else 'miss'})".replace("\n", "⏎"))
    lines += ["", "| layer | " + " | ".join(f"d={t['depth']:.2f}" for t in result["trials"]) + " |",
              "|---|" + "---|" * len(result["trials"])]
    for j, layer in enumerate(row["layer"] for row in result["trials"][0]["layers"]):
        cells = []
        for t in result["trials"]:
            r = t["layers"][j]
            cells.append("local" if not r["needle_in_memory"] else
                         f"{r['heads_with_needle']}/{r['heads']}, {100 * r['max_mass']:.0f}%, #{r['best_rank']}")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="a memory retrieval result (or its .partial.json)")
    ap.add_argument("--length", type=int, default=None, help="which length (default: the first)")
    ap.add_argument("--trials", default="misses", help="'misses', 'all' or trial numbers, e.g. 0,19")
    ap.add_argument("--model", default=None, help="the model (default: the result's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="result name under results/ (default: <json stem>_trace)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    src = json.loads(Path(a.json).read_text())
    if src.get("method") != "memory":
        raise InfinictxError(f"{a.json} is a {src.get('method')!r} result; the trace reads memory runs")
    row = next((r for r in src["results"] if a.length in (None, r["length"])), None)
    if row is None:
        raise InfinictxError(f"{a.json} has no results at length {a.length}")
    n = len(row["per_trial"])
    if a.trials == "misses":
        picked = [t for t, r in enumerate(row["per_trial"]) if r is not None and not r["ok"]]
    elif a.trials == "all":
        picked = [t for t, r in enumerate(row["per_trial"]) if r is not None]
    else:
        picked = [int(x) for x in a.trials.split(",")]
    if not picked:
        raise InfinictxError("no trials to trace (no misses?): give --trials all or trial numbers")
    lm = load_model(a.model or src["model"])
    if src.get("weights") and lm.fingerprint[:16] != src["weights"]:
        raise InfinictxError(f"{a.json} was measured with other weights of {src['model']!r}")
    config = method_config("memory", **src["config"])
    rng = random.Random(f"{src['seed']}-{src['task']}-{row['length']}")
    depths = [t / (n - 1) if n > 1 else 0.5 for t in range(n)]
    built = [TRIAL_BUILDERS[src["task"]](lm.tokenizer, row["length"], d, rng) for d in depths]
    trials = []
    for t in picked:
        print(f"trial {t} (depth {depths[t]:.2f}) ...", flush=True)
        trials.append({"trial": t, **trace_trial(lm, config, built[t], lm.tokenizer)})
    result = {"source": Path(a.json).name, "task": src["task"], "length": row["length"], "topk": config.topk,
              "config": src["config"], "model": src["model"], "trials": trials}
    save(a.out or Path(a.json).name.split(".")[0] + "_trace", result, markdown(result))


if __name__ == "__main__":
    try:
        main()
    except InfinictxError as exc:
        sys.exit(f"retrieval_trace: error: {exc}")
