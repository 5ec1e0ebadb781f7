"""A Llama-family decoder forward whose attention is done by the method, one layer at a time.

transformers' own forward applies RoPE at absolute positions and keeps one KV cache for every head alike. The
methods that reshape attention (a retrieval memory, KV-cache selection with re-positioning, per-head
compression) need the keys and values *before* RoPE and need to choose, per layer, what each query sees. So
this module runs the model's own modules (embeddings, norms, projections, MLPs, LM head: any adapter wrapped
around them, e.g. a Temp-Lora LoRA, keeps working) and hands each layer's pre-RoPE queries, keys and values
to an `attend(layer_idx, attn_module, q, k, v)` callback chosen by the method.

Supported: decoders shaped like Llama (Llama, Mistral, Qwen2, Qwen3 with its q/k norms, SmolLM, LongLLaMA
checkpoints loaded as Llama)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .errors import InfinictxError
from .train_attention import plain_attention, plain_fits

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}

# attend(layer_idx, attention_module, q (B, Hq, T, D), k (B, Hkv, T, D), v (B, Hkv, T, D)) -> (B, Hq, T, D)
Attend = Callable[[int, torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def base_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM under any peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_supported(model: torch.nn.Module) -> bool:
    return getattr(base_causal_lm(model).config, "model_type", None) in SUPPORTED


def check_supported(model: torch.nn.Module):
    kind = getattr(base_causal_lm(model).config, "model_type", None)
    if kind not in SUPPORTED:
        raise InfinictxError(f"this method needs a Llama-family decoder ({', '.join(sorted(SUPPORTED))}); "
                             f"the model is {kind!r}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope:
    """RoPE at chosen positions, from the model's own rotary module (so scaled RoPE variants work too).

    rotate(x, start) rotates x (..., T, D) as if its tokens sat at positions start .. start+T−1;
    rotate_at(x, positions) takes explicit positions (T,). Tables grow on demand."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.rotary = base_causal_lm(model).model.rotary_emb
        self.device, self.dtype = device, dtype
        self.cos = self.sin = None

    def _table(self, n: int):
        if self.cos is None or self.cos.shape[0] < n:
            size = max(n, 256, 2 * (0 if self.cos is None else self.cos.shape[0]))
            probe = torch.empty(0, device=self.device, dtype=self.dtype)
            cos, sin = self.rotary(probe, torch.arange(size, device=self.device)[None])
            self.cos, self.sin = cos[0], sin[0]

    def rotate(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        n = x.shape[-2]
        self._table(start + n)
        cos, sin = self.cos[start:start + n], self.sin[start:start + n]
        return x * cos + rotate_half(x) * sin

    def rotate_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._table(int(positions.max()) + 1)
        cos, sin = self.cos[positions], self.sin[positions]
        return x * cos + rotate_half(x) * sin


def causal_mask(n_queries: int, n_keys: int, device) -> torch.Tensor | None:
    """Boolean mask (True = may attend) for queries that are the last `n_queries` of `n_keys` positions."""
    if n_queries == 1:
        return None
    q = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    return torch.arange(n_keys, device=device)[None, :] <= q


_ADDITIVE_MASKS: dict = {}


def additive_causal_mask(n_queries: int, n_keys: int, device, dtype) -> torch.Tensor | None:
    """`causal_mask` as 0 / −inf in the scores' dtype, cached: the fused CPU kernel takes it ~16% faster than a
    boolean mask (converted on every call; 128 queries × 1,024 keys, 9 heads: 3.8 vs 4.6 ms)."""
    if n_queries == 1:
        return None
    key = (n_queries, n_keys, str(device), dtype)
    mask = _ADDITIVE_MASKS.get(key)
    if mask is None:
        if len(_ADDITIVE_MASKS) >= 32:
            _ADDITIVE_MASKS.clear()
        allowed = causal_mask(n_queries, n_keys, device)
        mask = _ADDITIVE_MASKS[key] = torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill_(
            ~allowed, float("-inf"))
    return mask


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of T queries (already rotated) over L ≥ T keys, the queries being the last T of them.
    Short CPU training samples take the plain product path, as the model's own attention does (`train_attention`)."""
    if plain_fits(q, k):
        return plain_attention(q, k, v, causal_mask(q.shape[2], k.shape[2], q.device), scale, causal=False)
    gqa = q.shape[1] != k.shape[1]
    if q.shape[2] == k.shape[2] > 1:  # no mask tensor: the fused causal kernel (2x faster, O(T) memory on CPU)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = additive_causal_mask(q.shape[2], k.shape[2], q.device, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _attention_block(layer, h: torch.Tensor, index: int, attend: Attend) -> torch.Tensor:
    a = layer.self_attn
    B, T, _ = h.shape
    x = layer.input_layernorm(h)
    shape = (B, T, -1, a.head_dim)
    q, k, v = a.q_proj(x).view(shape), a.k_proj(x).view(shape), a.v_proj(x).view(shape)
    if hasattr(a, "q_norm"):  # Qwen3 normalises queries and keys per head before RoPE
        q, k = a.q_norm(q), a.k_norm(k)
    out = attend(index, a, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return h + a.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def _mlp_block(layer, h: torch.Tensor) -> torch.Tensor:
    return layer.mlp(layer.post_attention_layernorm(h))


def spans(n: int, chunks: int) -> list[tuple[int, int]]:
    """`chunks` contiguous (start, end) ranges covering 0..n exactly (sizes differ by at most one; never empty:
    fewer ranges when n < chunks)."""
    chunks = max(1, min(chunks, n))
    size, extra = divmod(n, chunks)
    out, start = [], 0
    for c in range(chunks):
        end = start + size + (c < extra)
        out.append((start, end))
        start = end
    return out


def _maybe_checkpoint(on: bool, fn, *args, context_fn=None):
    if not on:
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, **({"context_fn": context_fn} if context_fn else {}))


def _fused_attention_ops() -> set:
    """The aten kernels behind F.scaled_dot_product_attention (CPU flash, CUDA flash / efficient / cuDNN)."""
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    return {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}


def _keep_attention_outputs():
    """Selective checkpointing context: backward recomputes an attention block's projections and RoPE but takes
    the fused attention kernel's outputs (output and log-sum-exp: one hidden-size tensor per layer) from forward,
    so the O(T²) attention runs once, not twice. Any other op is recomputed as in plain checkpointing."""
    keep = _fused_attention_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)


