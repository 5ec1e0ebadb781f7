"""The contract every registered method keeps, checked on the tiny model for each of them (and with Temp-Lora on
top): a session scores, absorbs and generates; a run stopped mid-way resumes to identical results; what it
declares in `capabilities` holds; a bad setting is refused before any model loads. And Temp-Lora attached to the
window, a KV policy or the memory: where the code before the learner existed had the combination, the same
numbers."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import cpu_only, stop_after

from infinictx import (
    METHODS,
    InfinictxError,
    Sampler,
    TempLoraConfig,
    make_spec,
    method_config,
    streaming_perplexity,
    weights_fingerprint,
)
from infinictx.tasks.retrieval import ask

# settings that fit the tiny model (2 layers, 200-token streams) for every registered method
TINY = {
    "window": dict(window=48, chunk=16),
    "temp-lora": dict(window=48, chunk=16, lr=3e-3, rank=4, alpha=8),
    "memory": dict(window=48, chunk=16, mem_layers=[1], lookup="topk", topk=8),
    "full": dict(chunk=32),
    "streaming": dict(window=48, chunk=16),
    "longcache": dict(window=64, chunk=16, global_tokens=4, span=4, recall_clip=4),
    "razor": dict(chunk=32, min_window=16, keep_ratio=0.1, induction_ratio=0.25, echo_ratio=0),
    "rag": dict(window=48, chunk=16, chunk_tokens=8, retriever="bm25"),
}
LEARNER = dict(window=48, chunk=16, lr=3e-3, rank=4, alpha=8)
# every method, and every method but temp-lora (which is the window with the learner) with Temp-Lora on top
CASES = [(m, False) for m in METHODS] + [(m, True) for m in METHODS if m != "temp-lora"]
IDS = [f"{m}{'+tl' if tl else ''}" for m, tl in CASES]


def config(method: str, temp_lora: bool, **extra):
    return method_config(method, **TINY[method], **({"temp_lora": LEARNER} if temp_lora else {}), **extra)


def test_every_method_has_tiny_settings():
    assert set(TINY) == set(METHODS)


@pytest.mark.parametrize("method, temp_lora", CASES, ids=IDS)
def test_score_absorb_generate(tiny, stream, method, temp_lora):
    before = weights_fingerprint(tiny.model)
    with config(method, temp_lora).make_session(tiny) as s:
        chunk = s.chunk
        assert s.method == ("temp-lora" if method == "window" and temp_lora else
                            f"{method}+temp-lora" if temp_lora else method)
        nll, _ = s.score_and_absorb(stream[:chunk])
        assert nll.shape == (chunk - 1,) and torch.isfinite(nll).all()
        ahead = s.score(stream[chunk:2 * chunk])
        assert ahead.shape == (chunk,) and torch.isfinite(ahead).all()
        assert len(s.history) == chunk                  # scoring alone leaves the past as it was
        s.absorb(stream[chunk:2 * chunk])
        assert len(s.history) == 2 * chunk
        out = s.generate_chunk(5, min(len(s.history), s.window - 5), Sampler(ban_eos=True))
        assert out.shape == (5,) and tiny.tokenizer.eos_token_id not in out.tolist()
        if temp_lora or method == "temp-lora":
            assert s.chunks_trained >= 2
        d = s.describe()
        assert d == {**d, **{k: v for k, v in TINY[method].items() if k in d and k not in ("mem_layers",)}}
    assert weights_fingerprint(tiny.model) == before
    assert not any("lora" in n for n, _ in tiny.model.named_parameters())


@pytest.mark.parametrize("method, temp_lora", CASES, ids=IDS)
def test_checkpoint_and_resume_give_identical_results(tiny, stream, tmp_path, method, temp_lora):
    cfg = config(method, temp_lora)
    with cfg.make_session(tiny) as s:
        full = streaming_perplexity(s, stream, compare_base=True, progress=False)
    ckpt = tmp_path / "run.ckpt"
    with cfg.make_session(tiny) as s:   # a run stopped after 96 tokens leaves its checkpoint
        stop_after(s, 96 // s.chunk)
        with pytest.raises(KeyboardInterrupt):
            streaming_perplexity(s, stream, compare_base=True, progress=False, checkpoint=ckpt, checkpoint_every=1)
    assert ckpt.exists()
    # the key covers every setting: a run with one setting changed refuses the checkpoint
    other = replace(cfg, temp_lora=replace(cfg.temp_lora, lr=1e-3)) if temp_lora else \
        method_config(method, **{**TINY[method], "chunk": 8})
    with other.make_session(tiny) as s:
        with pytest.raises(InfinictxError, match="different run"):
            streaming_perplexity(s, stream, compare_base=True, progress=False, checkpoint=ckpt)
    with cfg.make_session(tiny) as s:
        resumed = streaming_perplexity(s, stream, compare_base=True, progress=False, checkpoint=ckpt)
    np.testing.assert_allclose(resumed.nll, full.nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(resumed.base_nll, full.base_nll, rtol=1e-5, atol=1e-5)
    assert resumed.config == full.config and not ckpt.exists()


@pytest.mark.parametrize("method, temp_lora, extra",
                         [(m, tl, {}) for m, tl in CASES] + [("razor", False, {"prefill": "dense"})],
                         ids=IDS + ["razor-dense"])
def test_declared_capabilities_hold(tiny, stream, method, temp_lora, extra):
    cfg = config(method, temp_lora, **extra)
    with cfg.make_session(tiny) as s:
        caps = s.capabilities
        for start in range(0, 128, s.chunk):
            s.absorb(stream[start:start + s.chunk])
        nxt = stream[128:128 + s.chunk]
        # kv_bytes: the bytes of keys and values held; a session without it keeps no cache between steps
        assert caps.kv_bytes == hasattr(s, "kv_bytes")
        if caps.kv_bytes:
            assert s.kv_bytes() > 0
        # base_variant: score(base=True) is the method switched off; without it, it is the score itself
        plain, base = s.score(nxt), s.score(nxt, base=True)
        assert caps.base_variant == (not torch.allclose(plain, base, atol=1e-4))
        # end_prompt: only a session that declares it changes at the end of a prompt
        held = s.kv_bytes() if caps.kv_bytes else None
        s.end_prompt()
        after = s.score(nxt)
        if caps.end_prompt:
            assert s.kv_bytes() < held
        else:
            torch.testing.assert_close(after, plain)
            assert held is None or s.kv_bytes() == held
        # fork: an independent session in the same state; a session with a learner declares none
        assert caps.fork == (not temp_lora and method not in ("window", "temp-lora"))
        if caps.fork:
            other = s.fork()
            torch.testing.assert_close(other.score(nxt), after)
            other.absorb(stream[150:150 + s.chunk])                 # the fork reads on ...
            torch.testing.assert_close(s.score(nxt), after)         # ... and the original is untouched
            other.close()
        elif hasattr(s, "fork"):
            with pytest.raises(InfinictxError, match="cannot be forked"):
                s.fork()
        # question: only RAG reads the question itself (its query)
        assert caps.question == (method == "rag")


BAD = {
    "window": ({"window": 1}, "must be >= 2"),
    "temp-lora": ({"window": 64, "chunk": 64}, "smaller than the window"),
    "memory": ({"lookup": "ann"}, "unknown memory lookup"),
    "full": ({"chunk": 0}, "chunk must be > 0"),
    "streaming": ({"window": 64, "sinks": 60}, "sinks"),
    "longcache": ({"span": 0}, "span must be > 0"),
    "razor": ({"keep_ratio": 2.0}, "keep ratio"),
    "rag": ({"top_k": 0}, "top-k must be >= 1"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_bad_settings_are_refused_before_a_model_loads(monkeypatch, method):
    assert set(BAD) == set(METHODS)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a request that should have been refused")

    monkeypatch.setattr("infinictx.core.models.load_model", no_model)
    bad, message = BAD[method]
    with pytest.raises(InfinictxError, match=message):
        method_config(method, **bad)
    with pytest.raises(InfinictxError, match=message):
        make_spec("ppl", method, bad)
    with pytest.raises(InfinictxError, match="has no setting nonsense"):
        make_spec("passkey", method, {"nonsense": 1})
    with pytest.raises(InfinictxError, match="must be int"):
        make_spec("ppl", method, {"chunk": "many"})
    if method != "temp-lora":   # the learner on top is validated as early
        with pytest.raises(InfinictxError, match="steps must be >= 1"):
            make_spec("ppl", method, {}, temp_lora={"steps": 0})


# Streaming perplexity over the 200-token stream with Temp-Lora on top, summed NLL, as computed by the code before
# the learner was a separate object (commit c51539e: TempLoraSession, KVCacheSession(temp_lora=...)); the same
# settings below. The plain scores of those methods are covered by their own tests against references.
# LongCache: since issue 14 its selection breaks exact score ties towards the earlier position (this stream of
# random tokens repeats tokens, so first-layer keys tie); torch.topk's unpromised tie order gave 1690.1798.
OLD_SUMS = {"window": 1704.3505489826202, "full": 1724.5120306015015, "streaming": 1708.6674654483795,
            "longcache": 1693.1084637641907, "razor": 1683.4661929607391}
OLD_HOSTS = {"window": dict(window=64, chunk=16), "full": dict(chunk=32), "streaming": dict(window=64, chunk=16),
             "longcache": dict(window=80, chunk=16, global_tokens=4, span=4, recall_clip=4),
             "razor": dict(chunk=32, min_window=16, keep_ratio=0.1, induction_ratio=0.25, echo_ratio=0.05)}


# the sums were recorded on the CPU; on CUDA LongCache's selection meets a near-tie and moves by 4e-4
@pytest.mark.parametrize("method", [pytest.param(m, marks=cpu_only) if m == "longcache" else m for m in OLD_SUMS])
def test_temp_lora_on_top_equals_the_old_results(tiny, stream, method):
    learner = TempLoraConfig(window=64, chunk=16, lr=3e-3, rank=8, alpha=16)
    with method_config(method, **OLD_HOSTS[method], temp_lora=learner).make_session(tiny) as s:
        res = streaming_perplexity(s, stream, progress=False)
    assert float(res.nll.astype(np.float64).sum()) == pytest.approx(OLD_SUMS[method], rel=1e-4)
    if method == "window":   # the window with the learner is the temp-lora method, fused first step included
        with learner.make_session(tiny) as s:
            assert s.describe()["fused_first_step"]
            ref = streaming_perplexity(s, stream, progress=False)
        np.testing.assert_allclose(res.nll, ref.nll, rtol=1e-6, atol=1e-6)


def test_temp_lora_on_top_of_memory_learns_what_left_both(tiny):
    """A passage that has left the local window is read again: with the memory alone and with Temp-Lora on top.
    The adapter lowers the loss on it (it trained on it), the base weights stay as they were, and the memory's
    base variant (the plain window, adapter off) is the same in both runs."""
    torch.manual_seed(3)
    passage, filler = torch.randint(0, 300, (48,)), torch.randint(0, 300, (64,))
    ids = torch.cat([passage, filler, passage])
    before = weights_fingerprint(tiny.model)
    memory = dict(window=32, chunk=16, mem_layers=[1], lookup="dense")
    runs = {}
    for tl in (None, dict(window=32, chunk=16, lr=1e-2, rank=8, alpha=16, steps=3)):
        with method_config("memory", **memory, temp_lora=tl).make_session(tiny) as s:
            runs[tl is not None] = streaming_perplexity(s, ids, compare_base=True, progress=False)
    again = slice(112, 159)
    assert runs[True].nll[again].mean() < 0.9 * runs[False].nll[again].mean()
    np.testing.assert_allclose(runs[True].base_nll, runs[False].base_nll, rtol=1e-5, atol=1e-5)
    assert runs[True].method == "memory+temp-lora" and runs[True].config["temp_lora"]["rank"] == 8
    assert weights_fingerprint(tiny.model) == before


def test_window_with_temp_lora_is_the_temp_lora_method(tiny, stream):
    """`WindowConfig(temp_lora=...)` and `--method window --temp-lora` make the same session as the temp-lora
    method: same name, same numbers."""
    a = method_config("window", window=48, chunk=16, temp_lora=dict(lr=3e-3, rank=4))
    b = method_config("temp-lora", window=48, chunk=16, lr=3e-3, rank=4)
    assert a.temp_lora == b
    results = []
    for cfg in (a, b):
        with cfg.make_session(tiny) as s:
            results.append(streaming_perplexity(s, stream[:120], progress=False))
    assert results[0].method == results[1].method == "temp-lora"
    np.testing.assert_allclose(results[0].nll, results[1].nll, rtol=1e-6, atol=1e-6)


def test_the_harness_asks_capabilities_not_attributes(tiny):
    """ask() reports bytes held only for a session that declares them, and hands the question to a session that
    declares it reads questions (as RAG will)."""
    prompt = torch.arange(10, 60)
    with method_config("window", window=64, chunk=16).make_session(tiny) as s:
        s.kv_bytes = lambda: 123   # an attribute alone is not a declaration
        _, held = ask(s, prompt, n_tokens=4)
        assert held is None

    class Asker(type(s)):
        questions = []

        @property
        def capabilities(self):
            return replace(super().capabilities, question=True)

        def question(self, tokens, answer_at=None):
            self.questions.append((tokens.tolist(), answer_at))
            self.absorb(tokens)

    with method_config("window", window=64, chunk=16).make_session(tiny) as s:
        s.__class__ = Asker
        ask(s, prompt, n_tokens=4, question_at=44)
        assert Asker.questions == [(list(range(54, 60)), None)] and torch.equal(s.history, prompt)
    with method_config("window", window=64, chunk=16).make_session(tiny) as s:   # the answer's beginning, in it
        s.__class__ = Asker
        ask(s, prompt, n_tokens=4, question_at=44, answer_at=47)
        assert Asker.questions[-1] == (list(range(54, 60)), 3)


def test_a_method_named_in_one_line_of_text():
    from infinictx.core.registry import method_from_spec

    cfg = method_from_spec("memory:mem_layers=8,15,22:lookup=topk:window=2048:mem_dtype=none", temp_lora={"lr": 1e-3})
    assert (cfg.mem_layers, cfg.lookup, cfg.window, cfg.mem_dtype) == ([8, 15, 22], "topk", 2048, None)
    assert cfg.temp_lora.window == 2048 and cfg.temp_lora.chunk == 256 and cfg.temp_lora.lr == 1e-3
    assert method_from_spec("temp-lora:fuse_first_step=false:lr=1e-3").fuse_first_step is False
    for bad, message in [("nomethod", "unknown method"), ("razor:sinks", "setting=value"),
                         ("razor:window=64", "setting=value"), ("razor:sinks=many", "takes int"),
                         ("temp-lora:mst=maybe", "true or false")]:
        with pytest.raises(InfinictxError, match=message):
            method_from_spec(bad)
