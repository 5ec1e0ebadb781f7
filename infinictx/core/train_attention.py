"""Attention for the short training samples of CPU fine-tuning (a Temp-Lora step reads 511 tokens).

On CPU, SDPA runs torch's flash-attention kernel, whose backward is slow on short sequences: for SmolLM2's shape
(9 query heads, 3 KV heads, head size 64) at 511 tokens in bf16, forward + backward took 17.7 ms against 12.3 ms
for the plain product path (scores, softmax, product: what transformers' eager attention does) on an AMD EPYC
(Zen 4, 2 threads). The plain path keeps whole score matrices, so it only wins while they stay in cache: at 1024
tokens flash took 40 ms and the plain path 79 ms. `training_attention` takes the plain path when gradients are
on, the tensors are on CPU, and the scores (batch × heads × queries × keys) are at most `MAX_SCORES`, which also
bounds what backward keeps of them; everything else (scoring, generation, long samples or large batches, GPUs,
features it does not do) goes to transformers' SDPA function unchanged.
`use_training_attention(model)` switches a loaded model to it; `model.set_attn_implementation("sdpa")` switches
back. `core.attention.local_attention` (the decoder that methods drive themselves, MST's among them) makes the
same choice, so a training step computes the same numbers whichever decoder runs it. The results are SDPA's up
to rounding (the scores are scaled and soft-maxed in fp32)."""

from __future__ import annotations

import torch

NAME = "infinictx_sdpa"
# measured with 9 heads, batch 1: the plain path won up to 640 tokens (14%) and lost at 768 (bf16, Zen 4)
MAX_SCORES = 9 * 640 * 640
_registered = False


def plain_fits(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether `plain_attention` is the faster choice: gradients on, CPU tensors, a small score matrix."""
    return (torch.is_grad_enabled() and query.device.type == "cpu" and query.shape[1] % key.shape[1] == 0
            and query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2] <= MAX_SCORES)


def _fits(query: torch.Tensor, key: torch.Tensor, attention_mask, dropout: float, kwargs: dict) -> bool:
    if dropout or not plain_fits(query, key):
        return False
    if any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "cache", "s_aux")):
        return False
    if kwargs.get("output_attentions"):
        return False
    if attention_mask is None:
        # SDPA's causal flag aligns the mask to the top left; only square score matrices mean the same here
        return query.shape[2] == key.shape[2]
    return attention_mask.ndim == 4


def plain_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                    scale: float, causal: bool = True) -> torch.Tensor:
    """softmax(q·kᵀ · scale + mask) · v with the softmax in fp32; q (B, Hq, T, D), k and v (B, Hkv, S, D). The
    mask is boolean (True = attend) or additive; None means causal (T = S) or, with `causal` False, no mask.
    Returns (B, Hq, T, D), as SDPA does."""
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scale
    low = torch.finfo(scores.dtype).min   # not -inf: a fully masked row (a padded query) stays finite, not NaN
    if attention_mask is None and causal and query.shape[2] > 1:
        n = query.shape[2]
        upper = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(upper, low)
    elif attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, low)
    elif attention_mask is not None:
        scores = scores + attention_mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value)


def training_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function interface: the plain path for short CPU training samples, else SDPA."""
    if _fits(query, key, attention_mask, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        causal = kwargs.get("is_causal")
        causal = causal if causal is not None else getattr(module, "is_causal", True)
        out = plain_attention(query, key, value, attention_mask, scale, causal)
        return out.transpose(1, 2).contiguous(), None   # (B, T, Hq, D), as transformers' functions return
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register():
    """Make NAME a transformers attention implementation (with SDPA's masks)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, training_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True


def use_training_attention(model: torch.nn.Module) -> bool:
    """Run `model`'s attention through `training_attention` if it uses SDPA; returns whether it does."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
