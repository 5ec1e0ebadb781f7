"""Sessions on a tiny random Llama: scoring matches a direct forward, Temp-Lora learns and leaves the base
weights alone, the fused first step equals the unfused order, resume reproduces an uninterrupted run."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, stop_after

from infinictx import (
    InfinictxError,
    Sampler,
    TempLoraConfig,
    WindowConfig,
    generate_long,
    streaming_perplexity,
    weights_fingerprint,
)


def reference_nll(model, ids, window, chunk):
    """Token NLLs by the protocol's definition, one plain forward per chunk (no infinictx code)."""
    out = []
    for s in range(0, len(ids), chunk):
        e = min(s + chunk, len(ids))
        lo = max(0, s - (window - chunk))
        seg = ids[lo:e]
        with torch.no_grad():
            logits = model(seg[None].to(model.device)).logits[0, :-1].cpu()
        nll = F.cross_entropy(logits, seg[1:], reduction="none")
        out.append(nll[-(e - max(s, 1)):])
    return torch.cat(out).numpy()


def test_window_scoring_matches_direct_forward(tiny, stream):
    with WindowConfig(window=48, chunk=16).make_session(tiny) as s:
        res = streaming_perplexity(s, stream, progress=False, bucket_size=50)
    ref = reference_nll(tiny.model, stream, 48, 16)
    assert res.nll.shape == (len(stream) - 1,)
    np.testing.assert_allclose(res.nll, ref, rtol=1e-5, atol=1e-5)
    assert res.summary()["ppl"] == pytest.approx(float(np.exp(ref.mean())), rel=1e-5)
    buckets = res.buckets()
    assert sum(b["tokens"] for b in buckets) == len(stream) - 1
    assert [b["start"] for b in buckets] == [0, 50, 100, 150]


def test_temp_lora_base_scores_equal_window_and_base_weights_untouched(tiny, stream):
    before = weights_fingerprint(tiny.model)
    n_modules = len(list(tiny.model.modules()))
    cfg = TempLoraConfig(window=48, chunk=16, lr=1e-2)
    with cfg.make_session(tiny) as s:
        res = streaming_perplexity(s, stream, compare_base=True, progress=False)
        # while open, the adapter really is active: scores differ from the base
        assert not np.allclose(res.nll[16:], res.base_nll[16:])
    np.testing.assert_allclose(res.base_nll, reference_nll(tiny.model, stream, 48, 16), rtol=1e-5, atol=1e-5)
    assert weights_fingerprint(tiny.model) == before
    assert len(list(tiny.model.modules())) == n_modules  # LoRA layers removed again
    assert not any("lora" in n for n, _ in tiny.model.named_parameters())


def test_temp_lora_lowers_loss_on_the_chunk_it_trained_on(tiny):
    torch.manual_seed(3)
    passage = torch.randint(0, 300, (32,))
    with TempLoraConfig(window=64, chunk=32, lr=1e-2, steps=2).make_session(tiny) as s:
        base = s.score(passage, base=True).mean().item()
        assert s.score(passage).mean().item() == pytest.approx(base, rel=1e-6)  # B=0 at start: adapter is a no-op
        s.absorb(passage)
        s.history = s.history[:0]  # score it again with no context: only the adapter can remember it
        after = s.score(passage).mean().item()
        assert s.score(passage, base=True).mean().item() == pytest.approx(base, rel=1e-6)
    assert after < 0.97 * base


def test_fused_first_step_equals_unfused_order(tiny_model_dir, stream):
    from infinictx import load_model

    results = {}
    for fuse in (True, False):
        lm = load_model(tiny_model_dir, device=DEVICE, dtype="float32")
        cfg = TempLoraConfig(window=48, chunk=16, lr=5e-3, fuse_first_step=fuse)
        with cfg.make_session(lm) as s:
            assert s.describe()["fused_first_step"] is fuse
            res = streaming_perplexity(s, stream, progress=False)
            adapter = {k: v.clone() for k, v in s.state_dict()["adapter"].items()}
            flops = s.meter.flops["forward"]
        results[fuse] = (res.nll, adapter, flops)
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    for k, v in results[True][1].items():
        torch.testing.assert_close(v, results[False][1][k], rtol=1e-5, atol=1e-6)
    assert results[True][2] < results[False][2]  # one forward per chunk saved


def test_train_context_shorter_than_window_is_not_fused(tiny, stream):
    cfg = TempLoraConfig(window=48, chunk=16, train_context=8)
    with cfg.make_session(tiny) as s:
        assert not s.describe()["fused_first_step"]
        res = streaming_perplexity(s, stream[:100], progress=False)
    assert np.isfinite(res.nll).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=32, chunk=32), "smaller than the window"),
    (dict(window=32, chunk=64), "smaller than the window"),
    (dict(window=32, chunk=16, train_context=20), "must not exceed the window"),
    (dict(window=32, chunk=16, steps=0), "steps"),
    (dict(window=32, chunk=16, lr=0), "lr"),
])
def test_invalid_settings(kwargs, message):
    with pytest.raises(InfinictxError, match=message):
        TempLoraConfig(**kwargs)


