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

from dataclasses import dataclass

import torch

from ...core.attention import KVBuffer, local_attention
from ...core.errors import InfinictxError
from ...core.kernels import Scratch, block_topk, stable_topk
from ...core.models import DTYPES, LoadedModel
from ...core.registry import register_method, setting
from ...core.session import check_window
from ..base import MethodConfig
from .cache import KVCacheSession, KVPolicy, check_positive

SCORE_BUDGET_BYTES = 256 << 20


class LongCachePolicy(KVPolicy):
    name = "longcache"

    def __init__(self, window: int, global_tokens: int = 32, span: int = 32, recall_clip: int = 8, topk: int = 4,
                 select_dtype: torch.dtype | None = None, fast: bool = True):
        self.scope, self.global_tokens, self.span, self.recall_clip, self.topk = (
            window, global_tokens, span, recall_clip, topk)
        self.select_dtype = select_dtype   # dtype of the selection scores (None: the model's)
        self.fast = fast                   # exact fast selection (reused score buffer, top-k via block maxima)
        self.scratch = Scratch()
        self._flops = 0

    def start(self, n_layers: int):
        self.layers = [KVBuffer() for _ in range(n_layers)]
        # keys in select_dtype when it differs from the cache's (bf16 selection on an fp32 model): converted once
        # as tokens arrive, not the whole middle at every step of every layer
        self.select_keys = [KVBuffer(self.select_dtype) for _ in range(n_layers)]
        self.selected = [0] * n_layers   # tokens recalled from the middle at the last step, per layer

    def __setstate__(self, state: dict):
        self.__dict__.update(state)
        if "select_keys" not in state and "layers" in state:   # pickled by a version without the bf16 copy
            self.select_keys = [KVBuffer(self.select_dtype) for _ in self.layers]

    def local_size(self, n_new: int) -> int:
        return self.scope - self.global_tokens - self.recall_clip * self.span - n_new

    def attend(self, i, a, q, k, v, past, rope, commit):
        T = q.shape[2]
        buf = self.layers[i]
        buf.append(k, v)
        keys, values = buf.keys(), buf.values()
        select_keys = keys
        if self.select_dtype is not None and self.select_dtype != k.dtype:
            mirror = self.select_keys[i]
            if len(mirror) != past:   # e.g. a cache saved before the copy existed: rebuilt once
                mirror.truncate(0)
                mirror.append(keys[:, :, :past].to(self.select_dtype), keys[:, :, :past, :0])
            mirror.append(k.to(self.select_dtype), k[..., :0])   # keys only: values of width 0
            select_keys = mirror.keys()
        mid_start, mid_end = self.global_tokens, past - self.local_size(T)
        if mid_end > mid_start:
            picked = self.select(q, select_keys[:, :, mid_start:mid_end]) + mid_start
            self.selected[i] = len(picked)
            idx = torch.cat([torch.arange(mid_start, device=q.device), picked,
                             torch.arange(mid_end, past + T, device=q.device)])
            keys, values = keys[:, :, idx], values[:, :, idx]
        L = keys.shape[2]
        out = local_attention(rope.rotate(q, L - T), rope.rotate(keys, 0), values, a.scaling)
        if not commit:
            buf.truncate(past)
            self.select_keys[i].truncate(past)
        return out

    @torch.no_grad()
    def select(self, q: torch.Tensor, k_mid: torch.Tensor) -> torch.Tensor:
        """Positions (sorted) of the middle to attend to: q (1, Hq, T, D) and k_mid (1, Hkv, M, D), both before
        RoPE. Each (query, head) votes for its top-k keys by q·k (ties to the earlier position: identical keys
        tie exactly); the most voted `recall_clip` positions become spans."""
        B, Hq, T, D = q.shape
        Hkv, M = k_mid.shape[1], k_mid.shape[2]
        dtype = self.select_dtype or q.dtype
        rows = q.reshape(B, Hkv, (Hq // Hkv) * T, D).to(dtype)   # query heads of one KV head, then queries
        k_top = min(self.topk, M)
        votes = torch.zeros(M, dtype=torch.long, device=q.device)
        block = max(1, SCORE_BUDGET_BYTES // (4 * B * Hkv * M))
        kt = k_mid.to(dtype).transpose(-1, -2)
        for r0 in range(0, rows.shape[2], block):
            r = rows[:, :, r0:r0 + block]
            if self.fast:
                scores = self.scratch.get((B, Hkv, r.shape[2], M), dtype, q.device)
                idx = block_topk(torch.matmul(r, kt, out=scores), k_top)[1]
            else:
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
        mirrors = sum(len(m) and m.keys().nelement() * m.keys().element_size() for m in self.select_keys)
        return sum(b.nbytes() for b in self.layers) + mirrors

    def describe(self) -> dict:
        return {"global_tokens": self.global_tokens, "span": self.span, "recall_clip": self.recall_clip,
                "topk": self.topk, "local": self.local_size(0),
                "select_dtype": str(self.select_dtype).split(".")[-1] if self.select_dtype else None}


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
    # identity=False: both kernels select the same spans (tests: same selections, logits to 1e-4)
    kernel: str = setting("fast", "selection kernel: fast (reused score buffer, exact top-k through block maxima) "
                          "or reference (the original path, kept to check against)", choices=("fast", "reference"),
                          identity=False)

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
        if self.kernel not in ("fast", "reference"):
            raise InfinictxError(f"unknown selection kernel {self.kernel!r}; choose fast or reference")
        policy = LongCachePolicy(self.window, self.global_tokens, self.span, clip, self.topk,
                                 DTYPES[self.select_dtype] if self.select_dtype else None, self.kernel == "fast")
        if policy.local_size(chunk) < 1:
            raise InfinictxError(
                f"LongCache budgets exceed the scope: global {self.global_tokens} + recall {clip}×{self.span} + "
                f"chunk {chunk} must be < W={self.window}")
        return policy, chunk

    def new_session(self, lm: LoadedModel) -> KVCacheSession:
        policy, chunk = self.policy()
        return KVCacheSession(lm, self, policy, chunk)