def decoder_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attend: Attend, checkpoint_layers: bool = False,
                   mlp_chunks: int = 1, save_attention: bool = False) -> torch.Tensor:
    """Final normalised hidden states (B, T, H) of `input_ids`, each layer's attention done by
    `attend(i, attn_module, q, k, v)` (projections before RoPE). Training memory savers (`training.mst`), active
    with gradients on: `checkpoint_layers` recomputes each attention block and MLP in backward from its input
    (`save_attention`: except the fused attention kernel, whose outputs are kept); `mlp_chunks` > 1 runs the MLP
    over that many mini-sequences of tokens, each recomputed in backward. With either, `attend` must be free of
    side effects: backward calls it again."""
    inner = base_causal_lm(model).model
    h = inner.embed_tokens(input_ids)
    training = torch.is_grad_enabled()
    ckpt = checkpoint_layers and training
    context_fn = _keep_attention_outputs if save_attention else None
    for i, layer in enumerate(inner.layers):
        h = _maybe_checkpoint(ckpt, _attention_block, layer, h, i, attend, context_fn=context_fn)
        if mlp_chunks > 1:
            h = h + torch.cat([_maybe_checkpoint(training, _mlp_block, layer, h[:, s:e])
                               for s, e in spans(h.shape[1], mlp_chunks)], dim=1)
        else:
            h = h + _maybe_checkpoint(ckpt, _mlp_block, layer, h)
    return inner.norm(h)


def decoder_forward(model: torch.nn.Module, input_ids: torch.Tensor, attend: Attend,
                    logits_to_keep: int | None = None) -> torch.Tensor:
    """Logits (B, T or logits_to_keep, V) of `input_ids` (B, T), with each layer's attention done by `attend`."""
    h = decoder_hidden(model, input_ids, attend)
    if logits_to_keep:
        h = h[:, -logits_to_keep:]
    return base_causal_lm(model).lm_head(h)


