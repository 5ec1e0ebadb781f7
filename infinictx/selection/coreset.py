"""TAGCOS's selection (arXiv 2407.15235): cluster the examples' gradient features with K-means, then inside each
cluster pick, by OMP, the examples whose features best rebuild the cluster's mean; the budgets sum to exactly
frac · N. Also the baselines it is compared with: random, K-means on sentence embeddings (nearest to each
centroid), and OMP over the whole pool without clusters."""

from __future__ import annotations

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