def test_text_not_longer_than_window_is_rejected(tiny, stream):
    with WindowConfig(window=64, chunk=16).make_session(tiny) as s:
        with pytest.raises(InfinictxError, match="longer than the window"):
            streaming_perplexity(s, stream[:64], progress=False)


@pytest.mark.parametrize("fuse, message", [(True, "non-finite NLL"), (False, "training loss became nan")])
def test_nan_loss_gives_clear_error_and_restores_model(tiny, stream, fuse, message):
    # poison the LM head whenever gradients are on (training), so only the training path sees NaN
    hook = tiny.model.lm_head.register_forward_hook(
        lambda mod, inp, out: out * float("nan") if torch.is_grad_enabled() else out)
    cfg = TempLoraConfig(window=48, chunk=16, fuse_first_step=fuse)
    try:
        with cfg.make_session(tiny) as s:
            with pytest.raises(InfinictxError, match=message):
                streaming_perplexity(s, stream, progress=False)
    finally:
        hook.remove()
    assert not any("lora" in n for n, _ in tiny.model.named_parameters())


def test_resume_after_interrupt_reproduces_uninterrupted_run(tiny_model_dir, stream, tmp_path):
    from infinictx import load_model

    cfg = dict(window=48, chunk=16, lr=5e-3)
    lm = load_model(tiny_model_dir, device=DEVICE, dtype="float32")
    with TempLoraConfig(**cfg).make_session(lm) as s:
        full = streaming_perplexity(s, stream, compare_base=True, progress=False)

    ckpt = tmp_path / "run.ckpt"
    lm = load_model(tiny_model_dir, device=DEVICE, dtype="float32")
    with TempLoraConfig(**cfg).make_session(lm) as s:
        stop_after(s, 6)   # interrupted while reading the 7th chunk
        with pytest.raises(KeyboardInterrupt):
            streaming_perplexity(s, stream, compare_base=True, progress=False, checkpoint=ckpt, checkpoint_every=2)
    assert ckpt.exists()
    lm = load_model(tiny_model_dir, device=DEVICE, dtype="float32")
    with TempLoraConfig(**cfg).make_session(lm) as s:
        resumed = streaming_perplexity(s, stream, compare_base=True, progress=False, checkpoint=ckpt)
    np.testing.assert_allclose(resumed.nll, full.nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(resumed.base_nll, full.base_nll, rtol=1e-5, atol=1e-5)
    assert not ckpt.exists()
    # a checkpoint from another run is refused
    torch.save({"key": "other"}, ckpt)
    with WindowConfig(window=48, chunk=16).make_session(lm) as s:
        with pytest.raises(InfinictxError, match="different run"):
            streaming_perplexity(s, stream, progress=False, checkpoint=ckpt)


def greedy_full_recompute(model, context, n):
    ids = context.clone()
    for _ in range(n):
        with torch.no_grad():
            ids = torch.cat([ids, model(ids[None].to(model.device)).logits[0, -1].argmax()[None].cpu()])
    return ids[len(context):]


def test_generation_cache_reuse_matches_full_recompute(tiny):
    torch.manual_seed(5)
    prompt = torch.randint(0, 300, (16,))
    sampler = Sampler(repetition_penalty=1.0, ban_eos=False)
    with WindowConfig(window=64, chunk=8).make_session(tiny) as s:
        # L_x=16: with reuse the cache grows 16 -> 24 -> ... while it fits in W=64, never re-encoding
        res = generate_long(s, prompt, 40, context_len=16, sampler=sampler, cache_reuse=True, progress=False)
        reused_forward = s.meter.tokens["forward"]
    assert torch.equal(res.tokens, greedy_full_recompute(tiny.model, prompt, 40))
    assert len(set(res.tokens.tolist())) > 5  # a non-degenerate continuation, so the check has teeth
    with WindowConfig(window=64, chunk=8).make_session(tiny) as s:
        generate_long(s, prompt, 40, context_len=16, sampler=sampler, cache_reuse=False, progress=False)
        assert s.meter.tokens["forward"] > reused_forward  # re-encodes 16 tokens per chunk


def test_temp_lora_generation_trains_and_restores_model(tiny):
    before = weights_fingerprint(tiny.model)
    prompt = torch.randint(0, 300, (40,))  # longer than L_x=16: absorbed (trained on) first
    cfg = TempLoraConfig(window=32, chunk=16, lr=1e-3)
    for reuse in (True, False):
        with cfg.make_session(tiny) as s:
            res = generate_long(s, prompt, 48, sampler=Sampler(), cache_reuse=reuse, progress=False)
            assert s.chunks_trained == 3 + 3  # 3 prompt chunks + 3 generated chunks
        assert len(res.tokens) == 48 and res.prompt_absorbed
        assert tiny.tokenizer.eos_token_id not in res.tokens.tolist()
    assert weights_fingerprint(tiny.model) == before
