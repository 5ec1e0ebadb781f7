"""KV-cache policies: what each layer keeps of the past and which of it each query attends to.

A policy is a small object hooked into every attention layer (kvpress's "press", but owning the cache): the
session runs the model's own modules layer by layer (`core.attention.decoder_forward`) and hands each layer's new
queries, keys and values (before RoPE) to `policy.attend`, which attends over what it keeps and, on commit,
stores the new tokens under its rule. Policies in this package:

  full       every token, at its absolute position: the stock model (the reference; positions grow unbounded)
  streaming  StreamingLLM: `sinks` first tokens + the most recent ones, scope W, re-positioned 0..L−1
  longcache  LongCache / ReAttention (`longcache.py`): full pre-RoPE cache, per-chunk top-k span selection,
             re-positioned inside a scope W
  razor      RazorAttention (`razor.py`): full cache for retrieval heads, sink + recent window + one
             compensation token for the others

Every policy runs under one session (`KVCacheSession`): prefill chunk by chunk (Δ tokens per forward, so peak
memory is bounded), generation token by token, `kv_bytes()` = the bytes of keys and values actually held. Temp-Lora
goes on top like on any method (`temp_lora=`): after each absorbed chunk the learner trains its adapter on it
while the policy's cache keeps the past."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from ...core.attention import KVBuffer, Rope, base_causal_lm, check_supported, decoder_forward, local_attention
from ...core.errors import InfinictxError
from ...core.models import LoadedModel
from ...core.registry import register_method, setting
from ...core.session import Capabilities, StatefulSession, check_window
from ..base import MethodConfig


def check_positive(**values):
    for name, value in values.items():
        if value is None or value <= 0:
            raise InfinictxError(f"{name.replace('_', ' ')} must be > 0 (got {value})")


def check_ratio(name: str, value: float, low_open: bool = True, high_open: bool = True):
    ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise InfinictxError(f"{name} must be in {interval} (got {value})")


class KVPolicy:
    """Base of the policies. A policy keeps per-layer state, made by `start(n_layers)`.

    attend(i, a, q, k, v, past, rope, commit) -> (B, Hq, T, D): q, k, v are the new tokens' projections before
    RoPE; `past` tokens came before them; `rope` rotates at chosen positions. With commit the new tokens are
    stored (under the policy's rule); without, the state stays as it was."""

    name = "policy"
    scope: int | None = None   # most keys one query attends to (None: unbounded)
    acts_at_end_of_prompt = False  # end_prompt() changes what is kept

    def start(self, n_layers: int):
        raise NotImplementedError

    def attend(self, i: int, a, q, k, v, past: int, rope: Rope, commit: bool) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of keys and values held (all layers)."""
        raise NotImplementedError

    def end_prompt(self):
        """The prompt is in: a policy that reads it with a dense cache compresses now."""

    def keys_seen(self, past: int, n_new: int) -> int:
        """Keys before the new tokens that a query attends to (for FLOP accounting)."""
        return past if self.scope is None else min(past, self.scope - n_new)

    def extra_flops(self) -> int:
        """FLOPs spent beyond attention itself since the last call (e.g. LongCache's selection scores)."""
        return 0

    def fork(self) -> "KVPolicy":
        """An independent copy of the policy and its state."""
        return copy.deepcopy(self)

    def describe(self) -> dict:
        return {}


class FullPolicy(KVPolicy):
    """Every token's keys (rotated at their absolute positions, as transformers caches them) and values."""

    name = "full"

    def start(self, n_layers: int):
        self.layers = [KVBuffer() for _ in range(n_layers)]

    def attend(self, i, a, q, k, v, past, rope, commit):
        buf = self.layers[i]
        buf.append(rope.rotate(k, past), v)  # then attend over a view: no copy of the whole past per step
        out = local_attention(rope.rotate(q, past), buf.keys(), buf.values(), a.scaling)
        if not commit:
            buf.truncate(past)
        return out

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.layers)


class StreamingPolicy(KVPolicy):
    """StreamingLLM (Xiao et al., arXiv 2309.17453): the first `sinks` tokens (attention sinks) + the most
    recent tokens, at most `window` keys per query; keys are kept before RoPE and rotated at their positions
    in the cache (0..L−1), so positions never exceed the window (the paper's "rolling" positions)."""

    name = "streaming"

    def __init__(self, window: int, sinks: int = 4):
        self.scope, self.sinks = window, sinks

    def start(self, n_layers: int):
        self.k = [None] * n_layers
        self.v = [None] * n_layers

    def attend(self, i, a, q, k, v, past, rope, commit):
        T = q.shape[2]
        k_old, v_old = self.k[i], self.v[i]
        if k_old is not None:
            n_out = k_old.shape[2] + T - self.scope  # make room: the oldest non-sink tokens leave
            if n_out > 0:
                s = self.sinks
                k_old = torch.cat([k_old[:, :, :s], k_old[:, :, s + n_out:]], dim=2)
                v_old = torch.cat([v_old[:, :, :s], v_old[:, :, s + n_out:]], dim=2)
            k, v = torch.cat([k_old, k], dim=2), torch.cat([v_old, v], dim=2)
        L = k.shape[2]
        out = local_attention(rope.rotate(q, L - T), rope.rotate(k, 0), v, a.scaling)
        if commit:
            self.k[i], self.v[i] = k, v
        return out

    def nbytes(self) -> int:
        return sum(2 * k.nbytes for k in self.k if k is not None)

    def describe(self) -> dict:
        return {"sinks": self.sinks}


class KVCacheSession(StatefulSession):
    """A stream read under a KV-cache policy, chunk by chunk. No base variant: the reference, a full cache, is
    another policy: compare sessions."""

    def __init__(self, lm: LoadedModel, config, policy: KVPolicy, chunk: int):
        cfg = base_causal_lm(lm.model).config
        # W for the base class: the policy's scope, else the model's trained window (used for the repetition
        # penalty's recent tokens and the plain-window base scoring)
        window = policy.scope or getattr(cfg, "max_position_embeddings", None) or 4096
        super().__init__(lm, config, window, chunk)
        check_supported(lm.model)
        self.policy = policy
        self.n_layers = cfg.num_hidden_layers
        self.rope = Rope(self.model, lm.device, lm.dtype)
        policy.start(self.n_layers)
        self.processed = 0   # tokens run through the model and committed

    @property
    def capabilities(self) -> Capabilities:
        return replace(super().capabilities, end_prompt=self.policy.acts_at_end_of_prompt)

    @property
    def min_text_tokens(self) -> int:
        return self.policy.scope or self.chunk  # a full cache has no window: one chunk is enough

    def _process(self, tokens: torch.Tensor, commit: bool, all_logits: bool) -> torch.Tensor:
        T, past = len(tokens), self.processed

        def attend(i, a, q, k, v):
            return self.policy.attend(i, a, q, k, v, past, self.rope, commit)

        logits = decoder_forward(self.model, tokens.to(self.device)[None], attend,
                                 logits_to_keep=None if all_logits else 1)[0]
        self.meter.add_forward(T, self.policy.keys_seen(past, T), T if all_logits else 1, self.lora_rank)
        extra = self.policy.extra_flops()
        self.meter.flops["forward"] += extra
        self.meter.flops["attention"] += extra
        if commit:
            self.processed += T
        return logits

    def kv_bytes(self) -> int:
        return self.policy.nbytes()

    def end_prompt(self):
        self.policy.end_prompt()

    def details(self) -> dict:
        return {"policy": self.policy.name, "window": self.policy.scope, "chunk": self.chunk,
                **self.policy.describe(), **super().details()}

    # --- forks, resume, clean-up ------------------------------------------------------------------------
    def _fork_state(self, other: "KVCacheSession"):
        other.policy = self.policy.fork()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "processed": self.processed, "policy": self.policy.fork()}

    def load_state_dict(self, state: dict, history: torch.Tensor):
        super().load_state_dict(state, history)
        self.processed, self.policy = state["processed"], state["policy"].fork()

    def close(self):
        super().close()
        self.policy.start(self.n_layers)  # drop the cache


