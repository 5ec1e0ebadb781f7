"""Focused Transformer memory on a tiny random Llama: the layer-by-layer forward equals the stock model, memory
attention with an empty memory equals plain attention, dense == top-k with k = memory size, faiss == torch,
grouping changes nothing, the past is split exactly into local window + memory, resume reproduces a run, and a
LongLLaMA-format checkpoint loads with its weights and memory settings."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import DEVICE

from infinictx import InfinictxError, MemoryConfig, Sampler, WindowConfig, load_model, streaming_perplexity
from infinictx.core.attention import Rope, decoder_forward, local_attention
from infinictx.methods.memory import Memory, memory_attention


def full_attend(rope):
    def attend(i, a, q, k, v):
        return local_attention(rope.rotate(q, 0), rope.rotate(k, 0), v, a.scaling)
    return attend


def test_layerwise_forward_equals_stock_model(tiny, stream):
    ids = stream[:60][None].to(tiny.device)
    rope = Rope(tiny.model, tiny.device, tiny.dtype)
    with torch.no_grad():
        ours = decoder_forward(tiny.model, ids, full_attend(rope))
        ref = tiny.model(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def random_qkv(B=1, Hq=4, Hkv=2, T=5, L=9, M=30, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return r(B, Hq, T, D), r(B, Hkv, L, D), r(B, Hkv, L, D), r(B, Hkv, M, D), r(B, Hkv, M, D)


def test_empty_memory_equals_plain_attention():
    q, k, v, _, _ = random_qkv()
    memory = Memory(torch.float32)
    memory.append(k[:, :, :0], v[:, :, :0])
    out = memory_attention(q, k, v, q, memory, 0.25)
    torch.testing.assert_close(out, local_attention(q, k, v, 0.25), rtol=1e-5, atol=1e-5)


def reference_memory_attention(q, k, v, mk, mv, scale):
    """One softmax over [memory ‖ causal local], written out with repeated KV heads."""
    g = q.shape[1] // k.shape[1]
    K = torch.cat([mk, k], 2).repeat_interleave(g, 1)
    V = torch.cat([mv, v], 2).repeat_interleave(g, 1)
    T, L, M = q.shape[2], k.shape[2], mk.shape[2]
    s = q @ K.transpose(-1, -2) * scale
    allowed = torch.ones(T, M + L, dtype=torch.bool)
    allowed[:, M:] = torch.arange(L)[None] <= torch.arange(L - T, L)[:, None]
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ V


def test_dense_memory_attention_is_one_softmax_over_memory_and_local():
    q, k, v, mk, mv = random_qkv()
    memory = Memory(torch.float32)
    memory.append(mk, mv)
    out = memory_attention(q, k, v, q, memory, 0.25)
    torch.testing.assert_close(out, reference_memory_attention(q, k, v, mk, mv, 0.25), rtol=1e-5, atol=1e-5)
    # grouping (1 query head, 2 queries per block) bounds memory and changes nothing
    grouped = memory_attention(q, k, v, q, memory, 0.25, grouping=(1, 2))
    torch.testing.assert_close(grouped, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("faiss_min", [10 ** 9, 1])
def test_topk_with_k_equal_memory_size_equals_dense(faiss_min):
    q, k, v, mk, mv = random_qkv()
    memory = Memory(torch.float32, faiss_min=faiss_min)
    memory.append(mk[:, :, :20], mv[:, :, :20])
    memory.append(mk[:, :, 20:], mv[:, :, 20:])  # the faiss index follows appends
    assert (memory.indexes is not None) == (faiss_min == 1)
    dense = memory_attention(q, k, v, q, memory, 0.25)
    topk = memory_attention(q, k, v, q, memory, 0.25, lookup="topk", topk=30, grouping=(2, 3))
    torch.testing.assert_close(topk, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lookup, faiss_min", [("dense", None), ("topk", None), ("topk", 1)])
def test_a_planted_key_is_retrieved(lookup, faiss_min):
    """One memory entry among 2000 matches the query: the output is (nearly) its value."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 1, 16)
    k, v = torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16)
    mk, mv = torch.randn(1, 1, 2000, 16), torch.randn(1, 1, 2000, 16)
    planted = 1234
    mk[0, 0, planted] = 4 * (q[0, 0, 0] + q[0, 1, 0])  # both query heads of the KV group match it
    mv[0, 0, planted] = torch.full((16,), 7.0)
    memory = Memory(torch.float32, faiss_min=faiss_min)
    memory.append(mk, mv)
    out = memory_attention(q, k, v, q, memory, 0.25, lookup=lookup, topk=4)
    torch.testing.assert_close(out, torch.full_like(out, 7.0), rtol=0, atol=0.05)


