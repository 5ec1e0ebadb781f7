"""Sliding-window attention without the masked-out work.

A model with sliding-window layers (Gemma-3: 5 of every 6 layers see only the last 512 positions) gets, from
transformers' SDPA path, a full T × T mask for those layers: every query is scored against every key and most
scores are then thrown away. For a long prompt or a training sample (thousands of tokens) that is most of the
attention's time and memory. `banded_sdpa` cuts the queries into blocks of `sliding_window` and gives each block
only the keys its band can reach (the block's span plus the window before it), with the same mask entries: the
same result, at O(T · window) instead of O(T²).

It is exact by construction and checks it: a block whose mask allows a key outside its band (keys not stored
in position order, as in translation's branch decoding) runs over all keys, like the stock path. Short inputs
(a decoding step) take the stock path directly. Each piece runs through `train_attention.training_attention`:
SDPA, or the plain product path for short CPU training samples. `use_banded_attention(model)` switches a loaded
model to it when the model has sliding-window layers and runs SDPA."""

from __future__ import annotations

import torch

from .train_attention import training_attention

NAME = "infinictx_banded_sdpa"
_registered = False


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def banded_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, sliding_window=None,
                **kwargs):
    q_len, k_len = query.shape[2], key.shape[2]
    if (not sliding_window or attention_mask is None or attention_mask.ndim != 4 or q_len < 2 * sliding_window
            or k_len < q_len):
        return training_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  sliding_window=sliding_window, **kwargs)
    offset = k_len - q_len   # keys before the first query (a cache), in position order
    outs = []
    for s in range(0, q_len, sliding_window):
        e = min(q_len, s + sliding_window)
        lo, hi = max(0, offset + s - sliding_window + 1), offset + e
        mask = attention_mask[:, :, s:e]
        if _allowed(mask[..., :lo]).any() or _allowed(mask[..., hi:]).any():
            lo, hi = 0, k_len   # not a band: this block reads every key
        out, _ = training_attention(module, query[:, :, s:e], key[:, :, lo:hi], value[:, :, lo:hi],
                                    mask[..., lo:hi], dropout=dropout, scaling=scaling,
                                    sliding_window=sliding_window, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), None   # (B, T, H, D), as the stock function returns


def use_banded_attention(model: torch.nn.Module) -> bool:
    """Run `model`'s attention through `banded_sdpa` if it has sliding-window layers and uses SDPA; returns
    whether it does."""
    global _registered
    config = model.config
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    if not sliding or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, banded_sdpa)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    model.set_attn_implementation(NAME)
    return True
