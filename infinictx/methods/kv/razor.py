"""RazorAttention (Tang et al., arXiv 2407.15891): full cache for retrieval heads only.

Offline, once per model, a probe (BOS + random tokens repeated; `infinictx/analysis/heads.py`) scores every KV head as
echo head (attends to earlier copies of the current token) and induction head (attends to the token that
followed them). The top `induction_ratio` of (layer, KV head) pairs by induction score and the top `echo_ratio`
by echo score are **retrieval heads**: they keep the full cache. Every other head keeps the first `sinks`
tokens, the most recent max(S0, N/C) tokens (N = tokens read so far, C = 1/keep_ratio, S0 = `min_window`) and
one **compensation token**: the mean of the keys and of the values it dropped. In attention the compensation
token stands for the n dropped tokens: its logit gets + log n (the paper's eq. 5; "mean" leaves it unweighted
as the Huawei code does, "none" drops it).

Defaults differ from the paper's (induction 14%, echo 1%, C set per model) where the embedded 135M model
needed it: passkey at 4K tokens, 4 trials (full cache: 3/4) was 1/4 with 14% + 1% heads, 2/4 with 30% + 5%, and
3/4 with 14% induction + 10% echo heads (its echo heads in layers 7, 8, 14, 15 carry the needle); with C = 16 the
cache is then 72% smaller at 4K. So: echo_ratio 0.10, keep_ratio 1/16, S0 = 256.

When to compress (`prefill`): "dense" reads the prompt with every head's full cache and compresses when it ends
(`end_prompt`, called by the passkey harness and before generating), as the paper and kvpress do: the cache
is bounded while answering, not while reading. "chunked" (default, the only way a stream that never ends,
like streaming perplexity, gets a bounded cache) compresses after every chunk, so the non-retrieval heads of
later tokens never saw the early context. Measured (`benchmarks/results/kv_policies.md`, 6 trials): passkey with
dense prefill equals the full cache at 1K-8K (83/100/83/50%) with 57/67/72/72% fewer bytes; chunked fails at
8K (0%) and raises perplexity on 8K tokens of the book by 9% (7% without the log-n weighting).

Keys are cached after RoPE at their true positions, as in the paper: this compresses a cache inside the model's
trained window, it does not extend it. The saving is real: the non-retrieval heads' caches are separate,
short tensors (`kv_bytes` counts what is held)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...analysis.heads import retrieval_heads
from ...core.attention import KVBuffer, base_causal_lm, check_supported, local_attention
from ...core.errors import InfinictxError
from ...core.models import LoadedModel
from ...core.registry import register_method, setting
from ..base import MethodConfig
from .cache import KVCacheSession, KVPolicy, check_positive, check_ratio

COMPENSATIONS = ("weighted", "mean", "none")
PREFILLS = ("chunked", "dense")


class _Layer:
    """One layer's caches: `full` for the retrieval KV heads; sinks, recent window and compensation token for
    the others (all rotated keys)."""

    def __init__(self, retrieval: list[int], n_kv: int, group: int):
        others = [h for h in range(n_kv) if h not in retrieval]
        self.r, self.o = torch.tensor(retrieval, dtype=torch.long), torch.tensor(others, dtype=torch.long)
        # query heads of each set (query head j reads KV head j // group)
        self.qr = torch.tensor([h * group + j for h in retrieval for j in range(group)], dtype=torch.long)
        self.qo = torch.tensor([h * group + j for h in others for j in range(group)], dtype=torch.long)
        self.full = KVBuffer()
        self.sink_k = self.sink_v = self.recent_k = self.recent_v = self.comp_k = self.comp_v = None
        self.dropped = 0
        self.seen = 0   # tokens this layer has read

    def tensors(self):
        return [t for t in (self.sink_k, self.sink_v, self.recent_k, self.recent_v, self.comp_k, self.comp_v)
                if t is not None]


def _cat(a, b):
    return b if a is None else torch.cat([a, b], dim=2)


class RazorPolicy(KVPolicy):
    name = "razor"

    def __init__(self, heads: dict[int, list[int]], n_kv: int, group: int, keep_ratio: float = 0.0625,
                 min_window: int = 256, sinks: int = 4, compensation: str = "weighted", prefill: str = "chunked"):
        self.heads, self.n_kv, self.group = heads, n_kv, group
        self.keep_ratio, self.min_window, self.sinks, self.compensation = keep_ratio, min_window, sinks, compensation
        self.prefill = prefill
        self.acts_at_end_of_prompt = prefill == "dense"

    def start(self, n_layers: int):
        self.layers = [_Layer(self.heads.get(i, []), self.n_kv, self.group) for i in range(n_layers)]
        # "dense": the prompt is read with every head's full cache, compressed once it ends (as the paper and
        # kvpress do); "chunked": compressed after every chunk, so the cache stays bounded while reading
        self.compressing = self.prefill == "chunked"

    def end_prompt(self):
        if not self.compressing:
            self.compressing = True
            for st in self.layers:
                self._compress(st, st.seen)

    def attend(self, i, a, q, k, v, past, rope, commit):
        st = self.layers[i]
        T = q.shape[2]
        qr, kr = rope.rotate(q, past), rope.rotate(k, past)
        out = q.new_empty(q.shape)
        if len(st.r):
            st.full.append(kr[:, st.r], v[:, st.r])
            out[:, st.qr] = local_attention(qr[:, st.qr], st.full.keys(), st.full.values(), a.scaling)
            if not commit:
                st.full.truncate(past)
        if len(st.o):
            k_new, v_new = kr[:, st.o], v[:, st.o]
            parts_k = [t for t in (st.sink_k, st.comp_k, st.recent_k) if t is not None] + [k_new]
            parts_v = [t for t in (st.sink_v, st.comp_v, st.recent_v) if t is not None] + [v_new]
            keys, values = torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2)
            n_old = keys.shape[2] - T
            bias = torch.zeros(T, keys.shape[2], dtype=q.dtype, device=q.device)
            bias[:, n_old:] = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
            if st.comp_k is not None and self.compensation == "weighted":
                sink_len = 0 if st.sink_k is None else st.sink_k.shape[2]
                bias[:, sink_len] = math.log(st.dropped)
            out[:, st.qo] = F.scaled_dot_product_attention(qr[:, st.qo], keys, values, attn_mask=bias,
                                                           scale=a.scaling, enable_gqa=self.group > 1)
            if commit:
                self._store(st, k_new, v_new)
                st.seen = past + T
                if self.compressing:
                    self._compress(st, st.seen)
        return out

    def window(self, n_tokens: int) -> int:
        """Recent tokens a non-retrieval head keeps after n_tokens: max(S0, N/C)."""
        return max(self.min_window, math.ceil(n_tokens * self.keep_ratio))

    def _store(self, st: _Layer, k: torch.Tensor, v: torch.Tensor):
        have = 0 if st.sink_k is None else st.sink_k.shape[2]
        if have < self.sinks:  # the stream's first tokens become the sinks
            take = self.sinks - have
            st.sink_k, st.sink_v = _cat(st.sink_k, k[:, :, :take]), _cat(st.sink_v, v[:, :, :take])
            k, v = k[:, :, take:], v[:, :, take:]
        st.recent_k, st.recent_v = _cat(st.recent_k, k), _cat(st.recent_v, v)

    def _compress(self, st: _Layer, n_tokens: int):
        """Keep the last max(S0, N/C) recent tokens; fold the dropped ones into the compensation token."""
        drop = 0 if st.recent_k is None else st.recent_k.shape[2] - self.window(n_tokens)
        if drop > 0:
            if self.compensation != "none":  # running mean of everything dropped so far
                n = st.dropped
                sum_k = st.recent_k[:, :, :drop].sum(2, keepdim=True)
                sum_v = st.recent_v[:, :, :drop].sum(2, keepdim=True)
                st.comp_k = sum_k / (n + drop) if st.comp_k is None else (st.comp_k * n + sum_k) / (n + drop)
                st.comp_v = sum_v / (n + drop) if st.comp_v is None else (st.comp_v * n + sum_v) / (n + drop)
            st.dropped += drop
            # clone: a view would keep the whole old tensor alive, and the bytes would not really be freed
            st.recent_k, st.recent_v = st.recent_k[:, :, drop:].clone(), st.recent_v[:, :, drop:].clone()

    def nbytes(self) -> int:
        return sum(st.full.nbytes() + sum(t.nbytes for t in st.tensors()) for st in self.layers)

    def keys_seen(self, past: int, n_new: int) -> int:
        # mean over KV heads and layers of the keys a query attends to
        n_heads = len(self.layers) * self.n_kv
        kept = self.sinks + 1 + self.window(past) if self.compressing else past
        held = sum(len(st.r) * past + len(st.o) * min(past, kept) for st in self.layers)
        return held // max(1, n_heads)

    def describe(self) -> dict:
        return {"keep_ratio": self.keep_ratio, "min_window": self.min_window, "sinks": self.sinks,
                "compensation": self.compensation, "prefill": self.prefill,
                "retrieval_heads": sum(len(h) for h in self.heads.values()),
                "kv_heads": len(self.layers) * self.n_kv if hasattr(self, "layers") else None,
                "heads": {str(i): h for i, h in self.heads.items() if h}}


@register_method("razor")
@dataclass
class RazorConfig(MethodConfig):
    chunk: int = setting(512, "Δ: tokens per prefill forward", short="-D")
    keep_ratio: float = setting(0.0625, "1/C: share of the tokens read that a non-retrieval head keeps (recent)")
    min_window: int = setting(256, "S0: recent tokens a non-retrieval head keeps at least")
    sinks: int = setting(4, "first tokens every head keeps")
    induction_ratio: float = setting(0.14, "share of KV heads kept whole for their induction score")
    echo_ratio: float = setting(0.10, "share of KV heads kept whole for their echo score (paper: 0.01; see the "
                                "module docstring)")
    compensation: str = setting("weighted", "compensation token weighted by the dropped count (eq. 5: + log n), "
                                "plain mean, or none", choices=COMPENSATIONS)
    prefill: str = setting("chunked", "compress after every chunk (bounded while reading) or once the prompt is "
                           "in (as the paper and kvpress; passkey/generate only: perplexity never ends a prompt)",
                           choices=PREFILLS)

    def validate(self):
        check_positive(chunk=self.chunk, min_window=self.min_window)
        check_ratio("keep ratio (1/C)", self.keep_ratio)
        check_ratio("induction ratio", self.induction_ratio, low_open=False, high_open=False)
        check_ratio("echo ratio", self.echo_ratio, low_open=False, high_open=False)
        if self.sinks < 0:
            raise InfinictxError(f"sinks must be >= 0 (got {self.sinks})")
        if self.compensation not in COMPENSATIONS:
            raise InfinictxError(f"unknown compensation {self.compensation!r}; choose one of "
                                 f"{', '.join(COMPENSATIONS)}")
        if self.prefill not in PREFILLS:
            raise InfinictxError(f"unknown prefill {self.prefill!r}; choose one of {', '.join(PREFILLS)}")

    def new_session(self, lm: LoadedModel) -> KVCacheSession:
        check_supported(lm.model)   # before the head search, which runs the model's own layers
        model = base_causal_lm(lm.model)
        cfg = model.config
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        heads = retrieval_heads(model, self.induction_ratio, self.echo_ratio, bos_id=lm.tokenizer.bos_token_id)
        policy = RazorPolicy(heads, n_kv, cfg.num_attention_heads // n_kv, self.keep_ratio, self.min_window,
                             self.sinks, self.compensation, self.prefill)
        return KVCacheSession(lm, self, policy, self.chunk)
