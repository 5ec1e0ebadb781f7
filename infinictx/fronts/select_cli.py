"""`infinictx select`: choose a fraction of an instruction pool to train on (TAGCOS, or a baseline).

  infinictx select POOL.jsonl --out SUBSET.jsonl [--frac 0.05] [--method tagcos|random|kmeans-embed]
      [--clusters 20] [--features adam|sgd|sign] [--dim 8192] [--model M] [--cache FEATURES.pt]

POOL rows are JSON objects with string fields "prompt" and "answer" (other fields are kept). The subset is written
whole or not at all; its ids (row numbers in the pool) are printed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..core.errors import InfinictxError


def add_parser(sub):
    p = sub.add_parser("select", help="choose the part of an instruction pool that teaches the most (TAGCOS)")
    p.add_argument("pool", help="JSONL: one {\"prompt\": ..., \"answer\": ...} per line")
    p.add_argument("--out", required=True, help="the selected rows, JSONL")
    p.add_argument("--frac", type=float, default=0.05)
    p.add_argument("--method", default="tagcos", choices=["tagcos", "random", "kmeans-embed"])
    p.add_argument("--clusters", type=int, default=20, help="K-means clusters (1: OMP over the whole pool)")
    p.add_argument("--features", default="adam", choices=["adam", "sgd", "sign"])
    p.add_argument("--dim", type=int, default=8192, help="random projection size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="keep the gradient features here (a rerun reads them)")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--debug", action="store_true")


def read_pool(path: str) -> list[dict]:
    from ..data.texts import jsonl_rows

    rows = []
    for line, obj in jsonl_rows(Path(path)):
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("answer"), str):
            raise InfinictxError(f"{path}:{line}: a row needs string fields \"prompt\" and \"answer\"")
        rows.append(obj)
    if not rows:
        raise InfinictxError(f"{path} has no rows")
    return rows


def cmd_select(args) -> int:
    import torch
    from tqdm import tqdm

    from ..core.files import atomic_write
    from ..selection.coreset import SelectConfig, kmeans_nearest, pool_features, random_subset, tagcos

    rows = read_pool(args.pool)
    cfg = SelectConfig(frac=args.frac, clusters=args.clusters, features=args.features, dim=args.dim, seed=args.seed)
    if args.clusters > len(rows):
        raise InfinictxError(f"--clusters {args.clusters} is more than the pool's {len(rows)} rows")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method == "random":
        picked = random_subset(len(rows), cfg.frac, cfg.seed)
    elif args.method == "kmeans-embed":
        from ..methods.rag.retrievers import load_embedder

        emb = load_embedder(None, "cpu").encode([r["prompt"] + "\n" + r["answer"] for r in rows],
                                                convert_to_tensor=True, normalize_embeddings=True)
        picked = kmeans_nearest(emb.cpu(), cfg.frac, cfg.clusters, cfg.seed)
    else:
        from ..core.models import load_model

        lm = load_model(args.model, device=args.device)
        with tqdm(total=len(rows) * cfg.checkpoints, unit="ex", desc="gradient features", file=sys.stderr) as bar:
            feats, _ = pool_features(lm.model, lm.tokenizer, rows, cfg, cache=Path(args.cache) if args.cache else None,
                                     progress=bar.update)
        picked = tagcos(feats, cfg.frac, cfg.clusters, cfg.seed, cfg.lam)
    atomic_write(args.out, "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in picked))
    print(json.dumps({"method": args.method, "selected": len(picked), "pool": len(rows), "ids": picked}))
    return 0
