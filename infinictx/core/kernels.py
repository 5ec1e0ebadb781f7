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


def matmul_heads(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b for 4-D (batch, head, rows, cols) operands, one `torch.mm` per (batch, head): the same products
    as `torch.matmul(a, b, out=out)`, without its copy of an operand whose heads are not laid out back to back (a
    view of a growing `KVBuffer`: batched matmul clones it first; 2 cores, 3 heads × 16K keys: bf16 scores of 384
    rows 9.7 → 5.2 ms, of 3 rows 4.5 → 0.8 ms; fp32 of 64 rows 4.6 → 3.4 ms)."""
    for i in range(a.shape[0]):
        for h in range(a.shape[1]):
            torch.mm(a[i, h], b[i, h], out=out[i, h])
    return out


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


def residual_weights(x: torch.Tensor, x16: torch.Tensor | None = None) -> torch.Tensor:
    """Each centred key's weight w = ‖x − bf16(x)‖·(1 + 2^-10) + 2^-15·‖x‖ in the bf16 score bound (x (..., D);
    x16: bf16(x) when the caller has it)."""
    residual = x - (x.to(torch.bfloat16) if x16 is None else x16).float()
    return (torch.linalg.vector_norm(residual, dim=-1) * (1 + 2.0 ** -10)
            + 2.0 ** -15 * torch.linalg.vector_norm(x, dim=-1))


# AMX int8 scores (`native.select_exact_amx`): a value x ≈ s·a with the integer a = 256·h + l held as two int8 parts,
# h in [−127, 127], l in [−128, 127], so |a| <= 127·256 + 127
INT8_LEVELS = 127 * 256 + 127
# the bound's weights are computed in fp32 (norms of up to 64 terms: ~2^-18 each), this margin covers them
INT8_MARGIN = 1 + 2.0 ** -12


def _int8_split(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x · (1/scale) in fp32 rounded to integers a (|a| <= INT8_LEVELS) as the int8 parts [h | l] (..., 2D),
    a = 256·h + l, and a and l (float64). Any integers would do (the bound is taken from the residual x − scale·a);
    these are the native kernel's, bit for bit."""
    a = torch.round(x * (1 / scale)).clamp_(-INT8_LEVELS, INT8_LEVELS)
    high = torch.floor((a + 128) / 256)
    low = a - 256 * high
    return torch.cat([high, low], dim=-1).to(torch.int8), a.double(), low.double()


