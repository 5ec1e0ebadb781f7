"""Cost accounting: wall time per phase, analytic FLOPs, tokens processed, peak memory.

FLOPs are counted analytically from the model config (a multiply-add = 2 FLOPs), for a decoder with L layers,
hidden d, H query heads and Hkv key/value heads of size dh, MLP width f, vocabulary V:

  forward(n new tokens after c cached ones, logits at m positions, LoRA rank r)
      = 2·n·L·P_layer                         dense weights, P_layer = d·dh·(2H + 2Hkv) + 3·d·f
      + 2·m·d·V                               LM head, only where logits are computed
      + 4·L·H·dh·(n·c + n(n+1)/2)             attention scores QKᵀ and the weighted sum AV (causal)
      + 2·n·L·r·Σ(in+out over adapted linears) LoRA A and B (r scaled by the share of layers adapted)
  backward (base frozen, LoRA trained)
      = dense + LM head once (gradient w.r.t. inputs only, no weight gradients)
      + 2 × attention                         gradients w.r.t. Q, K and V
      + 2 × LoRA                              gradients w.r.t. inputs and LoRA weights
      (with adapters on the top layers only, the layer terms count just the layers the backward runs through)

Norms, RoPE, softmax and the optimizer are left out (each is O(n·d), under 1% here)."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   intermediate=config.intermediate_size, vocab=config.vocab_size)

    @property
    def dense_params_per_layer(self) -> int:
        d, dh = self.hidden, self.head_dim
        return d * dh * (2 * self.heads + 2 * self.kv_heads) + 3 * d * self.intermediate

    @property
    def lora_width_per_layer(self) -> int:
        """Σ(in + out) over q, k, v, o, gate, up, down: the LoRA cost per rank unit."""
        d, dh, f = self.hidden, self.head_dim, self.intermediate
        q = d + self.heads * dh
        kv = d + self.kv_heads * dh
        return 2 * q + 2 * kv + 3 * (d + f)

    def forward_flops(self, n: int, cached: int = 0, logits: int | None = None, lora_rank: float = 0) -> dict:
        m = n if logits is None else logits
        return {
            "dense": 2 * n * self.layers * self.dense_params_per_layer + 2 * m * self.hidden * self.vocab,
            "attention": 4 * self.layers * self.heads * self.head_dim * (n * cached + n * (n + 1) // 2),
            "lora": 2 * n * self.layers * lora_rank * self.lora_width_per_layer,
        }

    def backward_flops(self, n: int, cached: int = 0, logits: int | None = None, lora_rank: float = 0,
                       depth: int | None = None) -> dict:
        """`depth`: the backward runs through the top `depth` layers only (no adapter below them)."""
        f = self.forward_flops(n, cached, logits, lora_rank)
        share = 1.0 if depth is None else depth / self.layers
        m = n if logits is None else logits
        head = 2 * m * self.hidden * self.vocab
        return {"dense": head + (f["dense"] - head) * share, "attention": 2 * f["attention"] * share,
                "lora": 2 * f["lora"]}


@dataclass
class CostMeter:
    """Accumulates the cost of everything a session does. Phases: scoring, base_scoring, training, generation."""

    shape: ModelShape
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wall_s: dict = field(default_factory=dict)
    flops: dict = field(default_factory=lambda: {"forward": 0, "backward": 0, "attention": 0})
    tokens: dict = field(default_factory=lambda: {"forward": 0, "backward": 0, "generated": 0})

    @contextmanager
    def phase(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.wall_s[name] = self.wall_s.get(name, 0.0) + time.perf_counter() - start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add_forward(self, n: int, cached: int = 0, logits: int | None = None, lora_rank: float = 0):
        f = self.shape.forward_flops(n, cached, logits, lora_rank)
        self.flops["forward"] += sum(f.values())
        self.flops["attention"] += f["attention"]
        self.tokens["forward"] += n

    def add_backward(self, n: int, cached: int = 0, logits: int | None = None, lora_rank: float = 0,
                     depth: int | None = None):
        f = self.shape.backward_flops(n, cached, logits, lora_rank, depth)
        self.flops["backward"] += sum(f.values())
        self.flops["attention"] += f["attention"]
        self.tokens["backward"] += n

    def peak_memory_bytes(self) -> dict:
        out = {}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_bytes"] = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
        if self.device.type == "cuda":
            out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out

    def summary(self) -> dict:
        total_flops = self.flops["forward"] + self.flops["backward"]
        return {
            "wall_s_by_phase": {k: round(v, 3) for k, v in sorted(self.wall_s.items())},
            "flops": total_flops,
            "flops_by_kind": dict(self.flops),
            "tokens_processed": dict(self.tokens),
            **self.peak_memory_bytes(),
        }

    def state_dict(self) -> dict:
        return {"wall_s": dict(self.wall_s), "flops": dict(self.flops), "tokens": dict(self.tokens)}

    def load_state_dict(self, state: dict):
        self.wall_s, self.flops, self.tokens = dict(state["wall_s"]), dict(state["flops"]), dict(state["tokens"])