class LocalKV:
    """A layer's recent keys and values, kept *before* RoPE and rotated at positions counted from the start of the
    local window (0 .. L−1) on every use: positions then never exceed the window the model was trained on, however
    long the stream. The reference path of `RotatedWindow` (same interface)."""

    def __init__(self):
        self.k = self.v = None
        self._pending = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def with_new(self, k: torch.Tensor, v: torch.Tensor, rope: Rope):
        """The window + new tokens (kept aside until `commit`): rotated keys, values, keys before RoPE, and the
        position of the first new token (rotate the queries there)."""
        k_all, v_all = (k, v) if self.k is None else (torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2))
        self._pending = (k_all, v_all)
        return rope.rotate(k_all, 0), v_all, k_all, k_all.shape[2] - k.shape[2]

    def commit(self, n: int):
        self.k, self.v = self._pending
        self._pending = None

    def set(self, k: torch.Tensor | None, v: torch.Tensor | None, rope: Rope | None = None, start: int = 0):
        self.k, self.v = k, v

    def pop_oldest(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove and return the oldest n tokens' keys and values."""
        old = (self.k[:, :, :n], self.v[:, :, :n])
        self.k, self.v = self.k[:, :, n:].contiguous(), self.v[:, :, n:].contiguous()
        return old

    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes

    def live(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v

    def copy(self, rope: Rope | None = None) -> "LocalKV":
        other = LocalKV()   # the tensors are never modified in place: sharing them is a copy
        other.set(self.k, self.v)
        return other


class RotatedWindow:
    """A layer's local window kept rotated, in a preallocated buffer (the fast path of `LocalKV`).

    Slots 0..capacity−1 hold keys and values before RoPE and the keys rotated at their slot number. Tokens
    leave from the front by moving `start`; new ones are written after `end`; when the end reaches the
    capacity, the live window moves to the front and is rotated again (once every capacity − W tokens, not on
    every step). A query rotated at its own slot sees each key at the same distance as when the window is
    rotated at 0..L−1 with the query last: RoPE scores depend only on that distance, so attention is the same
    (up to float rounding), without re-rotating and re-concatenating the window for every token."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.k = self.v = self.kr = None
        self.start = self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def _room(self, n: int, like: torch.Tensor, rope: Rope):
        if self.k is None:
            shape = (*like.shape[:2], max(self.capacity, n), like.shape[3])
            self.k, self.v, self.kr = (like.new_empty(shape) for _ in range(3))
        if self.end + n > self.k.shape[2]:
            live = len(self)
            if live + n > self.k.shape[2]:
                raise ValueError(f"window buffer too small: {live} + {n} > {self.k.shape[2]}")
            for buf in (self.k, self.v):
                buf[:, :, :live] = buf[:, :, self.start:self.end].clone()
            self.start, self.end = 0, live
            self.kr[:, :, :live] = rope.rotate(self.k[:, :, :live], 0)

    def with_new(self, k: torch.Tensor, v: torch.Tensor, rope: Rope):
        """Write the new tokens after the window (not yet committed: the next call overwrites them unless
        `commit`): returns the rotated keys, the values and the pre-RoPE keys of window + new tokens, and the
        slot of the first new token (rotate the queries there)."""
        T = k.shape[2]
        self._room(T, k, rope)
        e = self.end
        self.k[:, :, e:e + T], self.v[:, :, e:e + T] = k, v
        self.kr[:, :, e:e + T] = rope.rotate(k, e)
        window = slice(self.start, e + T)
        return self.kr[:, :, window], self.v[:, :, window], self.k[:, :, window], e

    def commit(self, n: int):
        self.end += n

    def pop_oldest(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove and return the oldest n tokens' keys and values (views: use them before the next write)."""
        old = (self.k[:, :, self.start:self.start + n], self.v[:, :, self.start:self.start + n])
        self.start += n
        return old

    def live(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            return None, None
        return self.k[:, :, self.start:self.end], self.v[:, :, self.start:self.end]

    def set(self, k: torch.Tensor | None, v: torch.Tensor | None, rope: Rope, start: int = 0):
        """Hold these keys and values, from slot `start` (a restored or forked window keeps its slots, so its
        rotated keys are bitwise those of the original)."""
        self.k = self.v = self.kr = None
        self.start = self.end = 0
        if k is not None:
            n = k.shape[2]
            self._room(start + n, k, rope)
            self.k[:, :, start:start + n], self.v[:, :, start:start + n] = k, v
            self.kr[:, :, start:start + n] = rope.rotate(k, start)
            self.start, self.end = start, start + n

    def copy(self, rope: Rope) -> "RotatedWindow":
        other = RotatedWindow(self.capacity)
        other.set(*self.live(), rope, self.start)
        return other

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * len(self) * self.k[:, :, :1].nelement() * self.k.element_size()


class KVBuffer:
    """Keys and values (B, H, N, D) of a growing token sequence, in a buffer that grows by doubling, so appending
    a chunk costs the chunk, not the whole past. Stored in `dtype`; `nbytes` counts the tokens held."""

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype
        self.k = self.v = None
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, k: torch.Tensor, v: torch.Tensor):
        n = k.shape[2]
        if self.k is None or self.size + n > self.k.shape[2]:
            cap = max(self.size + n, 2 * (0 if self.k is None else self.k.shape[2]), 256)
            dtype = self.dtype or k.dtype
            new_k = k.new_empty(*k.shape[:2], cap, k.shape[3], dtype=dtype)
            new_v = v.new_empty(*v.shape[:2], cap, v.shape[3], dtype=dtype)
            if self.size:
                new_k[:, :, :self.size] = self.k[:, :, :self.size]
                new_v[:, :, :self.size] = self.v[:, :, :self.size]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.size:self.size + n] = k
        self.v[:, :, self.size:self.size + n] = v
        self.size += n

    def truncate(self, n: int):
        """Forget every token after the first n (e.g. the new tokens of an uncommitted forward)."""
        self.size = min(self.size, n)

    def keys(self) -> torch.Tensor:
        return self.k[:, :, :self.size]

    def values(self) -> torch.Tensor:
        return self.v[:, :, :self.size]

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k[:, :, :self.size].nelement() * self.k.element_size()

    def copy(self) -> "KVBuffer":
        """An independent copy (appends to one do not show in the other)."""
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__)
        if self.k is not None:
            other.k, other.v = self.k[:, :, :self.size].clone(), self.v[:, :, :self.size].clone()
        return other