def int8_key_parts(x: torch.Tensor, first: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred keys x (H, T, D) float32 for the AMX int8 scores, in blocks of 16 keys (the first block `first`
    keys long) that share one scale s = (the block's largest |x|) / INT8_LEVELS: (parts (H, T, 2D) int8,
    weights (H, T, 3) float32). parts = [k̂h | k̂l] with x = s·(256·k̂h + k̂l) + r; weights = [‖r‖, s·‖k̂l‖, s]
    (the first two rounded up by INT8_MARGIN), what `int8_row_parts`'s bound multiplies. A block with a value that
    is not finite gets a scale that is not finite (the kernel then falls back)."""
    H, T, D = x.shape
    pos = torch.arange(T, device=x.device)
    block = torch.where(pos < first, 0, (pos - first) // 16 + (1 if first > 0 else 0))
    nb = int(block[-1]) + 1 if T else 0
    finite = torch.isfinite(x).all(-1)
    largest = torch.where(finite, x.abs().amax(-1), torch.inf)
    scale = x.new_zeros(H, nb).scatter_reduce_(1, block.expand(H, T), largest, "amax") / INT8_LEVELS
    # per key; an all-zero (or all but zero) block: 1
    scale = torch.where(scale >= 2.0 ** -100, scale, torch.ones_like(scale))[:, block, None]
    parts, a, low = _int8_split(x, scale)
    s = scale.double()
    residual = torch.linalg.vector_norm(x.double() - s * a, dim=-1)
    weights = torch.stack([residual.float() * INT8_MARGIN,
                           (s[..., 0] * torch.linalg.vector_norm(low, dim=-1)).float() * INT8_MARGIN, scale[..., 0]],
                          dim=-1)
    return parts, weights


def int8_row_parts(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For query rows q (..., D) float32: (parts (..., 2D) int8, scales (...), bounds (..., 3)) such that the AMX
    score of a centred key x held as `int8_key_parts` gives it (scale s, parts k̂h, k̂l, weights [‖r‖, w, s]),
    ŝ = sq·s·256·(256·k̂h·q̂h + k̂h·q̂l + k̂l·q̂h) (the integer exact; its conversion to fp32 and the two products by the
    scales each rounded), has |ŝ − q·x| <= e·‖x‖ + e2·‖r‖ + e3·w with [e, e2, e3] = bounds.
    Why: with q = sq·(256·q̂h + q̂l) + ρ = q̃ + ρ and x = x̃ + r, q·x − q̃·x̃ = q·r + ρ·x̃ and q̃·x̃ = ŝ_exact +
    sq·s·q̂l·k̂l, so |ŝ_exact − q·x| <= ‖q‖·‖r‖ + ‖ρ‖·(‖x‖ + ‖r‖) + (sq·‖q̂l‖)·(s·‖k̂l‖); the three roundings
    (2^-24 each, relative) move ŝ by < 2^-22·|ŝ_exact| <= 2^-22·((‖q‖ + ‖ρ‖)·(‖x‖ + ‖r‖) + sq·‖q̂l‖·s·‖k̂l‖).
    So e = ‖ρ‖ + 2^-22·(‖q‖ + ‖ρ‖), e2 = (‖q‖ + ‖ρ‖)·(1 + 2^-22), e3 = sq·‖q̂l‖·(1 + 2^-22), each rounded up by
    INT8_MARGIN. About 2^-13 of a score. Rows that are not finite give bounds that are not finite."""
    scale = q.abs().amax(-1, keepdim=True) / INT8_LEVELS
    scale = torch.where(scale >= 2.0 ** -100, scale, torch.ones_like(scale))   # a zero (or all but zero) row: 1
    parts, a, low = _int8_split(q, scale)
    q64 = q.double()
    rho = torch.linalg.vector_norm(q64 - scale.double() * a, dim=-1)
    norm = torch.linalg.vector_norm(q64, dim=-1)
    grow = 1 + 2.0 ** -22
    bounds = torch.stack([rho + 2.0 ** -22 * (norm + rho), (norm + rho) * grow,
                          scale[..., 0].double() * torch.linalg.vector_norm(low, dim=-1) * grow], dim=-1)
    return parts, scale[..., 0], (bounds * INT8_MARGIN).float()


# The AMX selection's slack: two keys' fp32 re-scores swapping (2^-15, as `Bf16KeyCopy.SLACK`) plus the rounding of
# the bound's own arithmetic (ŝ ± d and the comparisons, a few fp32 operations on values up to 2·‖q‖·max‖k‖), which
# the int8 bound's ~2^-13 no longer dwarfs; times ‖q‖·max‖k‖
AMX_SLACK = 2.0 ** -15 + 2.0 ** -19


class Int8KeyCopy:
    """A second copy of a growing key store, for exact top-k lookups of many query rows at once (a prefill chunk)
    on a CPU with AMX: the keys minus a fixed centre as int8 parts with their bound weights (`int8_key_parts`, in
    blocks of 16 from the first key; the block still filling is re-quantized as keys join it), their norms, and a
    running maximum of the keys' own norms. `top_k` scores every key with AMX int8 tiles
    (`native.select_exact_amx`) and re-scores in fp32 only the keys the bound cannot rule out: the exact top-k
    without the fp32 score matrix and its row-wise selection. q·(k − c) ranks keys as q·k does."""

    def __init__(self):
        self.parts = self.weights = self.norms = self.centre = self.norm_max = None
        self.size = 0
        self.rescored = self.rows = 0   # keys re-scored in fp32, over rows looked up (the bound's cost)

    def __len__(self) -> int:
        return self.size

    def append(self, keys: torch.Tensor, n_new: int):
        """Take in the last n_new of the store's keys (H, n, D) float32 (last dim contiguous): the store's keys
        so far, because the last block's earlier keys are re-quantized with the new ones."""
        from . import native

        H, n1, D = keys.shape
        if not native.available():
            raise RuntimeError("the int8 key copy needs the native kernels")
        if self.centre is None:
            self.centre = keys[:, n1 - n_new:].mean(1, keepdim=True)
        start = self.size // 16 * 16
        if self.parts is None or n1 > self.parts.shape[1]:
            cap = max(n1, 2 * (0 if self.parts is None else self.parts.shape[1]), 256)
            parts, weights, norms = (keys.new_empty(H, cap, 2 * D, dtype=torch.int8), keys.new_empty(H, cap, 3),
                                     keys.new_empty(H, cap))
            if self.parts is not None:
                parts[:, :start], weights[:, :start] = self.parts[:, :start], self.weights[:, :start]
                norms[:, :start] = self.norms[:, :start]
            self.parts, self.weights, self.norms = parts, weights, norms
        part, norm, weight, new_max = native.int8_key_copies(keys[:, start:], self.centre, 16)
        self.parts[:, start:n1], self.weights[:, start:n1], self.norms[:, start:n1] = part, weight, norm[..., 0]
        self.norm_max = new_max if self.norm_max is None else torch.maximum(self.norm_max, new_max)
        self.size = n1

    def top_k(self, q: torch.Tensor, keys: torch.Tensor, h0: int, h1: int, k: int):
        """Exact top-k of q·k for query rows q (h1−h0, R, D) float32 over the fp32 keys (h1−h0, n, D) this copy
        mirrors (heads h0..h1−1): (scores, indices) (h1−h0, R, k), ties to the earlier key, in no particular
        order; None when a row or a key is not finite (the caller takes the plain path)."""
        from . import native

        n = self.size
        slack = AMX_SLACK * torch.linalg.vector_norm(q, dim=-1) * self.norm_max[h0:h1, None]
        found = native.select_exact_amx(self.parts[h0:h1, :n], self.weights[h0:h1, :n], q, keys,
                                        self.norms[h0:h1, :n], k, slack, None)
        if found is None:
            return None
        self.rescored += int(found[2].sum())
        self.rows += found[2].numel()
        return found[0], found[1]

    def nbytes(self) -> int:
        return 0 if self.parts is None else self.size * self.parts.shape[0] * (self.parts.shape[2] + 16)

    def copy(self) -> "Int8KeyCopy":
        other = Int8KeyCopy()
        other.__dict__.update(self.__dict__)
        if self.parts is not None:
            other.parts, other.weights, other.norms = self.parts.clone(), self.weights.clone(), self.norms.clone()
        return other


class Bf16KeyCopy:
    """A second copy of a growing key store, for exact top-k lookups of a few query rows (decoding) at half the
    bytes read: the keys minus a fixed centre, in bf16, stored in blocks of 16 keys (component-major inside a
    block: `native.lookup_bf16` scores 16 keys with no horizontal sums), with each key's error weight (below)
    and a running maximum of the keys' own norms. Why: a decode step with memory is bound by reading every
    memory key (12 layers × 3 heads × 32K keys × 256 B = 302 MB in fp32 at 32K); bf16 halves that, and
    `top_k` stays exact by re-scoring in fp32 every key the bf16 error bound cannot rule out.

    The bound: a centred key x = k − c stored as k̂ = bf16(x) leaves the residual r = x − k̂ (exact in fp32), and
    the score moves by |q·r| ≤ ‖q‖·‖r‖ (Cauchy–Schwarz on the residual itself: ~2.5x tighter than bf16's
    worst case u·‖q‖·‖x‖, u = 2^-8, since most components round by less than half a unit); the fp32 sum of
    D ≤ 256 exact products adds at most 2^-16·Σ|q_i k̂_i| ≤ 2^-16·(1 + u)·‖q‖·‖x‖. Each key's weight
    w = ‖r‖·(1 + 2^-10) + 2^-15·‖x‖ covers both with margin: |ŝ − q·x| ≤ ‖q‖·w. q·(k − c) ranks keys as q·k
    does; the fp32 re-score of q·k is within 2^-16·‖q‖·‖k‖ of it, so SLACK·‖q‖·max‖k‖ covers two keys
    swapping."""

    SLACK = 2.0 ** -15
    MAX_HEAD_DIM = 256

    def __init__(self):
        self.blocks = self.norms = self.centre = self.norm_max = None
        self.size = 0
        self.rescored = self.rows = 0   # keys re-scored in fp32, over rows looked up (the bound's cost)

    def __len__(self) -> int:
        return self.size

    def append(self, k: torch.Tensor):
        """Add keys k (H, T, D) float32."""
        H, T, D = k.shape
        from . import native

        if self.centre is None:
            self.centre = k.mean(1, keepdim=True)
        n0, n1 = self.size, self.size + T
        if self.blocks is None or -(-n1 // 16) > self.blocks.shape[1]:
            cap = max(-(-n1 // 16), 2 * (0 if self.blocks is None else self.blocks.shape[1]), 16)
            blocks, norms = k.new_zeros(H, cap, D, 16, dtype=torch.bfloat16), k.new_zeros(H, 16 * cap)
            if self.blocks is not None:
                blocks[:, :self.blocks.shape[1]] = self.blocks
                norms[:, :n0] = self.norms[:, :n0]
            self.blocks, self.norms = blocks, norms
        if k.device.type == "cpu" and k.stride(-1) == 1 and native.available():   # one call, not ~25 small ops
            if self.norm_max is None:
                self.norm_max = k.new_zeros(H)
            native.bf16_copy_append(k, self.centre, self.blocks, n0, self.norms, self.norm_max)
            self.size = n1
            return
        centred = k - self.centre
        j = torch.arange(n0, n1, device=k.device)
        rounded = centred.to(torch.bfloat16)
        self.blocks[:, j // 16, :, j % 16] = rounded.transpose(0, 1)   # (T, H, D) by index
        self.norms[:, n0:n1] = residual_weights(centred)
        new_max = torch.linalg.vector_norm(k, dim=-1).amax(-1)
        self.norm_max = new_max if self.norm_max is None else torch.maximum(self.norm_max, new_max)
        self.size = n1

    def top_k(self, q: torch.Tensor, keys: torch.Tensor, h0: int, h1: int, k: int):
        """Exact top-k of q·k for query rows q (h1−h0, R, D) float32 over the fp32 keys (h1−h0, n, D) this copy
        mirrors (heads h0..h1−1): (scores, indices) (h1−h0, R, k), ties to the earlier key; None when a row had
        NaN scores (the caller takes the plain path)."""
        from . import native

        n = self.size
        # the bound is ‖q‖ · each key's weight (`norms`) + SLACK · ‖q‖ · max ‖k‖
        found = native.lookup_bf16(self.blocks[h0:h1], n, q, keys, self.norms[h0:h1, :n], self.norm_max[h0:h1],
                                   self.SLACK, k)
        if found is None:
            return None
        self.rescored += int(found[2].numpy().sum())   # numpy: a torch reduction costs ~20 us here
        self.rows += found[2].numel()
        return found[0], found[1]

    def nbytes(self) -> int:
        return 0 if self.blocks is None else self.size * self.blocks.shape[0] * (2 * self.blocks.shape[2] + 4)

    def copy(self) -> "Bf16KeyCopy":
        other = Bf16KeyCopy()
        other.__dict__.update(self.__dict__)
        if self.blocks is not None:
            other.blocks, other.norms = self.blocks.clone(), self.norms.clone()
        return other
