"""TAGCOS's selection (arXiv 2407.15235): cluster the examples' gradient features with K-means, then inside each
cluster pick, by OMP, the examples whose features best rebuild the cluster's mean; the budgets sum to exactly
frac · N. Also the baselines it is compared with: random, K-means on sentence embeddings (nearest to each
centroid), and OMP over the whole pool without clusters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import InfinictxError
from .omp import budgets, select_in_cluster


def kmeans(features: torch.Tensor, k: int, seed: int = 0) -> np.ndarray:
    from sklearn.cluster import KMeans

    if not 1 <= k <= len(features):
        raise InfinictxError(f"clusters must be between 1 and the number of examples ({len(features)}); got {k}")
    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(features.double().numpy())


def tagcos(features: torch.Tensor, frac: float, clusters: int, seed: int = 0, lam: float = 1.0) -> list[int]:
    """Indices of the selected examples (sorted), exactly round(frac · N) of them."""
    labels = kmeans(features, clusters, seed) if clusters > 1 else np.zeros(len(features), dtype=int)
    groups = [np.flatnonzero(labels == c) for c in range(clusters)]
    picked = []
    for members, budget in zip(groups, budgets([len(g) for g in groups], frac)):
        A = features[members]
        picked += [int(members[i]) for i in select_in_cluster(A, A.mean(0), budget, lam=lam)]
    return sorted(picked)


def random_subset(n: int, frac: float, seed: int = 0) -> list[int]:
    budgets([n], frac)   # the same check of frac
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, size=round(frac * n), replace=False).tolist())


def kmeans_nearest(embeddings: torch.Tensor, frac: float, clusters: int, seed: int = 0) -> list[int]:
    """Per cluster of sentence embeddings, its budget of examples nearest to the centroid."""
    labels = kmeans(embeddings, clusters, seed)
    picked = []
    groups = [np.flatnonzero(labels == c) for c in range(clusters)]
    for members, budget in zip(groups, budgets([len(g) for g in groups], frac)):
        E = embeddings[members].double()
        d = (E - E.mean(0)).norm(dim=1)
        picked += [int(members[i]) for i in d.argsort()[:budget].tolist()]
    return sorted(picked)


@dataclass
class SelectConfig:
    frac: float = 0.05
    clusters: int = 20               # 1: OMP over the whole pool (the no-clustering ablation)
    features: str = "adam"           # adam | sgd | sign
    dim: int = 8192                  # projection size D
    warmup_frac: float = 0.05        # the warm-up LoRA is trained on this random share of the pool
    warmup_epochs: float = 1.0
    warmup_modules: tuple[str, ...] = ("q_proj", "v_proj")   # the warm-up LoRA's layers: P, the gradient size,
    # sets the cost of the features (P × D per example to project); q and v keep it to ~0.5M on SmolLM2
    checkpoints: int = 3             # warm-up checkpoints whose features are averaged (weighted by lr)
    lam: float = 1.0                 # OMP's ridge
    batch: int = 16                  # examples per batched gradient
    seed: int = 0

    def __post_init__(self):
        budgets([1], self.frac)
        budgets([1], self.warmup_frac)
        if self.clusters < 1 or self.dim < 1 or self.checkpoints < 1 or self.batch < 1:
            raise InfinictxError("clusters, dim, checkpoints and batch must be >= 1")
        if self.features not in ("adam", "sgd", "sign"):
            raise InfinictxError(f"features must be adam, sgd or sign (got {self.features!r})")


def warmup_key(cfg: SelectConfig) -> dict:
    """The settings that decide the warm-up LoRA and its checkpoints: features that agree on them can be computed
    from the same per-example gradients."""
    from dataclasses import asdict

    return {k: v for k, v in asdict(cfg).items() if k not in ("frac", "clusters", "lam", "features", "dim")}


def pool_features(model, tokenizer, rows: list[dict], cfg: SelectConfig, instruct=None, cache: Path | None = None,
                  progress=None, also: dict[Path, SelectConfig] | None = None) -> tuple[torch.Tensor, dict]:
    """TAGCOS's features of every row: a warm-up LoRA on a random share of the pool, checkpoints through it, each
    checkpoint's projected (Adam-normalised) per-example gradients, averaged with the learning rates. Cached in
    `cache` (a rerun with the same settings reads them). `also` {cache path: config}: other feature kinds or sizes
    from the same warm-up, computed from the same gradients and saved to their paths (the ablations, nearly free)."""
    import hashlib
    import json
    import time
    from dataclasses import asdict

    from peft import set_peft_model_state_dict

    from ..training.instruct import InstructConfig, encode, finetune
    from .features import average_checkpoints, feature_sets, trainable
    from .projection import RademacherProjector

    # what else the features depend on: the rows themselves (not only their number), the model and its dtype (a
    # bf16 base gives other gradients)
    source = {"rows": hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16],
              "model": getattr(model.config, "_name_or_path", ""),
              "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}

    also = dict(also or {})
    if any(warmup_key(c) != warmup_key(cfg) for c in also.values()):
        raise InfinictxError("features computed together must share the warm-up (only features and dim may differ)")
    instruct = instruct or InstructConfig(epochs=cfg.warmup_epochs, seed=cfg.seed, modules=cfg.warmup_modules)

    # the warm-up recipe decides the checkpoints, so the features: a caller's own recipe is part of the key
    def key_of(c: SelectConfig) -> dict:
        return {**{k: v for k, v in asdict(c).items() if k not in ("frac", "clusters", "lam")}, **source,
                "warmup_recipe": asdict(instruct)}

    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=False)
        if saved["key"] == key_of(cfg) and saved["rows"] == len(rows):
            return saved["features"], saved["record"]
    wanted = [(cache, cfg)] + [(path, c) for path, c in also.items() if path != cache]
    t0 = time.perf_counter()
    warm_rows = [rows[i] for i in random_subset(len(rows), cfg.warmup_frac, cfg.seed)]
    steps = max(1, round(-(-len(warm_rows) // instruct.batch) * instruct.epochs))
    marks = sorted({max(1, round(steps * (k + 1) / cfg.checkpoints)) for k in range(cfg.checkpoints)})
    peft_model, warm_record, saved = finetune(model, tokenizer, warm_rows, instruct, checkpoints=tuple(marks))
    t_warm = time.perf_counter() - t0
    try:
        params = trainable(peft_model)
        grad_dim = sum(p.numel() for p in params)
        projectors = {d: RademacherProjector(grad_dim, d, seed=cfg.seed) for d in {c.dim for _, c in wanted}}
        outputs = [(c.features, projectors[c.dim]) for _, c in wanted]
        examples = [encode(tokenizer, r, instruct.max_len) for r in rows]
        feats, lrs = [], []
        for ck in saved:
            set_peft_model_state_dict(peft_model, ck["adapter"])
            moments = (ck["optimizer"]["exp_avg"].float(), ck["optimizer"]["exp_avg_sq"].float())
            feats.append(feature_sets(peft_model, examples, outputs, moments, cfg.batch, progress))
            lrs.append(ck["lr"])
    finally:
        peft_model.unload()   # the LoRA layers out: the base model as it was
    record = {"warmup": {**warm_record, "checkpoints": marks, "lrs": lrs, "seconds": round(t_warm, 1)},
              "feature_seconds": round(time.perf_counter() - t0 - t_warm, 1), "grad_dim": grad_dim,
              "computed_together": len(wanted)}
    results = [average_checkpoints([f[k] for f in feats], lrs) for k in range(len(wanted))]
    for (path, c), features in zip(wanted, results):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key_of(c), "rows": len(rows), "features": features, "record": record}, path)
    return results[0], record
