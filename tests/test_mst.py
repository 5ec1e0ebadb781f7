"""Mini-Sequence training: loss and gradients equal transformers' own to 1e-5 (float32), in the cases where the
public MST code goes wrong; the logits are never held whole; Temp-Lora and CrossBatch give the same updates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infinictx import InfinictxError, TempLoraConfig
from infinictx.training.mst import IGNORE, MSTConfig, auto_chunks, causal_lm_loss, spans

TOL = dict(rtol=1e-5, atol=1e-5)


def llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tied, initializer_range=0.2)
    model = LlamaForCausalLM(config).float()
    model.train()  # no dropout in Llama; train mode is what a training step runs in
    return model


def grads(model, loss_fn) -> dict:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return {"loss": loss.detach()} | {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def hf_loss(model, ids, labels, **kw):
    return model(input_ids=ids, labels=labels, use_cache=False, **kw).loss


def assert_same(ref: dict, got: dict):
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **TOL, msg=lambda m: f"{name}: {m}")


def ids_of(n, batch=1, seed=1):
    torch.manual_seed(seed)
    return torch.randint(0, 300, (batch, n))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("n, head_chunks, mlp_chunks", [
    (37, 5, 3),     # length not divisible by the chunk counts: no token may be dropped
    (4, 16, 16),    # shorter than the chunk count: a real loss and gradient, not 0
    (64, 1, 1),     # one chunk: plain checkpointing
])
def test_loss_and_gradients_equal_transformers(tied, n, head_chunks, mlp_chunks):
    model = llama(tied)
    ids = ids_of(n, batch=2)
    ref = grads(model, lambda: hf_loss(model, ids, ids))
    mst = MSTConfig(head_chunks=head_chunks, mlp_chunks=mlp_chunks)
    got = grads(model, lambda: causal_lm_loss(model, ids, mst=mst))
    assert_same(ref, got)
    assert ref["loss"] > 0 and got["model.embed_tokens.weight"].abs().sum() > 0


@pytest.mark.parametrize("tied", [True, False])
def test_first_chunk_unmasked_and_other_chunks_all_masked(tied):
    """Labels only in the first chunk (the public code doubled the LM-head gradient there) and chunks whose
    labels are all masked (skipped, zero loss, no gradient from them)."""
    model = llama(tied)
    ids = ids_of(40)
    labels = ids.clone()
    labels[:, 9:] = IGNORE       # with 4 head chunks of the 39 targets only the first has labels
    labels[:, 30:33] = ids[:, 30:33]  # ... and a few in the last one
    ref = grads(model, lambda: hf_loss(model, ids, labels))
    got = grads(model, lambda: causal_lm_loss(model, ids, labels, mst=MSTConfig(head_chunks=4, mlp_chunks=3)))
    assert_same(ref, got)


def test_gradient_accumulation_over_two_steps():
    model = llama(True)
    a, b = ids_of(33, seed=1), ids_of(21, seed=2)
    lb = b.clone()
    lb[:, :10] = IGNORE
    total = int((a[:, 1:] != IGNORE).sum() + (lb[:, 1:] != IGNORE).sum())

    def accumulate(loss_fn):
        model.zero_grad(set_to_none=True)
        for ids, labels in ((a, a), (b, lb)):
            loss_fn(ids, labels).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = accumulate(lambda ids, labels: hf_loss(model, ids, labels, num_items_in_batch=torch.tensor(total)))
    mst = MSTConfig(head_chunks=3, mlp_chunks=2)
    got = accumulate(lambda ids, labels: causal_lm_loss(model, ids, labels, mst=mst, num_items=total))
    assert_same(ref, got)
    # and the accumulated gradient is the one of the two sequences' joint loss (sum / all valid labels)
    model.zero_grad(set_to_none=True)
    joint = (F.cross_entropy(model(a).logits[0, :-1], a[0, 1:], reduction="sum")
             + F.cross_entropy(model(b).logits[0, :-1], lb[0, 1:], ignore_index=IGNORE, reduction="sum")) / total
    joint.backward()
    torch.testing.assert_close(got["model.embed_tokens.weight"], model.lm_head.weight.grad, **TOL)  # tied


def test_logits_are_never_held_whole():
    """What autograd keeps for backward: the stock step saves (tokens × vocab) logits, the MST step nothing of
    that size (chunks are recomputed)."""
    model = llama(True)
    n, vocab = 400, 300
    ids = ids_of(n)

    def largest_saved(loss_fn) -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn().backward()
        return max(sizes)

    assert largest_saved(lambda: hf_loss(model, ids, ids)) >= (n - 1) * vocab
    mst = MSTConfig(head_chunks=8, mlp_chunks=4)
    assert largest_saved(lambda: causal_lm_loss(model, ids, mst=mst)) < (n - 1) * vocab // 4


def test_save_attention_runs_the_attention_kernel_once_with_the_same_gradients(monkeypatch):
    """save_attention: backward recomputes the projections but reuses the fused attention kernel's outputs, so
    the kernel runs once per layer in the whole step instead of twice (forward + recompute); the same gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from infinictx.core import train_attention
    from infinictx.core.attention import _fused_attention_ops

    # MST is for long samples; this short one would otherwise take the plain product path (no fused kernel)
    monkeypatch.setattr(train_attention, "MAX_SCORES", 0)

    class CountAttention(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func in _fused_attention_ops()
            return func(*args, **(kwargs or {}))

    model = llama(True)
    ids = ids_of(48, batch=2)
    ref = grads(model, lambda: hf_loss(model, ids, ids))
    calls = {}
    for save in (False, True):
        mst = MSTConfig(head_chunks=3, mlp_chunks=2, save_attention=save)
        with CountAttention() as counter:
            got = grads(model, lambda: causal_lm_loss(model, ids, mst=mst))
        assert_same(ref, got)
        calls[save] = counter.calls
    layers = model.config.num_hidden_layers
    assert calls == {False: 2 * layers, True: layers}


def test_all_labels_masked_is_a_clear_error():
    model = llama(True)
    ids = ids_of(10)
    with pytest.raises(InfinictxError, match="every label is masked"):
        causal_lm_loss(model, ids, torch.full_like(ids, IGNORE))
    with pytest.raises(InfinictxError, match="head chunks must be >= 1"):
        MSTConfig(head_chunks=0)


def test_chunk_counts_and_spans():
    assert auto_chunks(32768, 49152, 576) == 86           # the paper's rule: ceil(V / H)
    assert auto_chunks(2048, 49152, 576) == 8             # but chunks of at least 256 tokens
    assert auto_chunks(100, 1536, 576) == 1
    for n, c in ((37, 5), (4, 16), (10, 10), (1, 3)):
        s = spans(n, c)
        assert s[0][0] == 0 and s[-1][1] == n and all(a < b for a, b in s)
        assert all(s[i][1] == s[i + 1][0] for i in range(len(s) - 1)) and len(s) == min(n, c)


def test_temp_lora_with_mst_makes_the_same_updates(tiny, stream):
    from infinictx.core.models import weights_fingerprint
    from infinictx.tasks.perplexity import streaming_perplexity

    before = weights_fingerprint(tiny.model)
    results = []
    for mst in (False, True):
        cfg = TempLoraConfig(window=64, chunk=32, steps=2, rank=4, mst=mst)
        with cfg.make_session(tiny) as s:
            r = streaming_perplexity(s, stream[:160], progress=False)
            results.append((torch.from_numpy(r.nll), [p.detach().clone() for p in s.learner.params]))
    (nll_ref, lora_ref), (nll, lora) = results
    torch.testing.assert_close(nll, nll_ref, **TOL)   # scores after MST-trained chunks are the same
    for a, b in zip(lora_ref, lora):
        torch.testing.assert_close(a, b, **TOL)
    assert weights_fingerprint(tiny.model) == before


def test_crossbatch_loss_with_mst_equals_without(tiny):
    import random

    from infinictx.core.attention import Rope
    from infinictx.methods.memory.crossbatch import CrossBatchConfig, crossbatch_loss, make_batch

    docs = [torch.randint(0, 300, (400,)) for _ in range(3)]
    batch = make_batch(docs, CrossBatchConfig(context=32, needle_rate=0), random.Random(0), tiny.tokenizer)
    rope = Rope(tiny.model, tiny.device, tiny.dtype)
    model = tiny.model
    for p in model.parameters():
        p.requires_grad_(True)
    ref = grads(model, lambda: crossbatch_loss(model, batch, {1}, rope))
    got = grads(model, lambda: crossbatch_loss(model, batch, {1}, rope, mst=MSTConfig(head_chunks=3, mlp_chunks=2)))
    assert_same(ref, got)