def test_faiss_and_torch_topk_pick_the_same_entries():
    q, k, v, mk, mv = random_qkv(M=500)
    mem_torch, mem_faiss = Memory(torch.float32), Memory(torch.float32, faiss_min=1)
    for m in (mem_torch, mem_faiss):
        m.append(mk, mv)
    a = memory_attention(q, k, v, q, mem_torch, 0.25, lookup="topk", topk=8)
    b = memory_attention(q, k, v, q, mem_faiss, 0.25, lookup="topk", topk=8)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and top-8 of 500 really is a selection: it differs from dense attention
    assert not torch.allclose(a, memory_attention(q, k, v, q, mem_torch, 0.25), atol=1e-3)


def test_memory_session_with_empty_memory_equals_full_attention(tiny, stream):
    ids = stream[:48]  # = W: nothing leaves the window, the memory stays empty
    with torch.no_grad():
        logits = tiny.model(ids[None].to(tiny.device)).logits[0, :-1].cpu()
    ref = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
    with MemoryConfig(window=48, chunk=16, mem_layers=[1]).make_session(tiny) as s:
        nll = torch.cat([s.score_and_absorb(ids[i:i + 16])[0].cpu() for i in range(0, 48, 16)])
        assert len(s.memory[1]) == 0 and len(s.local[0]) == 48
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)


def test_memory_generation_matches_stock_greedy_while_memory_is_empty(tiny, stream):
    prompt = stream[:20]
    with MemoryConfig(window=64, chunk=16, mem_layers=[0, 1]).make_session(tiny) as s:
        s.absorb(prompt)
        ours = s.generate_chunk(12, 0, Sampler(repetition_penalty=1.0, ban_eos=False))
    ids = prompt[None].to(tiny.device)
    ref = []
    with torch.no_grad():
        for _ in range(12):
            ref.append(int(tiny.model(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[ref[-1]]], device=ids.device)], 1)
    assert ours.tolist() == ref


