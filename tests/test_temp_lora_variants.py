"""Cheaper Temp-Lora variants (issue 17): adapters on the top layers only, training every m-th chunk on the last
m chunks at once. Each is validated, deterministic, leaves the base weights alone and still learns."""

import numpy as np
import pytest
import torch
from conftest import DEVICE, stop_after

from infinictx import InfinictxError, TempLoraConfig, streaming_perplexity, weights_fingerprint


@pytest.mark.parametrize("kwargs, message", [
    (dict(lora_layers="top:0"), "lora-layers"),
    (dict(lora_layers="abc"), "lora-layers"),
    (dict(lora_layers="-1,2"), "lora-layers"),
    (dict(train_every=0), "train-every"),
])
def test_invalid_variant_settings(kwargs, message):
    with pytest.raises(InfinictxError, match=message):
        TempLoraConfig(window=32, chunk=16, **kwargs)


@pytest.mark.parametrize("layers", ["top:3", "2"])
def test_layers_out_of_range_are_refused_when_the_model_is_known(tiny, layers):
    with pytest.raises(InfinictxError, match="lora-layers"):
        TempLoraConfig(window=32, chunk=16, lora_layers=layers).make_session(tiny)   # the tiny model: 2 layers
    assert not any("lora" in n for n, _ in tiny.model.named_parameters())


def test_top_layers_only_adapt_and_train_the_top(tiny, stream):
    before = weights_fingerprint(tiny.model)
    with TempLoraConfig(window=48, chunk=16, lr=1e-2, lora_layers="top:1").make_session(tiny) as s:
        names = [n for n, _ in s.model.named_parameters() if "lora_" in n]
        assert names and all(".layers.1." in n for n in names)
        assert s.describe()["adapted_layers"] == [1]
        seen = []
        hooks = [m.register_full_backward_hook(lambda mod, gi, go, i=i: seen.append(i))
                 for i, m in enumerate(s.model.base_model.model.model.layers)]
        res = streaming_perplexity(s, stream, progress=False)
        for h in hooks:
            h.remove()
        assert set(seen) == {1}   # the backward never enters layer 0
        depth = s.learner.backward_depth
    full = TempLoraConfig(window=48, chunk=16, lr=1e-2)
    with full.make_session(tiny) as s:
        res_full = streaming_perplexity(s, stream, progress=False)
        assert s.learner.backward_depth is None
    assert depth == 1 and res.cost["flops_by_kind"]["backward"] < res_full.cost["flops_by_kind"]["backward"]
    assert weights_fingerprint(tiny.model) == before


def test_top_layers_adapter_still_lowers_loss(tiny):
    torch.manual_seed(3)
    passage = torch.randint(0, 300, (32,))
    with TempLoraConfig(window=64, chunk=32, lr=2e-2, steps=3, lora_layers="top:1").make_session(tiny) as s:
        base = s.score(passage, base=True).mean().item()
        s.absorb(passage)
        s.history = s.history[:0]
        assert s.score(passage).mean().item() < 0.97 * base


def test_train_every_m_trains_on_the_last_m_chunks(tiny, stream):
    samples = []
    cfg = TempLoraConfig(window=48, chunk=16, lr=1e-2, train_every=3, train_context=8)
    with cfg.make_session(tiny) as s:
        original = s.learner._train
        s.learner._train = lambda sess, context, piece, steps, mask=None: (
            samples.append((len(sess.history), context.tolist(), piece.tolist())),
            original(sess, context, piece, steps, mask))
        assert not s.describe()["fused_first_step"]
        streaming_perplexity(s, stream[:160], progress=False)   # 10 chunks of 16: trained after 3, 6, 9
    assert [end for end, _, _ in samples] == [48, 96, 144]
    for end, context, piece in samples:
        assert piece == stream[end - 48:end].tolist() and context == stream[end - 56:end - 48].tolist()


@pytest.mark.parametrize("kwargs", [dict(lora_layers="top:1"), dict(train_every=2, train_context=16),
                                    dict(steps=1, rank=4)])
def test_variants_are_deterministic_and_leave_the_base_alone(tiny_model_dir, stream, kwargs):
    from infinictx import load_model

    runs = []
    for _ in range(2):
        lm = load_model(tiny_model_dir, device=DEVICE, dtype="float32")
        before = lm.fingerprint
        with TempLoraConfig(window=48, chunk=16, lr=1e-2, seed=7, **kwargs).make_session(lm) as s:
            runs.append(streaming_perplexity(s, stream, progress=False).nll)
        assert weights_fingerprint(lm.model) == before
    np.testing.assert_array_equal(runs[0], runs[1])


