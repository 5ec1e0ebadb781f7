"""Which attention heads retrieve: the echo / induction probe of RazorAttention (arXiv 2407.15891, §3.2).

Feed BOS + a block of random tokens repeated a few times. A query token in a later repeat has copies of itself
earlier in the sequence. An *echo* head attends to those copies; an *induction* head attends to the tokens that
*followed* them (what a copying circuit needs: "the last time this came, what came next?"). A head's score is
its mean attention mass on those positions over every query of the repeats after the first.

Used to choose the memory layers of the Focused-Transformer memory (`mem_layers="auto"`: the layers holding the
strongest echo or induction heads read memory) and by KV-cache policies that keep full caches only for retrieval
heads."""

from __future__ import annotations

import weakref

import torch

from ..core.attention import Rope, base_causal_lm, decoder_forward, local_attention

# model -> scores of the default probe (computed once per model object: re-probe by hand after changing weights)
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@torch.no_grad()
def head_scores(model, block: int = 64, repeats: int = 4, seed: int = 0, bos_id: int | None = None,
                device=None) -> dict[str, torch.Tensor]:
    """Echo and induction scores, each (layers, query heads) in [0, 1], and their max per KV-head group
    ("echo_kv", "induction_kv": (layers, KV heads))."""
    cfg = base_causal_lm(model).config
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    # Random tokens away from the special ones at the start of the vocabulary.
    low = min(1000, cfg.vocab_size // 4)
    tokens = torch.randint(low, cfg.vocab_size, (block,), generator=g)
    ids = torch.cat([torch.tensor([bos_id if bos_id is not None else (cfg.bos_token_id or 0)]), tokens.repeat(repeats)])
    ids = ids[None].to(device)
    T = ids.shape[1]
    pos = torch.arange(T)
    # Queries in repeats ≥ 1; for each, the earlier positions holding the same token (echo) and their successors
    # (induction). Position p (≥ 1) holds tokens[(p − 1) % block].
    q_pos = pos[1 + block:]
    earlier = q_pos[:, None] - block * torch.arange(1, repeats)[None, :]   # (Q, repeats−1)
    valid = earlier >= 1
    echo_mask = torch.zeros(len(q_pos), T, dtype=torch.bool)
    induction_mask = torch.zeros(len(q_pos), T, dtype=torch.bool)
    rows = torch.arange(len(q_pos))[:, None].expand_as(earlier)
    echo_mask[rows[valid], earlier[valid]] = True
    succ = earlier + 1
    ok = valid & (succ < q_pos[:, None])
    induction_mask[rows[ok], succ[ok]] = True
    rope = Rope(model, device, dtype)
    echo, induction = [], []

    def attend(i, a, q, k, v):
        qr, kr = rope.rotate(q, 0), rope.rotate(k, 0)
        group = q.shape[1] // k.shape[1]
        kx = kr.repeat_interleave(group, dim=1)
        scores = (qr @ kx.transpose(-1, -2)).float() * a.scaling                # (1, Hq, T, T)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=scores.device).tril(), float("-inf"))
        probs = scores.softmax(-1)[0, :, q_pos.to(scores.device)]                # (Hq, Q, T)
        echo.append((probs * echo_mask.to(probs.device)).sum(-1).mean(-1).cpu())
        induction.append((probs * induction_mask.to(probs.device)).sum(-1).mean(-1).cpu())
        return local_attention(qr, kr, v, a.scaling)

    decoder_forward(model, ids, attend, logits_to_keep=1)
    echo_t, induction_t = torch.stack(echo), torch.stack(induction)
    group = cfg.num_attention_heads // getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    L = echo_t.shape[0]
    return {"echo": echo_t, "induction": induction_t,
            "echo_kv": echo_t.view(L, -1, group).amax(-1), "induction_kv": induction_t.view(L, -1, group).amax(-1)}


def cached_head_scores(model, bos_id: int | None = None) -> dict[str, torch.Tensor]:
    """`head_scores` with the default probe, computed once per model object."""
    if model not in _CACHE:
        _CACHE[model] = head_scores(model, bos_id=bos_id)
    return _CACHE[model]


def retrieval_layers(model, n: int, bos_id: int | None = None) -> list[int]:
    """The n layers whose strongest head scores highest as echo or induction head, in layer order. Those are
    where a copying circuit reads the past: the layers that should read a memory. Scores are cached per model."""
    if n <= 0:
        return []
    s = cached_head_scores(model, bos_id)
    best = torch.maximum(s["echo"], s["induction"]).amax(-1)
    return sorted(best.topk(min(n, best.numel())).indices.tolist())


def retrieval_heads(model, induction_ratio: float = 0.14, echo_ratio: float = 0.01,
                    bos_id: int | None = None) -> dict[int, list[int]]:
    """RazorAttention's retrieval heads: of all (layer, KV head) pairs, the top `induction_ratio` by induction
    score and the top `echo_ratio` by echo score (a KV head scores as its best query head), as
    {layer: [KV heads]} (every layer listed, possibly empty). A ratio above 0 keeps at least one head."""
    s = cached_head_scores(model, bos_id)
    n_layers, n_kv = s["induction_kv"].shape
    chosen = set()
    for key, ratio in (("induction_kv", induction_ratio), ("echo_kv", echo_ratio)):
        n = min(n_layers * n_kv, max(1, round(ratio * n_layers * n_kv))) if ratio > 0 else 0
        if n:
            chosen.update(s[key].flatten().topk(n).indices.tolist())
    return {i: sorted(j % n_kv for j in chosen if j // n_kv == i) for i in range(n_layers)}
