"""Orthogonal Matching Pursuit with non-negative ridge refits (TAGCOS's coreset step), and exact budgets.

`omp(A, b, nnz)`: greedily pick rows of A (examples' gradient features) whose non-negative combination rebuilds b
(a cluster's mean gradient): at each step the row with the largest inner product with the residual joins, the
weights are refit by ridge regression, (A_S A_Sᵀ + λI) x = A_S b, and while a weight is negative its row leaves
and the rest are refit. It stops at `nnz` rows, when the residual is below `tol`·|b|, or when the best row is
already in (a stall).

`select_in_cluster` repeats OMP on the rows not yet chosen until the cluster's budget is met (TAGCOS's loop) and
fills what OMP cannot reach — rows OMP never picks because every remaining row points away from the residual —
with the remaining rows closest to the target; the released code loops forever there. `budgets` splits a total
exactly over clusters (largest remainders)."""

from __future__ import annotations

import numpy as np
import torch

from ..core.errors import InfinictxError


def omp(A: torch.Tensor, b: torch.Tensor, nnz: int, lam: float = 1.0, tol: float = 1e-4,
        positive: bool = True) -> tuple[list[int], torch.Tensor]:
    """Rows of A (n, d) chosen to rebuild b (d,), at most `nnz`; returns (indices, their weights)."""
    A, b = A.double(), b.double()
    n = A.shape[0]
    chosen: list[int] = []
    x = torch.zeros(0, dtype=torch.float64)
    resid = b.clone()
    norm_b = float(b.norm()) or 1.0
    for _ in range(min(nnz, n)):
        if float(resid.norm()) / norm_b < tol:
            break
        scores = A @ resid
        if chosen:
            scores[chosen] = -torch.inf if positive else 0.0
        i = int(scores.argmax() if positive else scores.abs().argmax())
        if i in chosen or (positive and float(scores[i]) <= 0):
            break   # a stall: nothing left adds to the fit
        chosen.append(i)
        while True:
            S = A[chosen]
            x = torch.linalg.solve(S @ S.T + lam * torch.eye(len(chosen), dtype=torch.float64), S @ b)
            if not positive or float(x.min()) >= 0 or len(chosen) == 1:
                break
            chosen.pop(int(x.argmin()))   # the most negative weight leaves; refit the rest
        if positive and len(chosen) == 1 and float(x[0]) < 0:
            chosen, x = [], torch.zeros(0, dtype=torch.float64)
            break
        resid = b - A[chosen].T @ x
    return chosen, x.float()


def select_in_cluster(A: torch.Tensor, target: torch.Tensor, budget: int, lam: float = 1.0) -> list[int]:
    """`budget` distinct rows of A for the cluster whose mean gradient is `target` (rows as returned indices)."""
    if budget <= 0:
        return []
    if budget >= A.shape[0]:
        return list(range(A.shape[0]))
    left = list(range(A.shape[0]))
    picked: list[int] = []
    while len(picked) < budget:
        rows, _ = omp(A[left], target, budget - len(picked), lam=lam)
        if not rows:   # OMP cannot use any remaining row: fill with those closest to the target
            sims = torch.nn.functional.cosine_similarity(A[left].double(), target.double()[None], dim=1)
            rows = sims.argsort(descending=True)[:budget - len(picked)].tolist()
        got = [left[r] for r in rows]
        picked += got
        gone = set(got)
        left = [i for i in left if i not in gone]
    return picked[:budget]


def budgets(sizes: list[int], frac: float) -> list[int]:
    """Per-cluster budgets that sum to exactly round(frac · total): floor(frac · size) each, the remainder to the
    clusters with the largest fractional parts (ties to the larger cluster, then the first). Never more than a
    cluster holds."""
    if not 0 < frac < 1:
        raise InfinictxError(f"the selected fraction must be in (0, 1) (got {frac})")
    total = round(frac * sum(sizes))
    exact = [frac * s for s in sizes]
    out = [min(int(np.floor(e)), s) for e, s in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda k: (-(exact[k] - out[k]), -sizes[k], k))
    short = total - sum(out)
    for k in order * 2:   # a second pass if some cluster is full
        if short <= 0:
            break
        if out[k] < sizes[k]:
            out[k] += 1
            short -= 1
    return out