def test_train_every_resumes_with_its_pending_chunks(tiny_model_dir, stream, tmp_path):
    from infinictx import load_model

    cfg = dict(window=48, chunk=16, lr=1e-2, train_every=3, train_context=16)
    lm = load_model(tiny_model_dir, device=DEVICE, dtype="float32")
    with TempLoraConfig(**cfg).make_session(lm) as s:
        whole = streaming_perplexity(s, stream, progress=False).nll
    ckpt = tmp_path / "run.ckpt"
    lm = load_model(tiny_model_dir, device=DEVICE, dtype="float32")
    with TempLoraConfig(**cfg).make_session(lm) as s:
        stop_after(s, 5)   # 2 chunks pending when it stops
        with pytest.raises(KeyboardInterrupt):
            streaming_perplexity(s, stream, progress=False, checkpoint=ckpt)
    lm = load_model(tiny_model_dir, device=DEVICE, dtype="float32")
    with TempLoraConfig(**cfg).make_session(lm) as s:
        resumed = streaming_perplexity(s, stream, progress=False, checkpoint=ckpt).nll
    np.testing.assert_allclose(resumed, whole, rtol=1e-5, atol=1e-6)


def test_two_sessions_with_adapters_share_one_model_without_mixing(tiny, stream):
    """A server's case: two Temp-Lora sessions alive on one model, their chunks interleaved; each activates its own
    adapter and gets exactly what it gets alone; closing both leaves the model as it was."""
    before = weights_fingerprint(tiny.model)
    texts = [stream[:96], torch.flip(stream, [0])[:96]]
    cfg = dict(window=48, chunk=16, lr=1e-2, rank=4)
    alone = []
    for text in texts:
        with TempLoraConfig(**cfg).make_session(tiny) as s:
            alone.append(torch.cat([s.score_and_absorb(text[i:i + 16])[0] for i in range(0, 96, 16)]))
    sessions = [TempLoraConfig(**cfg).make_session(tiny) for _ in texts]
    assert sessions[0].learner.name != sessions[1].learner.name
    together = [[], []]
    for i in range(0, 96, 16):
        for k, (s, text) in enumerate(zip(sessions, texts)):
            s.learner.activate()
            together[k].append(s.score_and_absorb(text[i:i + 16])[0])
    for k in range(2):
        torch.testing.assert_close(torch.cat(together[k]), alone[k], rtol=1e-5, atol=1e-6)
    sessions[0].close()
    assert any("lora_" in n for n, _ in tiny.model.named_parameters())   # the other session's adapter stays
    sessions[1].close()
    assert not any("lora_" in n for n, _ in tiny.model.named_parameters())
    assert weights_fingerprint(tiny.model) == before


def test_bf16_base_keeps_adapter_optimizer_and_scores_in_fp32(tiny_model_dir):
    """The bf16 path (CPUs with AMX, GPUs): only the frozen base is bf16; what learns and what is summed is fp32."""
    from infinictx import load_model

    lm = load_model(tiny_model_dir, device=DEVICE, dtype="bfloat16")
    before = weights_fingerprint(lm.model)
    torch.manual_seed(3)
    passage = torch.randint(0, 300, (32,))
    with TempLoraConfig(window=64, chunk=32, lr=2e-2, steps=3).make_session(lm) as s:
        assert {p.dtype for p in s.learner.params} == {torch.float32}
        assert all(p.dtype == torch.bfloat16 for n, p in s.model.named_parameters() if "lora_" not in n)
        base = s.score(passage, base=True)
        s.absorb(passage)
        assert {v.dtype for st in s.learner.optimizer.state.values() for v in st.values() if v.dim()} == {torch.float32}
        s.history = s.history[:0]
        adapted = s.score(passage)
        assert base.dtype == adapted.dtype == torch.float32
        assert adapted.mean().item() < 0.97 * base.mean().item()
    assert weights_fingerprint(lm.model) == before


def test_bf16_base_runs_lora_products_in_bf16_with_fp32_gradients(tiny_model_dir):
    """Mixed precision for the adapter: on a bf16 base the LoRA products run in bf16 (the input is not cast up to
    fp32, AMX does the work) while the factors, their gradients and the optimizer stay fp32."""
    import torch.nn.functional as F
    from peft.tuners.lora import LoraLayer

    from infinictx import load_model

    lm = load_model(tiny_model_dir, device=DEVICE, dtype="bfloat16")
    with TempLoraConfig(window=64, chunk=32).make_session(lm) as s:
        layer = next(m for m in s.model.modules() if isinstance(m, LoraLayer))
        name = s.learner.name
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        with torch.no_grad():
            b.normal_()   # B starts at zero: make the product visible
        x = torch.randn(3, a.shape[1], dtype=torch.bfloat16, device=a.device)
        y = layer(x)
        assert y.dtype == torch.bfloat16
        expected = layer.get_base_layer()(x) + F.linear(F.linear(x, a.bfloat16()), b.bfloat16()) * layer.scaling[name]
        assert torch.equal(y, expected)
        y.float().square().sum().backward()
        assert a.grad.dtype == b.grad.dtype == torch.float32 and a.grad.abs().sum() > 0


def test_auto_dtype_is_bf16_only_on_cpus_with_bf16_in_hardware(monkeypatch):
    from infinictx.core import models

    for flags, fast in ((set(), False), ({"avx2", "avx512f"}, False), ({"avx512_bf16"}, True), ({"amx_bf16"}, True)):
        monkeypatch.setattr(models, "cpu_flags", lambda flags=flags: flags)
        assert models.cpu_has_fast_bf16() is fast, flags

    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert models.pick_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert models.pick_dtype("float32", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert models.pick_dtype(None, torch.device("cpu")) == torch.float32
