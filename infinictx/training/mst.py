"""Mini-Sequence Transformer (Luo et al., arXiv 2407.15892): train on long sequences at a fraction of the memory.

In a Llama step the biggest activations are the widest ones: the logits (tokens × vocabulary, 49K words here)
and the MLP's intermediate (tokens × 2.7 hidden). MST runs both over **mini-sequences** (chunks of tokens):

- LM head + cross-entropy (`token_nll`): each chunk's logits are computed, turned into per-token NLLs and freed;
  backward recomputes them chunk by chunk (`torch.utils.checkpoint`, so gradients flow through autograd into
  the LM-head weight, the one of the tied input embedding included: no hand-written `.grad`). The loss is the
  sum over valid (label ≠ −100) tokens divided by their number in the whole batch (or `num_items`, for gradient
  accumulation), as transformers does. Chunks whose labels are all masked skip the LM head.
- MLP (`core.attention.decoder_hidden`): post-attention norm + MLP per chunk of tokens, each recomputed in backward.
- Activation checkpointing: each layer's attention block is recomputed in backward from its input. A layer
  then keeps two hidden-size tensors (its input and the MLP's input) instead of all its activations; nothing
  is computed twice beyond what checkpointing alone recomputes, apart from the LM head (one more forward).
  `save_attention` keeps the fused attention kernel's output (and log-sum-exp) of each layer, so backward
  recomputes the projections but not the O(T²) attention: one more hidden-size tensor per layer, less time
  (selective checkpointing, `torch.utils.checkpoint.create_selective_checkpoint_contexts`).

Chunk counts are automatic (the paper's rule: ceil(vocab / hidden) chunks for the LM head and
ceil(intermediate / hidden) for the MLP, so a chunk's wide activation is no bigger than the sequence's hidden
states) but never below `min_chunk_tokens` tokens per chunk; `head_chunks` / `mlp_chunks` override them.

Bugs of the public MST code that are regression tests here (`tests/test_mst.py`): tokens dropped when the length
is not divisible by the chunk count; zero loss when the sequence is shorter than the chunk count; the LM-head
gradient doubled when the first chunk has unmasked labels. Training only: the attention function given to
`decoder_hidden` must be free of side effects, since checkpointing calls it again in backward."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..core.attention import Rope, base_causal_lm, decoder_hidden, is_supported, local_attention, spans
from ..core.errors import InfinictxError

IGNORE = -100


@dataclass
class MSTConfig:
    head_chunks: int | None = None     # LM head + CE mini-sequences (None: automatic)
    mlp_chunks: int | None = None      # MLP mini-sequences (None: automatic)
    checkpoint: bool = True            # recompute each layer's attention block in backward
    save_attention: bool = False       # ... but keep the attention kernel's output: faster, +1 hidden-size / layer
    min_chunk_tokens: int = 256        # automatic counts never make chunks shorter than this

    def __post_init__(self):
        for name in ("head_chunks", "mlp_chunks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InfinictxError(f"MST {name.replace('_', ' ')} must be >= 1 (got {value})")
        if self.min_chunk_tokens < 1:
            raise InfinictxError(f"MST min chunk tokens must be >= 1 (got {self.min_chunk_tokens})")

    def head_chunks_for(self, n_tokens: int, config) -> int:
        """LM-head chunks for n_tokens scored under model config `config`."""
        return self.head_chunks or auto_chunks(n_tokens, config.vocab_size, config.hidden_size, self.min_chunk_tokens)

    def mlp_chunks_for(self, n_tokens: int, config) -> int:
        """MLP chunks for a sequence of n_tokens under model config `config`."""
        return self.mlp_chunks or auto_chunks(n_tokens, config.intermediate_size, config.hidden_size,
                                              self.min_chunk_tokens)


def from_switches(mst: bool, save_attention: bool = False) -> MSTConfig | None:
    """The MSTConfig that the `mst` / `mst_save_attention` config fields (--mst, --mst-save-attention) ask for;
    None when both are off (save_attention implies MST)."""
    return MSTConfig(save_attention=save_attention) if mst or save_attention else None


def auto_chunks(n_tokens: int, wide: int, hidden: int, min_chunk_tokens: int = 256) -> int:
    """ceil(wide / hidden) chunks, fewer if chunks would get shorter than min_chunk_tokens, at least 1."""
    return max(1, min(math.ceil(wide / hidden), n_tokens // min_chunk_tokens))


def _chunk_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()  # NLL in float32 whatever the model's dtype, as HF does
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")


def token_nll(lm_head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
              chunks: int = 1) -> torch.Tensor:
    """Per-token NLL (N,) of `targets` (N,) given final hidden states (N, H); 0 where the target is −100. With
    chunks > 1 (and gradients on) the logits are never held for more than one chunk, in forward or backward."""
    if chunks <= 1:
        return _chunk_nll(hidden, lm_head.weight, lm_head.bias, targets)
    pieces = []
    for s, e in spans(len(targets), chunks):
        t = targets[s:e]
        if not bool((t != IGNORE).any()):  # nothing to learn here: no LM head at all
            pieces.append(torch.zeros(e - s, dtype=torch.float32, device=hidden.device))
        elif torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_nll, hidden[s:e], lm_head.weight, lm_head.bias, t, use_reentrant=False))
        else:
            pieces.append(_chunk_nll(hidden[s:e], lm_head.weight, lm_head.bias, t))
    return torch.cat(pieces)


def causal_attention(rope: Rope):
    """The stock model's attention for `decoder_hidden`: RoPE at positions 0..T−1, causal."""
    def attend(i, a, q, k, v):
        return local_attention(rope.rotate(q, 0), rope.rotate(k, 0), v, a.scaling)
    return attend