def test_past_is_split_into_local_window_and_memory(tiny, stream):
    with MemoryConfig(window=48, chunk=16, mem_layers=[1], lookup="topk", topk=4).make_session(tiny) as s:
        res = streaming_perplexity(s, stream, compare_base=True, progress=False)
        assert len(s.local[0]) + len(s.memory[1]) == len(stream)
        assert 0 not in s.memory  # other layers drop what leaves the window
        assert s.kv_bytes() == sum(x.nbytes() for x in s.local) + s.memory[1].nbytes()
        # generation continues past the window: the local cache spills into memory
        before, n_local = len(s.memory[1]), len(s.local[0])
        s.generate_chunk(20, 0, Sampler())
        assert len(s.memory[1]) == before + n_local + 20 - 48 and len(s.local[0]) == 48
    assert np.isfinite(res.nll).all()
    # base = the plain window on the same inputs
    with WindowConfig(window=48, chunk=16).make_session(tiny) as w:
        ref = streaming_perplexity(w, stream, progress=False).nll
    np.testing.assert_allclose(res.base_nll, ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(res.nll[48:], ref[48:], atol=1e-4)  # memory changes the scores once it holds tokens


def test_memory_capped_at_zero_is_the_plain_cached_window(tiny, stream):
    """No memory left: the local window alone, a cache whose keys were computed once, as they were read, i.e.
    StreamingLLM without sink tokens. (The `window` method re-reads its W−Δ context for every chunk instead:
    that is the session's base variant, `compare_base`.)"""
    from infinictx import StreamingConfig

    with MemoryConfig(window=48, chunk=16, mem_layers=[0, 1], memory_tokens=0,
                      local_context="cache").make_session(tiny) as s:
        res = streaming_perplexity(s, stream, compare_base=True, progress=False)
        assert len(s.memory[0]) == len(s.memory[1]) == 0 and s.kv_bytes() == sum(x.nbytes() for x in s.local)
    with StreamingConfig(window=48, chunk=16, sinks=0).make_session(tiny) as w:
        ref = streaming_perplexity(w, stream, progress=False).nll
    np.testing.assert_allclose(res.nll, ref, rtol=1e-5, atol=1e-4)
    with WindowConfig(window=48, chunk=16).make_session(tiny) as w:
        np.testing.assert_allclose(res.base_nll, streaming_perplexity(w, stream, progress=False).nll, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("lookup, kernel", [("dense", "fast"), ("topk", "fast"), ("topk", "reference")])
def test_memory_cap_keeps_the_newest_past(tiny, stream, lookup, kernel):
    """A cap of n holds exactly the n newest tokens that left the window (bytes held say so), and reads as an
    uncapped memory would if the older past had never been there."""
    kw = dict(window=32, chunk=8, mem_layers=[1], lookup=lookup, topk=4, kernel=kernel, faiss_min=8)
    with MemoryConfig(memory_tokens=20, **kw).make_session(tiny) as capped, \
            MemoryConfig(**kw).make_session(tiny) as full:
        for s in range(0, 96, 8):
            capped.absorb(stream[s:s + 8])
            full.absorb(stream[s:s + 8])
            assert len(capped.memory[1]) == min(20, len(full.memory[1]))
        one_entry = capped.memory[1].nbytes() // 20
        assert capped.kv_bytes() == sum(x.nbytes() for x in capped.local) + 20 * one_entry
        torch.testing.assert_close(capped.memory[1].keys(), full.memory[1].keys()[:, :, -20:])
        torch.testing.assert_close(capped.memory[1].values(), full.memory[1].values()[:, :, -20:])
        # what it forgot is gone from its scores: they differ from the uncapped memory's
        assert not torch.allclose(capped.score(stream[96:104]), full.score(stream[96:104]), atol=1e-4)


def test_reread_local_context_with_no_memory_is_the_window_method(tiny, stream):
    """local_context="reread": every chunk is read with its W−Δ local tokens re-read in the same forward, as the
    window method reads it; with the memory capped at 0 the two are the same model on the same inputs."""
    with MemoryConfig(window=48, chunk=16, mem_layers=[0, 1], memory_tokens=0,
                      local_context="reread").make_session(tiny) as s:
        nll = streaming_perplexity(s, stream, progress=False).nll
    with WindowConfig(window=48, chunk=16).make_session(tiny) as w:
        ref = streaming_perplexity(w, stream, progress=False).nll
    np.testing.assert_allclose(nll, ref, rtol=1e-5, atol=1e-5)


def test_reread_memory_reads_the_past_and_resumes(tiny, stream, tmp_path):
    cfg = MemoryConfig(window=32, chunk=8, mem_layers=[1], local_context="reread")
    with cfg.make_session(tiny) as a, cfg.make_session(tiny) as b:
        for s in range(0, 96, 8):   # scoring alone, then absorbing, is one fused step
            chunk = stream[s:s + 8]
            alone = a.score(chunk)
            a.absorb(chunk)
            torch.testing.assert_close(alone, b.score_and_absorb(chunk)[0], rtol=1e-5, atol=1e-5)
        assert len(a.memory[1]) + len(a.local[0]) == 96 and a.local_ids.tolist() == stream[64:96].tolist()
        a.generate_chunk(12, 0, Sampler())   # generation continues from the cached window, into memory
        assert len(a.local_ids) == len(a.local[0]) == 32 and len(a.memory[1]) == 96 + 12 - 32
    res = None
    with cfg.make_session(tiny) as s:
        res = streaming_perplexity(s, stream, compare_base=True, progress=False)
    assert not np.allclose(res.nll[32:], res.base_nll[32:], atol=1e-4)   # the memory changes what it reads
    ckpt = tmp_path / "mem.ckpt"
    with cfg.make_session(tiny) as s:
        streaming_perplexity(s, stream[:104], progress=False, checkpoint=ckpt, checkpoint_every=1)
    with cfg.make_session(tiny) as s:
        resumed = streaming_perplexity(s, stream, progress=False, checkpoint=ckpt).nll
    np.testing.assert_allclose(resumed, res.nll, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lookup, fast", [("dense", False), ("dense", True), ("topk", False), ("topk", True)])
@pytest.mark.parametrize("T", [1, 5])
def test_memory_share_gate_makes_r_copies_weigh_as_one(lookup, fast, T):
    """The fixed gate: a memory score bias of −log r. Every memory entry repeated r times, read with the bias,
    is exactly the memory read once without it: the memory's share of the softmax no longer grows with its size."""
    from infinictx.core.kernels import Scratch

    q, k, v, mk, mv = random_qkv(T=T, M=40)
    once, copies = Memory(torch.float32, faiss_min=None), Memory(torch.float32, faiss_min=None)
    once.append(mk, mv)
    copies.append(mk.repeat_interleave(4, 2), mv.repeat_interleave(4, 2))
    topk = 6
    kw = dict(lookup=lookup, scratch=Scratch() if fast else None)
    want = memory_attention(q, k, v, q, once, 0.25, topk=topk, **kw)
    got = memory_attention(q, k, v, q, copies, 0.25, topk=4 * topk, mem_bias=-math.log(4), **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and without the gate the copies weigh four times as much: a different output
    assert not torch.allclose(memory_attention(q, k, v, q, copies, 0.25, topk=4 * topk, **kw), want, atol=1e-3)


def test_memory_share_tokens_is_off_below_its_size_and_on_above(tiny, stream):
    kw = dict(window=32, chunk=8, mem_layers=[1])
    with MemoryConfig(**kw).make_session(tiny) as plain, \
            MemoryConfig(memory_share_tokens=48, **kw).make_session(tiny) as gated:
        for s in range(0, 72, 8):     # 40 tokens in memory, 48 while the next chunk is read: the gate not yet on
            plain.absorb(stream[s:s + 8])
            gated.absorb(stream[s:s + 8])
        assert len(gated.memory[1]) == 40
        torch.testing.assert_close(gated.score(stream[72:80]), plain.score(stream[72:80]))
        for s in range(72, 120, 8):
            plain.absorb(stream[s:s + 8])
            gated.absorb(stream[s:s + 8])
        assert not torch.allclose(gated.score(stream[120:128]), plain.score(stream[120:128]), atol=1e-4)


def test_bad_memory_cap(tiny):
    with pytest.raises(InfinictxError, match="memory-tokens"):
        MemoryConfig(window=32, chunk=8, memory_tokens=-1)
    with pytest.raises(InfinictxError, match="memory-share-tokens"):
        MemoryConfig(window=32, chunk=8, memory_share_tokens=-1)
    with pytest.raises(InfinictxError, match="local context"):
        MemoryConfig(window=32, chunk=8, local_context="nope")


def test_score_without_absorb_equals_fused_score_and_absorb(tiny, stream):
    cfg = MemoryConfig(window=32, chunk=8, mem_layers=[0], positionals="distance")
    with cfg.make_session(tiny) as a, cfg.make_session(tiny) as b:
        for s in range(0, 96, 8):
            chunk = stream[s:s + 8]
            alone = a.score(chunk)
            a.absorb(chunk)
            fused, _ = b.score_and_absorb(chunk)
            torch.testing.assert_close(alone, fused, rtol=1e-5, atol=1e-5)


def test_resume_reproduces_uninterrupted_run(tiny, stream, tmp_path):
    cfg = MemoryConfig(window=32, chunk=8, mem_layers=[1], mem_dtype="bfloat16")
    with cfg.make_session(tiny) as s:
        full = streaming_perplexity(s, stream, progress=False).nll
    ckpt = tmp_path / "mem.ckpt"
    with cfg.make_session(tiny) as s:
        streaming_perplexity(s, stream[:104], progress=False, checkpoint=ckpt, checkpoint_every=1)
    with cfg.make_session(tiny) as s:
        resumed = streaming_perplexity(s, stream, progress=False, checkpoint=ckpt).nll
    np.testing.assert_allclose(resumed, full, rtol=1e-5, atol=1e-5)


def test_bad_memory_settings_are_clear_errors(tiny):
    for bad, msg in [({"mem_layers": [5]}, "out of range"), ({"positionals": "middle"}, "positionals"),
                     ({"lookup": "ann"}, "lookup"), ({"topk": 0}, "top-k"), ({"mem_dtype": "int8"}, "dtype"),
                     ({"grouping": (0, 4)}, "grouping"), ({"window": 16, "chunk": 16}, "smaller than the window"),
                     ({"window": 0}, "must be >= 2"), ({"window": -5, "chunk": 1}, "must be >= 2"),
                     ({"topk": -3}, "top-k")]:
        with pytest.raises(InfinictxError, match=msg):
            MemoryConfig(**bad).make_session(tiny)


def test_longllama_checkpoint_loads_with_weights_and_memory_settings(tiny, tmp_path):
    """A directory in LongLLaMA's format (its config fields, Llama weight names, pytorch_model.bin)."""
    src = tiny.model
    cfg = src.config
    raw = {"architectures": ["LongLlamaForCausalLM"], "model_type": "longllama",
           "auto_map": {"AutoConfig": "configuration_longllama.LongLlamaConfig",
                        "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM"},
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
           "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
           "num_key_value_heads": cfg.num_key_value_heads, "hidden_act": "silu", "max_position_embeddings": 64,
           "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": False, "rope_scaling": None,
           "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32", "bos_token_id": None,
           "eos_token_id": cfg.eos_token_id, "pad_token_id": None,
           "last_context_length": 32, "mem_layers": [1], "mem_positionals": True, "mem_dtype": "bfloat16",
           "mem_attention_grouping": [2, 16], "torch_attention": False, "gradient_checkpoint_every_ith": 1}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # LongLLaMA does not tie
    torch.save(state, tmp_path / "pytorch_model.bin")
    tiny.tokenizer.save_pretrained(tmp_path)

    lm = load_model(tmp_path, device=DEVICE, dtype="float32")
    assert lm.memory == {"mem_layers": [1], "last_context_length": 32, "positionals": "first",
                         "mem_dtype": "bfloat16", "grouping": [2, 16], "memory_share_tokens": None}
    for name, tensor in lm.model.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)
    with MemoryConfig().make_session(lm) as s:
        assert (s.window, s.config.mem_layers, s.config.grouping, s.mem_dtype) == (32, [1], (2, 16), torch.bfloat16)
        torch.manual_seed(0)
        res = streaming_perplexity(s, torch.randint(0, 300, (120,)), progress=False)
        assert len(s.memory[1]) > 0 and s.memory[1].k.dtype == torch.bfloat16
    assert np.isfinite(res.nll).all()
