"""LongCache / ReAttention (Liu et al., arXiv 2407.15176): infinite context through a finite attention scope.

Every layer keeps the **full** cache, keys stored **before** RoPE. The past splits into the first `global_tokens`
(attention sinks), the most recent tokens (local), and the middle. For each query chunk (a prefill chunk of Δ
tokens, or the decode token) the middle is scored by q·k *without* RoPE (position-agnostic); each query and
head votes for its `topk` best positions; the `recall_clip` positions with most votes are widened to spans of
`span` contiguous tokens (centred, clamped to the middle), merged, and kept in their original order. The layer
then attends over [global ‖ selected spans ‖ local ‖ new] with RoPE at contiguous positions 0..L−1: positions
never exceed the scope W, however long the input, so the model needs no length extrapolation.

Budgets: W = global + recall_clip × span + local + Δ; the local part takes what the others leave (for a decode
token, Δ = 1: the local part grows by Δ − 1). The selection is shared by all heads of a layer (as in the
official code). The cache itself is not compressed: LongCache bounds what attention sees, not what is stored."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ...core import native
from ...core.attention import KVBuffer, local_attention
from ...core.errors import InfinictxError
from ...core.kernels import (
    AMX_SLACK,
    Scratch,
    block_topk,
    int8_key_parts,
    matmul_heads,
    residual_weights,
    stable_topk,
)
from ...core.models import DTYPES, LoadedModel, cpu_has_fast_bf16
from ...core.registry import register_method, setting
from ...core.session import check_window
from ..base import MethodConfig
from .cache import KVCacheSession, KVPolicy, check_positive

SCORE_BUDGET_BYTES = 256 << 20
# fp32 scores in blocks of this many rows per KV head: a block's scores stay near the cache instead of being
# written out and read back (2 cores, 16K keys: 31 ms per chunk and layer with 64-row blocks vs 55 ms with all
# 384 rows at once)
FP32_BLOCK_ROWS = 64
# The bf16 score ŝ of a query q and a centred key x = k − c, bounded rigorously from the rounding residuals
# themselves (u = 2^-8: bf16's unit roundoff, 8 significant bits, round to nearest even). With q̂ = bf16(q),
# ρ = q − q̂, k̂ = bf16(x), r = x − k̂ (both residuals exact in fp32): q·x = q̂·k̂ + q̂·r + ρ·x, so by Cauchy–Schwarz
# the inputs' rounding moves the score by at most ‖q̂‖·‖r‖ + ‖ρ‖·‖x‖ (each residual ~2^-9.3 of its vector on
# average, against bf16's worst case u: ~2.5x tighter than u·‖q‖·‖x‖ twice); the exact products summed in fp32
# (D ≤ 256 terms) add at most 2^-16·‖q̂‖·‖k̂‖ ≤ 2^-16·(1 + u)·‖q̂‖·‖x‖; the sum rounded to bf16 adds at most
# u/(1 − u)·|ŝ|. So, per key weights ‖x‖ and w = ‖r‖·(1 + 2^-10) + 2^-15·‖x‖ (`residual_weights`):
#   |ŝ − q·x| ≤ ‖ρ‖·(1 + 2^-10)·‖x‖ + ‖q̂‖·(1 + 2^-10)·w + BF16_SCORE_REL·|ŝ|   (margins cover fp32 norms)
# The exact re-score is fp32 q·k in one summation order, within γ_D·‖q‖·‖k‖ ≤ 2^-16·‖q‖·‖k‖ of q·k: keys whose
# q·k differ by less than twice that may swap, so BF16_SLACK·‖q‖·max‖k‖ widens every bound.
BF16_SCORE_REL = 2.0 ** -8 * (1 + 2.0 ** -6)
BF16_SLACK = 2.0 ** -15
BF16_MAX_HEAD_DIM = 256   # the bounds above hold up to this many terms per score
KERNELS = ("fast", "fast-fp32", "reference")
# where bf16 candidates pay: rows per KV head (a prefill chunk, not a decode step) and keys in the middle (below,
# the fp32 matmul is cheap and re-scoring costs more than it saves)
BF16_MIN_ROWS = 64
BF16_MIN_KEYS = 4096
# the AMX kernel's scores pay from far fewer keys (its bound leaves few to re-score; one 16K read's chunk, 384 rows
# per KV head, with split-bf16 tiles: 2.0 vs 2.2 ms at 512 keys, 3.4 vs 6.8 ms at 2,048, against fp32 scores +
# native top-k; the int8 tiles are faster still)
AMX_MIN_KEYS = 512


class LongCachePolicy(KVPolicy):
    name = "longcache"

    def __init__(self, window: int, global_tokens: int = 32, span: int = 32, recall_clip: int = 8, topk: int = 4,
                 select_dtype: torch.dtype | None = None, fast: bool = True, bf16_candidates: bool = True):
        self.scope, self.global_tokens, self.span, self.recall_clip, self.topk = (
            window, global_tokens, span, recall_clip, topk)
        self.select_dtype = select_dtype   # dtype of the selection scores (None: the model's)
        self.fast = fast                   # exact fast selection (reused score buffers, native or block top-k)
        # fast, on an fp32 model on a CPU with AMX: candidates from bf16 scores, re-scored exactly in fp32
        self.bf16_candidates = bf16_candidates
        self.scratch = Scratch()
        self._flops = 0
        # keys re-scored in fp32 by the bf16-candidate selection, over rows selected that way (its bound's cost)
        self.rescored = self.bf16_rows = 0

    def start(self, n_layers: int):
        self.layers = [KVBuffer() for _ in range(n_layers)]
        # keys in select_dtype when it differs from the cache's (bf16 selection on an fp32 model): converted once
        # as tokens arrive, not the whole middle at every step of every layer
        self.select_keys = [KVBuffer(self.select_dtype) for _ in range(n_layers)]
        # the bf16-candidate selection's copies: keys minus a fixed centre, in int8 parts (the AMX kernel) or bf16,
        # and their fp32 norms (as keys of width 1); the centre (per layer and KV head) is the mean key when the
        # copies were started
        self.candidate_keys = [KVBuffer() for _ in range(n_layers)]
        self.key_norms = [KVBuffer(torch.float32) for _ in range(n_layers)]
        self.key_residuals = [KVBuffer(torch.float32) for _ in range(n_layers)]   # the bound's weights w
        self.key_centres = [None] * n_layers
        self._start_dedupe(n_layers)
        self.selected = [0] * n_layers   # tokens recalled from the middle at the last step, per layer

    def __setstate__(self, state: dict):
        self.__dict__.update(state)
        layers = state.get("layers")
        if "select_keys" not in state and layers is not None:   # pickled by a version without the bf16 copy
            self.select_keys = [KVBuffer(self.select_dtype) for _ in layers]
        if "candidate_keys" not in state:   # a version without bf16 candidates: copies rebuilt on first use
            self.bf16_candidates, self.rescored, self.bf16_rows = True, 0, 0
            if layers is not None:
                self.candidate_keys = [KVBuffer() for _ in layers]
                self.key_norms = [KVBuffer(torch.float32) for _ in layers]
                self.key_centres = [None] * len(layers)
        if "key_residuals" not in state and layers is not None:   # rebuilt in step on first use
            self.key_residuals = [KVBuffer(torch.float32) for _ in layers]
        if "key_hashes" not in state and layers is not None:   # a version without the duplicate-key flags
            self._start_dedupe(len(layers))

    def _start_dedupe(self, n_layers: int):
        # per layer: 1 for each key with at least topk earlier bit-identical keys (it can never be selected:
        # `_duplicate_flags`), and an index of the keys' hashes (sorted hashes, their positions, keys covered)
        self.key_excluded = [KVBuffer(torch.uint8) for _ in range(n_layers)]
        self.key_hashes = [KVBuffer(torch.int64) for _ in range(n_layers)]
        self.key_index = [None] * n_layers
        self.key_norm_max = [None] * n_layers   # per KV head: at least the largest ‖k‖ in the cache (bound slack)

    def _uses_bf16_candidates(self, k: torch.Tensor) -> bool:
        return (self.fast and self.bf16_candidates and self.select_dtype is None and k.dtype == torch.float32
                and k.device.type == "cpu" and k.shape[0] == 1 and k.shape[3] <= BF16_MAX_HEAD_DIM
                and _fast_bf16_here())

    def local_size(self, n_new: int) -> int:
        return self.scope - self.global_tokens - self.recall_clip * self.span - n_new

    def attend(self, i, a, q, k, v, past, rope, commit):
        T = q.shape[2]
        buf = self.layers[i]
        buf.append(k, v)
        keys, values = buf.keys(), buf.values()
        select_keys = keys
        candidates = None
        if self.select_dtype is not None and self.select_dtype != k.dtype:
            select_keys = _mirror(self.select_keys[i], keys, k, past, lambda x: x.to(self.select_dtype))
        elif self._uses_bf16_candidates(k):
            candidates = self._candidate_copies(i, keys, k, past)
        mid_start, mid_end = self.global_tokens, past - self.local_size(T)
        if mid_end > mid_start:
            middle = None if candidates is None else (
                *(c[:, :, mid_start:mid_end] for c in candidates[:-1]), candidates[-1])
            picked = self.select(q, select_keys[:, :, mid_start:mid_end], middle) + mid_start
            self.selected[i] = len(picked)
            idx = torch.cat([torch.arange(mid_start, device=q.device), picked,
                             torch.arange(mid_end, past + T, device=q.device)])
            keys, values = keys[:, :, idx], values[:, :, idx]
        L = keys.shape[2]
        out = local_attention(rope.rotate(q, L - T), rope.rotate(keys, 0), values, a.scaling)
        if not commit:
            for b in (buf, self.select_keys[i], self.candidate_keys[i], self.key_norms[i], self.key_residuals[i],
                      self.key_excluded[i], self.key_hashes[i]):
                b.truncate(past)
        return out

    def _candidate_copies(self, i: int, keys: torch.Tensor, k: torch.Tensor, past: int) -> tuple:
        """The bf16-candidate selection's copies of layer i, kept in step with the cache (rebuilt once when out
        of step, e.g. a cache saved before they existed), of the centred keys x = keys − centre: for the AMX
        kernel, x in two int8 parts [k̂h | k̂l] and the weights [‖r‖, s·‖k̂l‖, s] (`int8_key_parts`: blocks of 16
        from the middle's start share a scale s, so a block still filling is re-quantized as keys join it);
        else bf16(x) (the bf16 matmul scores with it) and the weight in its bound (`residual_weights`). Then the
        norms ‖x‖ (fp32), the duplicate flags, each head's largest norm: (copy, norms, weights, flags, largest
        norm). Why a centre: q·(k − c) ranks keys as q·k does
        (q·c is the same for every key of a row), and the keys share a large common part: its removal shrinks
        the norms the error bound scales with (real text, 4K tokens: 31 → 13 keys re-scored per row)."""
        k16, norms, residuals = self.candidate_keys[i], self.key_norms[i], self.key_residuals[i]
        D = k.shape[-1]
        int8 = _amx_here() and D in AMX_HEAD_DIMS
        dtype, width, n_weights = (torch.int8, 2 * D, 3) if int8 else (torch.bfloat16, D, 1)
        # copies of another layout (an earlier version's, or the other kind) are rebuilt too
        old_layout = (len(k16) and (k16.keys().shape[-1] != width or k16.keys().dtype != dtype)) or (
            len(residuals) and residuals.keys().shape[-1] != n_weights)
        if (old_layout or len(k16) != past or len(norms) != past or len(residuals) != past
                or self.key_centres[i] is None):
            for b in (k16, norms, residuals):   # a new centre: the copies are rebuilt from the cache
                b.truncate(0)
            self.key_centres[i] = keys.mean(2, keepdim=True)
        centre = self.key_centres[i]
        new_max = None
        if int8:
            # from the start of the block holding key `len(k16)`: blocks of 16 from the middle's start (the
            # kernel's blocks), the keys before it one block
            g, done = self.global_tokens, len(k16)
            start = 0 if done < g else g + (done - g) // 16 * 16
            parts, new_max = _int8_copies(keys[:, :, start:], centre, g - start if start < g else 16)
            for copy, part in zip((k16, norms, residuals), parts):
                copy.truncate(start)
                copy.append(part, part[..., :0])   # keys only: values of width 0
        else:
            for x in ((keys[:, :, :past],) if len(k16) != past else ()) + (k,):   # a rebuild, then the new keys
                parts, new_max = _centred_copies(x, centre)
                for copy, part in zip((k16, norms, residuals), parts):
                    copy.append(part, part[..., :0])
        # a running maximum: keys dropped by an uncommitted forward may still count (a larger slack, still a bound)
        old_max = self.key_norm_max[i]
        if old_max is None or new_max is None:
            new_max = torch.linalg.vector_norm(keys if old_max is None else k, dim=-1).amax(-1)[0]
        self.key_norm_max[i] = new_max if old_max is None else torch.maximum(old_max, new_max)
        flags = self._duplicate_flags(i, keys, k, past)
        weights = residuals.keys() if int8 else residuals.keys()[..., 0]
        return k16.keys(), norms.keys()[..., 0], weights, flags, self.key_norm_max[i]

    def _duplicate_flags(self, i: int, keys: torch.Tensor, k: torch.Tensor, past: int) -> torch.Tensor:
        """Flags (1, Hkv, past + T) of layer i's keys that can never be selected: each has at least `topk`
        earlier keys bit-identical to it, which score exactly as it does and win the tie. Why: keys repeat
        bit for bit (layer 0's keys are a function of the token alone: every "the" of a book; on a repetitive
        text, whole layers repeat), and a row whose best keys are one repeated key had every copy re-scored
        (passkey haystack, layer 0: 1,496 keys per row, 5 once the copies are flagged). A new key is flagged
        only when the index of earlier keys' hashes holds at least `topk` keys with its hash and the first
        `topk` of them are its bytes exactly: a hash collision never flags a key. The index is rebuilt when
        an eighth of the keys are newer than it; keys it does not cover count as no twin, which only flags
        fewer keys. Only keys after the global tokens are indexed: a key's twins must be in the middle with it
        (the middle runs from the global tokens to past the key)."""
        flags = self.key_excluded[i]
        H, T = k.shape[1], k.shape[2]
        if len(flags) != past:   # out of step (e.g. a cache saved before the flags): no key flagged
            flags.truncate(0)
            none = keys.new_zeros((1, H, past, 1), dtype=torch.uint8)
            flags.append(none, none[..., :0])
        known = self.key_hashes[i]
        if len(known) != past:   # out of step: rebuilt
            known.truncate(0)
            old = _key_hashes(keys[:, :, :past])
            known.append(old, old[..., :0])
        index = self.key_index[i]
        g = self.global_tokens
        if index is None or index[2] > past or past - index[2] >= max(256, index[2] // 8):
            earlier = known.keys()[0, :, g:past, 0] if past else keys.new_zeros((H, 0), dtype=torch.int64)
            sorted_hashes, order = torch.sort(earlier, dim=-1, stable=True)   # ties: by position
            index = self.key_index[i] = (sorted_hashes, order + g, past)
        sorted_hashes, order, covered = index
        if (k.shape[0] == 1 and k.dtype == torch.float32 and k.device.type == "cpu" and k.stride(-1) == 1
                and keys.stride(-1) == 1 and native.available()):   # one call instead of ~20 small ops
            hashes, new = native.key_flags(k[0], _HASH_MULTIPLIERS, sorted_hashes, order, keys[0], self.topk)
            hashes, new = hashes[None, :, :, None], new[None, :, :, None]
            known.append(hashes, hashes[..., :0])   # keys only: values of width 0
            flags.append(new, new[..., :0])
            return flags.keys()[..., 0]
        hashes = _key_hashes(k)
        known.append(hashes, hashes[..., :0])
        hashes = hashes[0, :, :, 0]
        new = keys.new_zeros((1, H, T, 1), dtype=torch.uint8)
        if sorted_hashes.shape[1] >= self.topk:
            lo = torch.searchsorted(sorted_hashes, hashes)
            enough = torch.searchsorted(sorted_hashes, hashes, right=True) - lo >= self.topk
            if enough.any():
                first = (lo[..., None] + torch.arange(self.topk)).clamp(max=sorted_hashes.shape[1] - 1)
                twins = order.gather(1, first.view(H, -1)).view(H, T, self.topk)
                twin_keys = keys[0].gather(1, twins.view(H, -1, 1).expand(-1, -1, k.shape[3]))
                same = (twin_keys.view(H, T, self.topk, -1).view(torch.int32)
                        == k[0, :, :, None].view(torch.int32)).all(-1).all(-1)
                new[0, :, :, 0] = enough & same
        flags.append(new, new[..., :0])
        return flags.keys()[..., 0]

    @torch.no_grad()
    def select(self, q: torch.Tensor, k_mid: torch.Tensor, candidates: tuple | None = None) -> torch.Tensor:
        """Positions (sorted) of the middle to attend to: q (1, Hq, T, D) and k_mid (1, Hkv, M, D), both before
        RoPE. Each (query, head) votes for its top-k keys by q·k (ties to the earlier position: identical keys
        tie exactly); the most voted `recall_clip` positions become spans. `candidates`: the middle's centred keys
        in bf16, their norms, residual weights and duplicate flags, and each head's largest key norm, for the
        bf16-candidate selection (`_bf16_votes`), used for blocks of enough rows."""
        B, Hq, T, D = q.shape
        Hkv, M = k_mid.shape[1], k_mid.shape[2]
        dtype = self.select_dtype or q.dtype
        rows = q.reshape(B, Hkv, (Hq // Hkv) * T, D).to(dtype)   # query heads of one KV head, then queries
        k_top = min(self.topk, M)
        votes = torch.zeros(M, dtype=torch.long, device=q.device)
        n_rows = rows.shape[2]
        enough_rows = candidates is not None and n_rows >= BF16_MIN_ROWS
        int8 = enough_rows and candidates[0].dtype == torch.int8   # copies for the AMX kernel
        amx = int8 and M >= max(AMX_MIN_KEYS, 16 * k_top)
        bf16 = amx or (enough_rows and not int8 and M >= max(BF16_MIN_KEYS, 128 * k_top))
        if amx:
            block = n_rows   # scored inside the selection kernel: no score matrix to bound
        elif bf16:
            block = max(1, SCORE_BUDGET_BYTES // (2 * B * Hkv * M))
        elif self.fast:
            block = FP32_BLOCK_ROWS
        else:
            block = max(1, SCORE_BUDGET_BYTES // (4 * B * Hkv * M))
        native_topk = (self.fast and dtype == torch.float32 and q.device.type == "cpu" and M >= 32 * k_top
                       and native.available())
        kt = k_mid.to(dtype).transpose(-1, -2)
        for r0 in range(0, n_rows, block):
            r = rows[:, :, r0:r0 + block]
            idx = self._bf16_votes(r, k_mid, candidates, k_top, amx) if bf16 else None
            if idx is None and self.fast:
                scores = self.scratch.get((B, Hkv, r.shape[2], M), dtype, q.device)
                matmul_heads(r, kt, scores)
                idx = native.topk_rows(scores, k_top)[1] if native_topk else block_topk(scores, k_top)[1]
            elif idx is None:
                idx = stable_topk(r @ kt, k_top)[1]
            votes += torch.bincount(idx.flatten(), minlength=M)
        self._flops += 2 * Hq * T * M * D
        n_pick = min(self.recall_clip, int((votes > 0).sum()))
        centres = votes.topk(n_pick).indices
        span = min(self.span, M)
        starts = (centres - span // 2).clamp(0, M - span)
        keep = torch.zeros(M, dtype=torch.bool, device=q.device)
        keep[(starts[:, None] + torch.arange(span, device=q.device)[None]).flatten()] = True
        return keep.nonzero().squeeze(1)

    def _bf16_votes(self, r: torch.Tensor, k_mid: torch.Tensor, candidates: tuple, k_top: int, amx: bool):
        """The exact fp32 top-k of the rows r (1, Hkv, R, D) over k_mid, found through approximate scores of the
        centred keys: every key whose exact score can reach the row's k-th best by the bound is re-scored in fp32
        from the cache's keys. amx: int8 scores by AMX tiles (`native.select_exact_amx`, bound
        `int8_row_parts`), else a bf16 matmul (~5x the fp32 matmul's speed with AMX; `native.select_exact`,
        bound `bf16_score_bounds`). Indices (Hkv, R, k), or None (NaN scores: the caller takes the fp32 path)."""
        *copies, excluded, norm_max = candidates
        excluded = excluded[0] if k_top == self.topk else None
        if amx:
            # int8 scores by AMX tiles inside the selection kernel: a ~2^-13 bound (few keys to re-score) and no
            # score matrix written out and read back
            k8, norms, weights = copies
            slack = AMX_SLACK * torch.linalg.vector_norm(r[0], dim=-1) * norm_max[:, None]
            found = native.select_exact_amx(k8[0], weights[0], r[0], k_mid[0], norms[0], k_top, slack, excluded)
        else:
            k16, norms, residuals = copies
            r16 = r.to(torch.bfloat16)
            eps, eps_residual, slack = bf16_score_bounds(r[0], r16[0], norm_max)
            scores = self.scratch.get((1, k16.shape[1], r.shape[2], k16.shape[2]), torch.bfloat16, r.device)
            matmul_heads(r16, k16.transpose(-1, -2), scores)
            found = native.select_exact(scores[0], r[0], k_mid[0], norms[0], eps, k_top, BF16_SCORE_REL, slack,
                                        excluded, residuals[0], eps_residual)
        if found is None:
            return None
        self.rescored += int(found[-1].sum())
        self.bf16_rows += found[-1].numel()
        return found[-2]

    def fork(self) -> "LongCachePolicy":
        scratch, self.scratch = self.scratch, None   # a work buffer, not state: shared, never copied
        try:
            other = super().fork()
        finally:
            self.scratch = scratch
        other.scratch = scratch
        return other

    def extra_flops(self) -> int:
        flops, self._flops = self._flops, 0
        return flops

    def nbytes(self) -> int:
        copies = (self.select_keys + self.candidate_keys + self.key_norms + self.key_residuals + self.key_excluded
                  + self.key_hashes)
        index = sum(x[0].nbytes + x[1].nbytes for x in self.key_index if x is not None)
        return sum(b.nbytes() for b in self.layers) + index + sum(
            len(m) and m.keys().nelement() * m.keys().element_size() for m in copies)

    def describe(self) -> dict:
        return {"global_tokens": self.global_tokens, "span": self.span, "recall_clip": self.recall_clip,
                "topk": self.topk, "local": self.local_size(0),
                "select_dtype": str(self.select_dtype).split(".")[-1] if self.select_dtype else None}


def _mirror(copy: KVBuffer, keys: torch.Tensor, k: torch.Tensor, past: int, convert) -> torch.Tensor:
    """Keep `copy` = convert(keys) in step with the cache (keys: the cache's keys, the new k already appended)
    and return its keys: converted once as tokens arrive, not the whole middle at every step of every layer. A
    copy out of step (e.g. a cache saved before it existed) is rebuilt once."""
    if len(copy) != past:
        copy.truncate(0)
        old = convert(keys[:, :, :past])
        copy.append(old, old[..., :0])
    new = convert(k)
    copy.append(new, new[..., :0])   # keys only: values of width 0
    return copy.keys()


def bf16_score_bounds(rows: torch.Tensor, rows16: torch.Tensor, key_norm_max: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows (H, R, D) of queries and their bf16 roundings: (eps, eps_residual, slack), each (H, R), such that
    the bf16 score ŝ of a row and a centred key x = k − c has |ŝ − q·x| ≤ eps·‖x‖ + eps_residual·w(x) +
    BF16_SCORE_REL·|ŝ| (w: `residual_weights`) and the fp32 re-scores of two keys swap order only within slack
    (key_norm_max (H,): at least the largest ‖k‖ of each head)."""
    rows16 = rows16.float()
    margin = 1 + 2.0 ** -10
    eps = torch.linalg.vector_norm(rows - rows16, dim=-1) * margin
    eps_residual = torch.linalg.vector_norm(rows16, dim=-1) * margin
    slack = BF16_SLACK * torch.linalg.vector_norm(rows, dim=-1) * key_norm_max[:, None]
    return eps, eps_residual, slack


# odd 64-bit multipliers, one per key component, for `_key_hashes` (fixed: hashes are compared across steps)
_HASH_MULTIPLIERS = torch.randint(1, 2**62, (512,), generator=torch.Generator().manual_seed(0)) * 2 + 1


def _key_copies(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bf16-candidate copies of centred keys x (..., N, D): bf16(x), the norms (..., N, 1) and the weights
    (..., N, 1) in the bound (`residual_weights`)."""
    x16 = x.to(torch.bfloat16)
    return x16, torch.linalg.vector_norm(x, dim=-1, keepdim=True), residual_weights(x, x16)[..., None]


def _centred_copies(x: torch.Tensor, centre: torch.Tensor) -> tuple[tuple, torch.Tensor | None]:
    """`_key_copies(x − centre)` and each head's largest ‖x‖ (H,) (None from the torch path), for keys x (1, H, N, D):
    natively where it can (one call per layer and chunk instead of ~30 small ops)."""
    if (x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == torch.float32 and x.stride(-1) == 1
            and native.available()):
        x16, norms, weights, x_max = native.candidate_copies(x[0], centre[0])
        return (x16[None], norms[None], weights[None]), x_max
    return _key_copies(x - centre), None


def _int8_copies(x: torch.Tensor, centre: torch.Tensor, first: int) -> tuple[tuple, torch.Tensor | None]:
    """The AMX kernel's copies of keys x (1, H, N, D) about centre, in blocks of 16 (the first `first` long): the
    parts (1, H, N, 2D) int8, the norms ‖x − centre‖ (1, H, N, 1), the weights (1, H, N, 3) (`int8_key_parts`), and
    each head's largest ‖x‖ (H,) (None from the torch path); natively where it can."""
    if x.shape[0] == 1 and x.stride(-1) == 1 and native.available():
        parts, norms, weights, x_max = native.int8_key_copies(x[0], centre[0], first)
        return (parts[None], norms[None], weights[None]), x_max
    x = x - centre
    parts, weights = int8_key_parts(x[0], first)
    return (parts[None], torch.linalg.vector_norm(x, dim=-1, keepdim=True), weights[None]), None


def _key_hashes(keys: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash (..., N, 1) of each key's bytes (keys (..., N, D) float32): equal keys hash equal; unequal
    keys rarely do (callers compare the bytes before relying on equality)."""
    words = keys.contiguous().view(torch.int32).to(torch.int64)
    mixed = words * _HASH_MULTIPLIERS[:words.shape[-1]]
    return (mixed ^ (mixed >> 29)).sum(-1, keepdim=True)


_FAST_BF16 = None
_AMX = None
AMX_HEAD_DIMS = (32, 64)   # what the tile kernel takes (each int8 part of a key one tile row of D bytes)


def _amx_here() -> bool:
    """The selection kernel with AMX tiles runs here (built for AMX, the OS grants the tile state);
    `INFINICTX_AMX=0` turns it off (then a bf16 matmul and `native.select_exact`: the same selection)."""
    global _AMX
    if _AMX is None:
        _AMX = os.environ.get("INFINICTX_AMX", "1") != "0" and native.has_amx()
    return _AMX


def _fast_bf16_here() -> bool:
    """bf16 candidates need bf16 matmul in hardware (AMX, AVX512-BF16) and the native selection kernel."""
    global _FAST_BF16
    if _FAST_BF16 is None:
        _FAST_BF16 = cpu_has_fast_bf16() and native.available()
    return _FAST_BF16


@register_method("longcache")
@dataclass
class LongCacheConfig(MethodConfig):
    window: int = setting(1024, "W: the attention scope (keys one query sees), inside the trained window", short="-W")
    # Δ default W/8: fewer filler queries outvote the question's (passkey at 4K, 4 trials: 2/4 with W/4, 3/4 = full
    # with W/8)
    chunk: int | None = setting(None, "Δ: tokens per prefill forward (default W/8)", short="-D")
    global_tokens: int = setting(32, "first tokens always attended (sinks)")
    span: int = setting(32, "contiguous tokens recalled around each selected position")
    recall_clip: int | None = setting(None, "spans recalled per step (default: half of what W leaves after global "
                                      "tokens and Δ)")
    topk: int = setting(4, "positions each query and head votes for", flag="--select-topk")
    # bfloat16 on an fp32 model (AMX): the keys are kept a second time in bf16 for the selection (+25% cache bytes);
    # votes agree with fp32 selection 94% (top-4 sets, real text at 15K); not exact, so opt-in (long_prefill_amx.md)
    select_dtype: str | None = setting(None, "dtype of the selection scores (default: the model's; bfloat16 on an "
                                       "AMX CPU: ~6% faster prefill at 32K, slower decode; far slower on CPUs "
                                       "without bf16 matmul)")
    # identity=False: the kernels select the same spans (tests: same selections, logits to 1e-4)
    kernel: str = setting("fast", "selection kernel: fast (exact; on a CPU with AMX, int8 tile scores find "
                          "the candidates and fp32 re-scores them; elsewhere fp32 scores in blocks, native top-k), "
                          "fast-fp32 (fast with fp32 scores only) or reference (the original path, kept to check "
                          "against)", choices=KERNELS, identity=False)

    def validate(self):
        self.policy()

    def policy(self) -> tuple[LongCachePolicy, int]:
        """The policy these settings describe and the chunk Δ, every budget checked."""
        check_positive(window=self.window, span=self.span, topk=self.topk)
        chunk = self.chunk if self.chunk is not None else max(1, self.window // 8)
        check_window(self.window, chunk)
        if self.global_tokens < 0:
            raise InfinictxError(f"global tokens must be >= 0 (got {self.global_tokens})")
        clip = self.recall_clip
        if clip is None:
            clip = max(1, (self.window - self.global_tokens - chunk) // (2 * self.span))
        if clip < 0:
            raise InfinictxError(f"recall clip must be >= 0 (got {clip})")
        if self.select_dtype is not None and self.select_dtype not in DTYPES:
            raise InfinictxError(f"unknown selection dtype {self.select_dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.kernel not in KERNELS:
            raise InfinictxError(f"unknown selection kernel {self.kernel!r}; choose one of {', '.join(KERNELS)}")
        policy = LongCachePolicy(self.window, self.global_tokens, self.span, clip, self.topk,
                                 DTYPES[self.select_dtype] if self.select_dtype else None,
                                 fast=self.kernel != "reference", bf16_candidates=self.kernel == "fast")
        if policy.local_size(chunk) < 1:
            raise InfinictxError(
                f"LongCache budgets exceed the scope: global {self.global_tokens} + recall {clip}×{self.span} + "
                f"chunk {chunk} must be < W={self.window}")
        return policy, chunk

    def new_session(self, lm: LoadedModel) -> KVCacheSession:
        policy, chunk = self.policy()
        return KVCacheSession(lm, self, policy, chunk)
