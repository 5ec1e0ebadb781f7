"""Exact building blocks of the fast attention paths (memory top-k lookups, LongCache selection).

Each one computes exactly what the plain torch expression beside it computes, with fewer passes over memory:
this CPU's matmul is fast, but every pass over a (queries × past) score matrix and every freshly allocated
large tensor costs as much as the matmul that filled it (measured on 2 cores, 16K keys, 4,608 query rows:
scores 0.11 s into a reused buffer vs 0.30 s into a new one; torch.topk(128) 0.19 s; gathering the top-128
values 0.12 s vs 0.005 s with `embedding_bag`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Scratch:
    """A reusable buffer for large temporaries (score matrices): `get(shape, dtype)` returns an uninitialised tensor
    of that shape backed by one allocation per dtype and device that only grows, so repeated steps do not pay page
    faults for a fresh hundred-megabyte tensor each time. A tensor from `get` is valid until the next `get` of the
    same dtype."""

    def __init__(self):
        self.bufs = {}
        self.memo = (None, None)

    def __getstate__(self):   # a work buffer, not state: checkpoints and deep copies start empty
        return {"bufs": {}, "memo": (None, None)}

    def __setstate__(self, state: dict):
        self.bufs, self.memo = {}, (None, None)

    def cached(self, key, build):
        """`build()`'s tensor, reused while `key` stays the same (one entry: e.g. the attention mask every
        memory layer of one forward shares)."""
        if self.memo[0] != key:
            self.memo = (key, build())
        return self.memo[1]

    def get(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        device = torch.device(device)
        buf = self.bufs.get((dtype, device))
        if buf is None or buf.numel() < n:
            buf = self.bufs[(dtype, device)] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


def stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row, ties broken towards the lower index: (values, indices), indices
    ascending. torch.topk breaks ties in no promised order (on real text LongCache's selection scores tie
    whenever two keys are bit-identical, e.g. repeated tokens in the first layer), so the selection rule is
    made explicit here: rows whose k-th value repeats beyond the top k are re-done by (value, index)."""
    vals, idx = x.topk(k, dim=-1)
    kth = vals[..., -1:]
    crossing = torch.count_nonzero(x >= kth, dim=-1) > k          # a tie straddles the boundary
    if bool(crossing.any()):
        rows = crossing.nonzero(as_tuple=True)
        sub, sub_kth = x[rows], kth[rows]
        above, ties = sub > sub_kth, sub == sub_kth
        chosen = above | (ties & (ties.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
        idx = idx.clone()
        idx[rows] = chosen.nonzero()[:, -1].view(-1, k)
    idx = idx.sort(-1).values
    return x.gather(-1, idx), idx


def block_topk(s: torch.Tensor, k: int, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of s through block maxima: (values, indices), indices ascending, ties
    broken towards the lower index (`stable_topk`). The k largest entries lie in the k blocks with the largest maxima
    (ties: the lower blocks), so one cheap max pass plus a top-k over k·block candidates replaces a top-k over
    the whole row. Worth it when k·block is far below the row length (LongCache's k=4: 3-4x faster than
    torch.topk at 16K keys); shorter rows take `stable_topk` directly."""
    n = s.shape[-1]
    if n < 8 * k * block:
        return stable_topk(s, k)
    nb = n // block
    maxima = s[..., :nb * block].unflatten(-1, (nb, block)).amax(-1)
    if n % block:   # the short last block
        maxima = torch.cat([maxima, s[..., nb * block:].amax(-1, keepdim=True)], dim=-1)
    top_blocks = stable_topk(maxima, k)[1]                                          # (..., k), ascending
    cand_idx = (top_blocks.unsqueeze(-1) * block + torch.arange(block, device=s.device)).flatten(-2)
    past_end = cand_idx >= n                                                         # only in the short block
    cand = s.gather(-1, cand_idx.clamp(max=n - 1))
    if bool(past_end.any()):
        cand = cand.masked_fill(past_end, float("-inf"))
    vals, j = stable_topk(cand, k)          # candidates are in ascending position: ties still go low
    return vals, cand_idx.gather(-1, j)


def weighted_rows(values: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_j weights[..., r, j] · values[..., idx[..., r, j], :] without materialising the gathered rows
    (`embedding_bag`): values (B, H, M, D), idx and weights (B, H, R, k) -> (B, H, R, D). Equals
    `(weights.unsqueeze(-2) @ values[b, h, idx]).squeeze(-2)` up to float summation order."""
    B, H, R, k = idx.shape
    out = weights.new_empty(B, H, R, values.shape[-1])
    for b in range(B):
        for h in range(H):
            table = values[b, h]
            if table.dtype != weights.dtype:
                table = table.to(weights.dtype)
            out[b, h] = F.embedding_bag(idx[b, h], table, per_sample_weights=weights[b, h], mode="sum")
    return out
