"""TAGCOS on this CPU (issue 22): does a 5% coreset chosen from gradients teach SmolLM2-135M-Instruct as much as
the whole instruction pool, and more than other 5% choices?

The pool: `infinictx.data.instructions` (7 families, unbalanced, 10% near-duplicates, 5% wrong answers; cloze
from the project's Shakespeare/Milton corpus, translation from the CUV/KJV Bible), 100 clean test examples per
family. Every subset is trained with the same recipe (`training/instruct.py`: LoRA r=8 on every linear layer,
4 epochs, lr 2e-4, batches of 8) and evaluated by exact match and answer NLL per family.

Subsets: the base model (no tuning), the full pool, random 5% (3 seeds), K-means on sentence embeddings 5%,
TAGCOS 5% (Adam features, D=8192, K=20; a warm-up LoRA on q/v, 1 epoch on a random 5%, 3 checkpoints in it), and
the ablations: no clustering (K=1), SGD features (no Adam normalisation), D=512, and a warm-up as long as the recipe
(4 epochs, a checkpoint per epoch, as LESS). Variants with the same warm-up get their features from the same
per-example gradients. Each result is cached under the work folder: a rerun continues with the missing ones.

  .venv/bin/python benchmarks/tagcos.py [--pool 3000] [--runs base,full,random,kmeans,tagcos,...] [--threads 2]
      [--dtype float32|bfloat16] [--noise 0.05] [--pool-file POOL.json]
Runs `scale-10,scale-20,scale-50` (random 10/20/50%) and the oracles `clean-5,balanced-5` (5% picked with the pool's
labels: only right answers without near-duplicates; equal rows per family) only when named. Another dtype or noise
share works in its own folder and writes its own results (tagcos_bfloat16, tagcos_noise30, ...). `--pool-file` runs
the same comparison on a pool of one's own (real instruction data; the format in `pool_from_file`)."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from common import save

from infinictx.data.fetch import cache_dir

WORK = cache_dir() / "tagcos"
SMOKE = False   # --smoke: a sliver of everything, to check the pipeline (results not written under results/)
RUNS = ["base", "random-0", "random-1", "random-2", "kmeans", "tagcos", "tagcos-global", "tagcos-sgd",
        "tagcos-d512", "tagcos-warmup4", "full"]
# random subsets larger than 5% (seed 0), run only when named: how the random curve climbs to the full pool, so how
# much a better 5% could be worth
SCALE = ["scale-10", "scale-20", "scale-50"]
# oracle 5% subsets, run only when named: they read the pool's labels, which no selection method sees. clean-5: a
# random 5% of the rows with a right answer and no near-duplicate (what perfect de-noising could give); balanced-5:
# the same number of rows from every family (the test average weighs families equally, the pool does not)
ORACLE = ["clean-5", "balanced-5"]
NOISE = 0.05   # the pool's share of wrong answers (--noise)
# tagcos-warmup4: the warm-up as long as the recipe (4 epochs on its 5%, a checkpoint per epoch, as LESS does);
# the default warm-up is 1 epoch with 3 checkpoints in it
TAGCOS_VARIANTS = {"tagcos": {}, "tagcos-global": {"clusters": 1}, "tagcos-sgd": {"features": "sgd"},
                   "tagcos-d512": {"dim": 512}, "tagcos-warmup4": {"warmup_epochs": 4.0, "checkpoints": 4}}


def pool(size: int, noise: float = NOISE):
    from infinictx.data.instructions import build_pool
    from infinictx.data.texts import training_corpus

    path = WORK / f"pool-{size}.json"
    if path.exists():
        return json.loads(path.read_text())
    bible = []
    try:
        from infinictx.data.parallel import bible_book

        for book in ("Genesis", "Ruth", "John"):
            bible += [(p.src, p.ref) for chunk in bible_book(book).chunks for p in chunk]
    except Exception as exc:   # the translation family is left out without the Bible
        print(f"no translation family: {exc}")
    texts = [t for _, t in training_corpus()]
    built = build_pool(size=size, test_per_family=3 if SMOKE else 100, texts=texts, bible=bible, noise_rate=noise,
                       seed=0)
    out = {"train": built.train, "test": built.test, "makeup": built.makeup}
    WORK.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, ensure_ascii=False))
    return out


def pool_from_file(path: str) -> tuple[dict, str]:
    """A pool of one's own (real instruction data, say): JSON {"train": [rows], "test": {family: [rows]}}, a row
    {"prompt", "answer"} plus "family" in train (the families of test); train rows may also carry "noisy" (a wrong
    answer) and "duplicate_of" (an id), for the makeup tables and the clean-5 oracle. Returns the pool and a name
    for its work folder and results (the file's stem and a digest of its content)."""
    import hashlib
    from pathlib import Path

    from infinictx.data.instructions import pool_makeup

    def bad(why: str):
        raise SystemExit(f"tagcos: {path}: {why}")

    try:
        raw = Path(path).read_bytes()
        data = json.loads(raw.decode("utf-8"))
        train, test = data["train"], data["test"]
    except OSError as exc:
        bad(f"cannot read it ({exc.strerror})")
    except (UnicodeDecodeError, ValueError):
        bad("not UTF-8 JSON")
    except (KeyError, TypeError):
        bad('expected {"train": [rows], "test": {family: [rows]}}')
    if not isinstance(train, list) or not train or not isinstance(test, dict) or not test:
        bad('expected a non-empty "train" list and a non-empty "test" {family: [rows]}')

    def row_ok(r, *keys) -> bool:
        return isinstance(r, dict) and all(isinstance(r.get(k), str) and r[k].strip() for k in keys)

    if not all(row_ok(r, "prompt", "answer", "family") for r in train):
        bad('every train row needs non-empty "prompt", "answer" and "family" strings')
    if not all(isinstance(rows, list) and rows and all(row_ok(r, "prompt", "answer") for r in rows)
               for rows in test.values()):
        bad('every test family needs a non-empty list of rows with "prompt" and "answer"')
    if {r["family"] for r in train} - set(test):
        bad(f"train families without a test set: {sorted({r['family'] for r in train} - set(test))}")
    train = [{"noisy": False, "duplicate_of": None, **r} for r in train]
    name = f"{Path(path).stem}-{hashlib.sha256(raw).hexdigest()[:8]}"
    return {"train": train, "test": test, "makeup": pool_makeup(train, test)}, name


def subset(name: str, data: dict, lm) -> tuple[list[int] | None, dict]:
    """The rows a run trains on (None: no training) and what choosing them cost."""
    from infinictx.selection.coreset import (
        SelectConfig,
        kmeans_nearest,
        pool_features,
        random_subset,
        tagcos,
        warmup_key,
    )

    rows, n = data["train"], len(data["train"])
    t0 = time.perf_counter()
    if name == "base":
        return None, {}
    if name == "full":
        return list(range(n)), {}
    if name.startswith("random-"):
        return random_subset(n, 0.05, int(name.split("-")[1])), {}
    if name in SCALE:
        return random_subset(n, int(name.split("-")[1]) / 100, 0), {}
    if name == "clean-5":
        clean = [i for i, r in enumerate(rows) if not r["noisy"] and r["duplicate_of"] is None]
        return sorted(clean[i] for i in random_subset(len(clean), round(0.05 * n) / len(clean), 0)), {}
    if name == "balanced-5":
        families = sorted({r["family"] for r in rows})
        rng = np.random.default_rng(0)
        members = {f: [i for i, r in enumerate(rows) if r["family"] == f] for f in families}
        # equal shares, a family smaller than its share gives all it has and the rest goes to the others
        want, left = {}, round(0.05 * n)
        for k, f in enumerate(sorted(families, key=lambda f: len(members[f]))):
            want[f] = min(len(members[f]), left // (len(families) - k))
            left -= want[f]
        return sorted(int(i) for f in families for i in rng.choice(members[f], want[f], replace=False)), {}
    if name == "kmeans":
        from infinictx.methods.rag.retrievers import load_embedder

        emb = load_embedder(None, "cpu").encode([r["prompt"] + "\n" + r["answer"] for r in rows],
                                                convert_to_tensor=True, normalize_embeddings=True)
        return kmeans_nearest(emb.cpu(), 0.05, 20), {"select_s": round(time.perf_counter() - t0, 1)}

    def config(variant: str) -> SelectConfig:
        settings = TAGCOS_VARIANTS[variant]
        smoke = {"dim": settings.get("dim", 256) // 2, "clusters": min(settings.get("clusters", 20), 3)}
        return SelectConfig(**{**settings, **(smoke if SMOKE else {})})

    def features_file(c: SelectConfig):
        return WORK / f"features-{c.features}-d{c.dim}-warmup{c.warmup_epochs:g}x{c.checkpoints}.pt"

    cfg = config(name)
    # variants with the same warm-up differ only after the per-example gradients: compute their features together
    also = {features_file(c): c for c in map(config, TAGCOS_VARIANTS) if warmup_key(c) == warmup_key(cfg)}
    done = [0]

    def progress(k):
        done[0] += k
        if done[0] % 400 < k:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: features {done[0]}/{n * cfg.checkpoints}", flush=True)

    feats, record = pool_features(lm.model, lm.tokenizer, rows, cfg, cache=features_file(cfg), progress=progress,
                                  also=also)
    picked = tagcos(feats, cfg.frac, cfg.clusters, cfg.seed, cfg.lam)
    return picked, {**record, "select_s": round(time.perf_counter() - t0, 1)}


def run(name: str, data: dict, lm) -> dict:
    from infinictx import weights_fingerprint
    from infinictx.training.instruct import InstructConfig, evaluate, finetune

    path = WORK / f"run-{name}-{len(data['train'])}.json"
    dtype = str(lm.dtype).removeprefix("torch.")
    if path.exists():
        out = json.loads(path.read_text())
        if out.get("dtype", "float32") != dtype:   # the files written before runs recorded it were all float32
            raise SystemExit(f"tagcos: {path} was run in {out.get('dtype', 'float32')}, this run in {dtype}")
        return out
    before = weights_fingerprint(lm.model)
    picked, cost = subset(name, data, lm)
    t0 = time.perf_counter()
    if picked is None:
        scores, record = evaluate(lm.model, lm.tokenizer, data["test"]), {}
    else:
        rows = [data["train"][i] for i in picked]
        last = [0.0]

        def progress(step, total, loss):
            if time.time() - last[0] > 120 or step == total:
                last[0] = time.time()
                print(f"[{time.strftime('%H:%M:%S')}] {name}: step {step}/{total} loss {loss:.3f}", flush=True)

        recipe = InstructConfig(epochs=1) if SMOKE else InstructConfig()
        model, record, _ = finetune(lm.model, lm.tokenizer, rows, recipe, progress=progress)
        record["train_s"] = round(time.perf_counter() - t0, 1)
        scores = evaluate(model, lm.tokenizer, data["test"])
        model.unload()
        picked_rows = [data["train"][i] for i in picked]
        record["makeup"] = {f: sum(r["family"] == f for r in picked_rows) for f in data["test"]}
        record["noisy"] = sum(r["noisy"] for r in picked_rows)
        record["duplicates"] = sum(r["duplicate_of"] is not None for r in picked_rows)
    assert weights_fingerprint(lm.model) == before, "a run changed the base weights"
    out = {"name": name, "dtype": dtype, "scores": scores, "record": record, "cost": cost, "ids": picked}
    path.write_text(json.dumps(out))
    return out


def bootstrap_gaps(runs: dict, samples: int = 2000, seed: int = 0) -> dict:
    """For every chosen 5% (TAGCOS, its ablations, K-means): how much of the random-5% → full gap it closes in
    average exact match (the mean of the family rates), with a 95% paired bootstrap interval: test examples
    resampled per family, the same draw for every run. Random is the mean of its seeds."""
    rand_runs = [r for r in runs if r.startswith("random-")]
    chosen = [r for r in runs if r not in ("base", "full") and r not in rand_runs]
    if "full" not in runs or not rand_runs or not chosen:
        return {}
    names = ["full", *rand_runs, *chosen]
    fams = [f for f in runs["full"]["scores"] if f != "average"]
    correct = {r: {f: np.array(runs[r]["scores"][f]["correct"], dtype=float) for f in fams} for r in names}

    def closed(pick) -> dict:
        avg = {r: np.mean([correct[r][f][pick[f]].mean() for f in fams]) for r in names}
        rand = np.mean([avg[r] for r in rand_runs])
        gap = avg["full"] - rand
        return {"avg": avg, "rand": rand,
                "closed": {c: (avg[c] - rand) / gap if gap > 0 else float("nan") for c in chosen}}

    whole = {f: np.arange(len(correct["full"][f])) for f in fams}
    point = closed(whole)
    rng = np.random.default_rng(seed)
    draws = [closed({f: rng.integers(0, len(whole[f]), len(whole[f])) for f in fams})["closed"]
             for _ in range(samples)]
    # the same share in average answer NLL (point estimate: the family means are what every run stored)
    nll = {r: runs[r]["scores"]["average"]["nll"] for r in names}
    rand_nll = float(np.mean([nll[r] for r in rand_runs]))
    out = {}
    for c in chosen:
        d = np.array([x[c] for x in draws if np.isfinite(x[c])])
        ci = [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))] if len(d) else [None, None]
        out[c] = {"random_avg": float(point["rand"]), "full_avg": float(point["avg"]["full"]),
                  "avg": float(point["avg"][c]), "fraction_closed": float(point["closed"][c]), "ci95": ci,
                  "bootstrap_samples": int(len(d)), "random_nll": rand_nll, "full_nll": nll["full"], "nll": nll[c],
                  "nll_fraction_closed": (rand_nll - nll[c]) / (rand_nll - nll["full"])
                  if rand_nll > nll["full"] else float("nan")}
    return out


def feature_diagnostics(data: dict) -> dict:
    """How much the stored gradient features of each kind say about single examples: the mean cosine of an
    example's feature to its family's mean feature (near 1: most of each feature is shared), and how well that
    cosine tells a right answer from a wrong one (ROC AUC over the pool, clean above noisy; 0.5: not at all)."""
    from sklearn.metrics import roc_auc_score

    rows = data["train"]
    fam = np.array([r["family"] for r in rows])
    noisy = np.array([bool(r["noisy"]) for r in rows])
    out = {}
    for path in sorted(WORK.glob("features-*.pt")):
        saved = torch.load(path, weights_only=False)
        if saved["rows"] != len(rows):
            continue
        F = saved["features"].double()
        F = F / F.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = np.zeros(len(rows))
        for f in set(fam):
            sel = np.flatnonzero(fam == f)
            mean = F[sel].mean(0)
            cos[sel] = (F[sel] @ (mean / mean.norm())).numpy()
        out[path.stem.removeprefix("features-")] = {
            "cos_to_family_mean": float(cos.mean()),
            "noisy_auc": float(roc_auc_score(~noisy, cos)) if 0 < noisy.sum() < len(rows) else None}
    return out


def markdown(out: dict) -> str:
    runs = out["runs"]
    fams = list(out["makeup"])
    lines = ["# TAGCOS: 5% of an instruction pool chosen from gradients (SmolLM2-135M-Instruct, LoRA, "
             f"{out.get('dtype', 'float32')} base)", "",
             f"Pool {out['pool']} examples: " + ", ".join(f"{f} {m['pool']} ({m['noisy']} noisy, {m['duplicates']} "
                                                           f"near-duplicates)" for f, m in out["makeup"].items())
             + f". Test: {', '.join(str(m['test']) for m in out['makeup'].values())} "
               f"{'clean ' if out.get('noise') is not None else ''}examples per family (exact match of the greedy "
               "answer).",
             "", "| run | examples | " + " | ".join(fams) + " | average exact | average NLL | select s | train s |",
             "|---|---|" + "---|" * (len(fams) + 4)]
    for name, r in runs.items():
        s = r["scores"]
        n = len(r["ids"]) if r["ids"] is not None else 0
        lines.append(f"| {name} | {n} | " + " | ".join(f"{s[f]['exact']:.2f}" for f in fams)
                     + f" | {s['average']['exact']:.3f} | {s['average']['nll']:.3f} | {r['cost'].get('select_s', '')}"
                       f" | {r['record'].get('train_s', '')} |")
    gaps = out.get("gaps") or {}
    if gaps:
        first = next(iter(gaps.values()))
        seeds = sum(r.startswith("random-") for r in runs)
        lines += ["", "Share of the random-5% → full gap closed in average exact match (random "
                  f"{first['random_avg']:.3f}, the mean of {seeds} seeds; full {first['full_avg']:.3f}; 95% paired "
                  "bootstrap over test examples), and in average answer NLL (random "
                  f"{first['random_nll']:.3f}, full {first['full_nll']:.3f}; point estimate):", "",
                  "| run | average exact | gap closed (exact) | 95% CI | average NLL | gap closed (NLL) |",
                  "|---|---|---|---|---|---|"]
        for name, g in gaps.items():
            lo, hi = g["ci95"]
            ci = f"{lo:.2f} … {hi:.2f}" if lo is not None else "–"
            label = f"{name} (oracle)" if name in ORACLE else name
            lines.append(f"| {label} | {g['avg']:.3f} | {g['fraction_closed']:.2f} | {ci} | {g['nll']:.3f} | "
                         f"{g['nll_fraction_closed']:.2f} |")
    picked = {n: r for n, r in runs.items() if r["ids"] is not None and n != "full" and n not in SCALE}
    if picked:
        lines += ["", "What each 5% holds (examples per family; noisy answers; near-duplicates):", "",
                  "| run | " + " | ".join(fams) + " | noisy | near-duplicates |", "|---|" + "---|" * (len(fams) + 2)]
        share = {f: m["pool"] / out["pool"] for f, m in out["makeup"].items()}
        for n, r in picked.items():
            lines.append(f"| {n} | " + " | ".join(str(r["record"]["makeup"].get(f, 0)) for f in fams)
                         + f" | {r['record']['noisy']} | {r['record']['duplicates']} |")
        k = len(next(iter(picked.values()))["ids"])
        lines.append("| (pool share × " + str(k) + ") | " + " | ".join(f"{share[f] * k:.0f}" for f in fams)
                     + f" | {sum(m['noisy'] for m in out['makeup'].values()) / out['pool'] * k:.0f}"
                       f" | {sum(m['duplicates'] for m in out['makeup'].values()) / out['pool'] * k:.0f} |")
    feats = next((r["cost"] for n, r in runs.items() if n.startswith("tagcos") and "feature_seconds" in r["cost"]),
                 None)
    if feats:
        lines += ["", f"Selection cost: the warm-up LoRA ({feats['warmup']['examples']} examples, "
                  f"{feats['warmup']['steps']} steps, checkpoints at steps {feats['warmup']['checkpoints']}) took "
                  f"{feats['warmup']['seconds'] / 60:.1f} min; the per-example gradients of the pool at "
                  f"{len(feats['warmup']['lrs'])} checkpoints ({feats['grad_dim']:,} LoRA parameters), projected, "
                  f"{feats['feature_seconds'] / 60:.1f} min for the {feats.get('computed_together', 1)} feature sets "
                  "together (Adam D=8192, SGD D=8192, Adam D=512: one backward pass per example serves all). "
                  "OMP and K-means take seconds (select s of the variants that read the stored features)."]
        for n, r in runs.items():   # variants with a warm-up of their own: their cost said apart
            w = r["cost"].get("warmup") if n.startswith("tagcos") else None
            if w and w["checkpoints"] != feats["warmup"]["checkpoints"]:
                lines[-1] += (f" {n}: its own warm-up ({w['steps']} steps, loss {w['loss_first']:.2f} → "
                              f"{w['loss_last']:.2f}, checkpoints at steps {w['checkpoints']}) took "
                              f"{w['seconds'] / 60:.1f} min, and the gradients at {len(w['lrs'])} checkpoints "
                              f"{r['cost']['feature_seconds'] / 60:.1f} min.")
    diag = out.get("feature_diagnostics") or {}
    if diag:
        lines += ["", "What the gradient features say about single examples (every stored feature kind, named "
                  "kind-dim-warm-up): the mean cosine of an example's feature to its family's mean (near 1: most of "
                  "each feature is shared, for Adam features the warm-up's momentum β1·m, and the example's own "
                  "part is small), and how well that cosine ranks right answers above wrong ones (ROC AUC over the "
                  "pool; 0.5: no signal):", "",
                  "| features | cosine to family mean | clean-vs-noisy AUC |", "|---|---|---|"]
        for k, d in diag.items():
            auc = f"{d['noisy_auc']:.2f}" if d["noisy_auc"] is not None else "–"
            lines.append(f"| {k} | {d['cos_to_family_mean']:.3f} | {auc} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, help="the built pool's size (default 3000)")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    # the cached runs are compared with each other: one dtype for all of them (the committed ones are fp32; run
    # files record it, and a run file of another dtype is refused); another dtype gets a work folder of its own
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--noise", type=float, help=f"the built pool's share of wrong answers (default {NOISE})")
    ap.add_argument("--pool-file", help="a pool of one's own instead of the built one (JSON: see pool_from_file)")
    args = ap.parse_args()
    if args.pool_file and (args.pool is not None or args.noise is not None):   # they describe the built pool
        raise SystemExit("tagcos: --pool and --noise shape the built pool; a --pool-file comes as it is")
    args.pool = 3000 if args.pool is None else args.pool
    args.noise = NOISE if args.noise is None else args.noise
    if not 0 <= args.noise < 1:
        raise SystemExit("tagcos: --noise must be in [0, 1)")
    global WORK, SMOKE
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    if args.pool_file:   # a pool of one's own: its own work folder and results
        data, name = pool_from_file(args.pool_file)
        suffix += f"_{name}"
    elif args.noise != NOISE:   # another pool: its own work folder and results
        suffix += f"_noise{round(args.noise * 100)}"
    SMOKE = args.smoke
    WORK = cache_dir() / ("tagcos" + ("_smoke" if SMOKE else "") + suffix)
    WORK.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    from infinictx import load_model

    if not args.pool_file:
        data = pool(args.pool, args.noise)
    lm = load_model(None, dtype=args.dtype)
    runs = {}
    seen_features, diagnostics = None, {}
    for name in args.runs.split(","):
        if name not in RUNS + SCALE + ORACLE:
            raise SystemExit(f"unknown run {name!r}; choose from {', '.join(RUNS + SCALE + ORACLE)}")
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        runs[name] = run(name, data, lm)
        out = {"pool": len(data["train"]), "noise": None if args.pool_file else args.noise,
               "makeup": data["makeup"], "dtype": args.dtype, "runs": runs}
        out["gaps"] = bootstrap_gaps(runs)
        stored = tuple((p.name, p.stat().st_mtime) for p in sorted(WORK.glob("features-*.pt")))
        if stored != seen_features:   # read the feature files again only when a run wrote new ones
            seen_features, diagnostics = stored, feature_diagnostics(data)
        out["feature_diagnostics"] = diagnostics
        if SMOKE:
            print(markdown(out))
        else:
            save("tagcos" + suffix, out, markdown(out))


if __name__ == "__main__":
    main()