@register_method("full")
@dataclass
class FullConfig(MethodConfig):
    chunk: int = setting(512, "Δ: tokens per prefill forward", short="-D")

    def validate(self):
        check_positive(chunk=self.chunk)

    def new_session(self, lm: LoadedModel) -> KVCacheSession:
        return KVCacheSession(lm, self, FullPolicy(), self.chunk)


@register_method("streaming")
@dataclass
class StreamingConfig(MethodConfig):
    window: int = setting(1024, "W: keys one query sees (sinks + recent)", short="-W")
    sinks: int = setting(4, "attention-sink tokens every head keeps")
    chunk: int | None = setting(None, "Δ: tokens per prefill forward (default W/4)", short="-D")

    def resolved_chunk(self) -> int:
        return self.chunk if self.chunk is not None else max(1, self.window // 4)

    def validate(self):
        check_positive(window=self.window)
        chunk = self.resolved_chunk()
        check_window(self.window, chunk)
        if not 0 <= self.sinks <= self.window - chunk - 1:
            raise InfinictxError(f"sinks ({self.sinks}) must be in [0, W − Δ − 1] = [0, {self.window - chunk - 1}]")

    def new_session(self, lm: LoadedModel) -> KVCacheSession:
        return KVCacheSession(lm, self, StreamingPolicy(self.window, self.sinks), self.resolved_chunk())