def mst_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attend, mst: MSTConfig) -> torch.Tensor:
    """`core.attention.decoder_hidden` with the MST settings: checkpointed layers, MLP over mini-sequences."""
    mlp_chunks = mst.mlp_chunks_for(input_ids.shape[1], base_causal_lm(model).config)
    return decoder_hidden(model, input_ids, attend, mst.checkpoint, mlp_chunks, mst.save_attention)


def mst_nll(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, mst: MSTConfig) -> torch.Tensor:
    """Per-token NLL (B, n) of `targets` (B, n) from final hidden states (B, n, H), LM head over mini-sequences."""
    lm = base_causal_lm(model)
    B, n = targets.shape
    chunks = mst.head_chunks_for(B * n, lm.config)
    return token_nll(lm.lm_head, hidden.reshape(B * n, -1), targets.reshape(B * n), chunks).view(B, n)


def stock_hidden(model: torch.nn.Module, input_ids: torch.Tensor, mst: MSTConfig) -> torch.Tensor:
    """Final hidden states from the model's own decoder (any architecture), each layer checkpointed through
    transformers' activation checkpointing when `mst.checkpoint`: the LM head then runs over mini-sequences as
    for Llama, but the MLP is not split (that needs the layer's internals)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    lm = base_causal_lm(model)
    if getattr(lm.config, "final_logit_softcapping", None):
        raise InfinictxError("MST cannot split the LM head of a model that soft-caps its logits; train without --mst")
    decoder = getattr(lm, lm.base_model_prefix)
    layers = [m for m in decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    on = mst.checkpoint and torch.is_grad_enabled() and bool(layers)
    if on:
        lm.activation_checkpointing_enable({"use_reentrant": False})
        for layer in layers:   # transformers checkpoints only layers in training mode; their submodules stay in eval
            layer.training = True
    try:
        return decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    finally:
        if on:
            for layer in layers:
                layer.training = False
            lm.activation_checkpointing_disable()


def causal_lm_nll(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                  mst: MSTConfig | None = None, rope: Rope | None = None) -> torch.Tensor:
    """Per-token NLL (B, n) of `targets` (B, n), the tokens after the last n positions of `input_ids` (B, T):
    HF's logits[:, -n:] against targets, computed the MST way (targets of −100 give 0). A decoder outside the
    Llama family runs its own forward (`stock_hidden`)."""
    mst = mst or MSTConfig()
    if not is_supported(model):
        hidden = stock_hidden(model, input_ids, mst)
        return mst_nll(model, hidden[:, -targets.shape[1]:], targets, mst)
    rope = rope or Rope(model, input_ids.device, base_causal_lm(model).lm_head.weight.dtype)
    hidden = mst_hidden(model, input_ids, causal_attention(rope), mst)
    return mst_nll(model, hidden[:, -targets.shape[1]:], targets, mst)


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                   mst: MSTConfig | None = None, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """transformers' causal-LM loss (labels = input_ids by default, shifted inside, −100 ignored, summed and
    divided by the number of valid labels in the batch, or by `num_items` for gradient accumulation), computed
    the MST way."""
    labels = input_ids if labels is None else labels
    targets = labels[:, 1:]
    valid = int((targets != IGNORE).sum()) if num_items is None else num_items
    if not valid:
        raise InfinictxError("every label is masked (-100): there is nothing to train on")
    nll = causal_lm_nll(model, input_ids[:, :-1], targets, mst)
    return nll.sum() / valid
