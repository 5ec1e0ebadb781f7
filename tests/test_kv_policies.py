"""KV-cache policies (full, StreamingLLM, LongCache, RazorAttention) under one session: each equals the stock
model where it should, bounds what it should, and rejects bad budgets."""

import math

import pytest
import torch
import torch.nn.functional as F

from infinictx import FullConfig, InfinictxError, LongCacheConfig, RazorConfig, StreamingConfig, TempLoraConfig
from infinictx.analysis.heads import head_scores, retrieval_heads
from infinictx.core.attention import Rope
from infinictx.core.models import weights_fingerprint
from infinictx.core.session import Sampler
from infinictx.methods.kv.longcache import LongCachePolicy
from infinictx.methods.kv.razor import RazorPolicy
from infinictx.tasks.retrieval import run_retrieval


def stock_nll(lm, ids):
    with torch.no_grad():
        logits = lm.model(input_ids=ids[None].to(lm.device)).logits[0].cpu()
    return F.cross_entropy(logits[:-1], ids[1:], reduction="none")


def streamed_nll(session, ids):
    out = [session.score_and_absorb(ids[s:s + session.chunk])[0].cpu() for s in range(0, len(ids), session.chunk)]
    return torch.cat(out)


def test_full_policy_equals_the_stock_model(tiny, stream):
    ids = stream[:150]
    with FullConfig(chunk=32).make_session(tiny) as s:
        torch.testing.assert_close(streamed_nll(s, ids), stock_nll(tiny, ids), rtol=1e-5, atol=1e-5)
        assert s.kv_bytes() == 2 * 2 * 2 * 16 * 150 * 4   # layers × KV heads × (K, V) × head dim × tokens × fp32
        # generation continues from the cache exactly as the stock model's greedy decoding
        out = s.generate_chunk(6, 0, Sampler(repetition_penalty=1.0, ban_eos=False))
    ref = tiny.model.generate(ids[None].to(tiny.device), max_new_tokens=6, do_sample=False)[0, 150:]
    assert out.tolist() == ref.tolist()


def test_streaming_with_window_covering_everything_equals_full(tiny, stream):
    ids = stream[:150]
    with StreamingConfig(window=200, chunk=32).make_session(tiny) as s:
        torch.testing.assert_close(streamed_nll(s, ids), stock_nll(tiny, ids), rtol=1e-5, atol=1e-5)


def test_streaming_bounds_its_cache_and_keeps_the_sinks(tiny, stream):
    with StreamingConfig(window=48, sinks=4, chunk=16).make_session(tiny) as s:
        nll = streamed_nll(s, stream[:160])
        per_token = 2 * 2 * 2 * 16 * 4
        assert s.kv_bytes() == 48 * per_token                 # W tokens held at the end
        layer = tiny.model.model.layers[0]
        with torch.no_grad():
            embedded = tiny.model.model.embed_tokens(stream[:4].to(tiny.device))
            first = layer.self_attn.k_proj(layer.input_layernorm(embedded))
        sinks = s.policy.k[0][0, :, :4]                       # (KV heads, 4, head dim), kept before RoPE
        torch.testing.assert_close(sinks, first.view(4, 2, 16).transpose(0, 1))
    ref = stock_nll(tiny, stream[:160])
    torch.testing.assert_close(nll[:47], ref[:47], rtol=1e-5, atol=1e-5)  # inside the first window: the same
    assert not torch.allclose(nll[60:], ref[60:], atol=1e-3)


def test_longcache_recalling_everything_equals_full_attention(tiny, stream):
    # W=256 > 150 tokens, but global 4 + recall 200×1 + Δ 32 leave only 20 local tokens: the middle is scored,
    # every position gets votes (top-k ≥ its size) and recalled (span 1): positions 0..L−1 = the true ones.
    ids = stream[:150]
    cfg = LongCacheConfig(window=256, chunk=32, global_tokens=4, span=1, recall_clip=200, topk=1000)
    with cfg.make_session(tiny) as s:
        torch.testing.assert_close(streamed_nll(s, ids), stock_nll(tiny, ids), rtol=1e-5, atol=1e-5)
        assert max(s.policy.selected) > 50                   # the selection path ran


def test_longcache_bounds_positions_to_its_scope(tiny, stream):
    cfg = LongCacheConfig(window=64, chunk=16, global_tokens=4, span=4, recall_clip=4)
    with cfg.make_session(tiny) as s:
        streamed_nll(s, stream[:200])
        assert s.rope.cos.shape[0] <= 256        # the RoPE table never grew past its minimum: positions < 64
        assert max(s.policy.selected) <= 4 * 4
        full = 2 * 2 * 2 * 16 * 200 * 4
        assert sum(b.nbytes() for b in s.policy.layers) == full   # the cache itself is full
        # held bytes: + the bf16-candidate selection's copies on a CPU with AMX (centred keys in bf16 — this head
        # size is not the int8 tiles' —, fp32 norms, an fp32 bound weight, duplicate flags, int64 hashes) and the
        # index of the hashes
        copies = 2 * 2 * 200 * (16 * 2 + 4 + 4 + 1 + 8) if s.policy.candidate_keys[0].size else 0
        index = sum(x[0].nbytes + x[1].nbytes for x in s.policy.key_index if x is not None)
        assert s.kv_bytes() == full + copies + index
        a = s.generate_chunk(4, 0, Sampler())
        b = s.generate_chunk(4, 0, Sampler())
        assert len(a) == len(b) == 4


def test_longcache_selects_the_span_around_a_matching_key():
    policy = LongCachePolicy(window=64, global_tokens=0, span=8, recall_clip=1, topk=1)
    torch.manual_seed(0)
    k_mid = torch.randn(1, 2, 100, 16) * 0.1
    needle = torch.randn(16)
    k_mid[0, :, 57] = needle
    q = needle.expand(1, 4, 3, 16).clone()          # every query and head points at position 57
    assert policy.select(q, k_mid).tolist() == list(range(53, 61))   # a span of 8 centred on it


def test_razor_compensation_token_stands_for_the_dropped_tokens():
    # All heads compressed, window 2: when the dropped keys and values are identical, the mean token weighted
    # by log n gives exactly the attention over the dropped tokens themselves.
    policy = RazorPolicy({0: []}, n_kv=1, group=1, keep_ratio=0.01, min_window=2, sinks=0)
    policy.start(1)

    class A:
        scaling = 0.5

    rope = Rope.__new__(Rope)
    rope.rotate = lambda x, start=0: x               # no RoPE: the comparison is about the weighting
    k0 = torch.randn(1, 1, 1, 8)
    v0 = torch.randn(1, 1, 1, 8)
    k = torch.cat([k0.expand(1, 1, 5, 8), torch.randn(1, 1, 2, 8)], dim=2)
    v = torch.cat([v0.expand(1, 1, 5, 8), torch.randn(1, 1, 2, 8)], dim=2)
    policy.attend(0, A, torch.randn(1, 1, 7, 8), k, v, 0, rope, commit=True)
    assert policy.layers[0].dropped == 5 and policy.layers[0].recent_k.shape[2] == 2
    q = torch.randn(1, 1, 1, 8)
    k_new, v_new = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    out = policy.attend(0, A, q, k_new, v_new, 7, rope, commit=False)
    ref = F.scaled_dot_product_attention(q, torch.cat([k, k_new], 2), torch.cat([v, v_new], 2), scale=0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_razor_keeping_everything_equals_full_and_compressing_holds_fewer_bytes(tiny, stream):
    ids = stream[:200]
    with RazorConfig(chunk=32, keep_ratio=0.5, min_window=1000).make_session(tiny) as s:
        torch.testing.assert_close(streamed_nll(s, ids), stock_nll(tiny, ids), rtol=1e-5, atol=1e-5)
    cfg = RazorConfig(chunk=32, keep_ratio=0.1, min_window=16, sinks=4, induction_ratio=0.25, echo_ratio=0)
    with cfg.make_session(tiny) as s:
        streamed_nll(s, ids)
        retrieval = sum(len(h) for h in s.policy.heads.values())
        assert retrieval == 1                            # 25% of the 4 KV heads
        per_token_head = 2 * 16 * 4
        kept = 4 + 1 + max(16, math.ceil(200 * 0.1))     # sinks + compensation + recent window
        assert s.kv_bytes() == per_token_head * (retrieval * 200 + 3 * kept)


def test_razor_dense_prefill_reads_like_full_then_compresses(tiny, stream):
    ids = stream[:200]
    cfg = RazorConfig(chunk=32, keep_ratio=0.1, min_window=16, sinks=4, induction_ratio=0.25, echo_ratio=0,
                      prefill="dense")
    with cfg.make_session(tiny) as s, FullConfig(chunk=32).make_session(tiny) as full:
        # while the prompt is read every head sees everything: the stock model's numbers
        torch.testing.assert_close(streamed_nll(s, ids), stock_nll(tiny, ids), rtol=1e-5, atol=1e-5)
        streamed_nll(full, ids)
        assert s.kv_bytes() == full.kv_bytes()
        s.end_prompt()
        kept = 4 + 1 + max(16, math.ceil(200 * 0.1))
        assert s.kv_bytes() == 2 * 16 * 4 * (1 * 200 + 3 * kept)
        out = s.generate_chunk(3, 200, Sampler(repetition_penalty=1.0))
        assert len(out) == 3 and s.kv_bytes() == 2 * 16 * 4 * (1 * 203 + 3 * (4 + 1 + max(16, math.ceil(203 * 0.1))))


def induction_model():
    """A tiny Llama with one induction head planted in layer 1 (KV head 0). Layer 0's head 0 attends to the
    previous token: query and key come from a constant direction of the embeddings, in the two RoPE pairs that
    turn fast, the key turned back by one position's angle, so q·k peaks at offset −1; it copies that token's
    identity into other dims. Layer 1's head 0 matches the current token (query) against the previous token
    of each position (key), in the RoPE pairs that barely turn: it attends to the successors of earlier
    copies of the current token. Everything else writes nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.02, bos_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e9})
    model = LlamaForCausalLM(config).eval()
    half = model.model.layers[0].self_attn.head_dim // 2     # RoPE pairs (j, j + half)
    inv = model.model.rotary_emb.inv_freq
    slow = [j for j in range(half) if inv[j] * 512 < 0.1]
    content = slow + [j + half for j in slow]
    n = len(content)
    with torch.no_grad():
        e = torch.randn(config.vocab_size, n)
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, 0] = math.sqrt(n)                                        # the constant direction
        emb[:, 1:1 + n] = e / e.norm(dim=1, keepdim=True) * math.sqrt(n)  # the token
        for layer in model.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                      layer.self_attn.o_proj, layer.mlp.down_proj):
                p.weight.zero_()
        a = model.model.layers[0].self_attn
        for j in (0, 1):
            a.q_proj.weight[j, 0] = 40.0
            a.k_proj.weight[j, 0] = math.cos(inv[j])
            a.k_proj.weight[j + half, 0] = math.sin(inv[j])
        for c in range(n):
            a.v_proj.weight[c, 1 + c] = 1.0
            a.o_proj.weight[1 + n + c, c] = 1.0
        a = model.model.layers[1].self_attn
        for c, d in enumerate(content):
            a.q_proj.weight[d, 1 + c] = 3.0
            a.k_proj.weight[d, 1 + n + c] = 3.0
    return model


def test_the_probe_finds_a_planted_induction_head():
    model = induction_model()
    scores = head_scores(model, block=16, repeats=4)
    assert float(scores["induction"][1, 0]) > 0.8
    others = scores["induction"].clone()
    others[1, 0] = 0
    assert float(others.max()) < 0.1
    assert float(scores["echo"][1, 0]) < 0.05                       # it reads successors, not copies
    assert retrieval_heads(model, induction_ratio=0.25, echo_ratio=0) == {0: [], 1: [0]}


@pytest.mark.parametrize("make, message", [
    (lambda: StreamingConfig(window=0), "window must be > 0"),
    (lambda: StreamingConfig(window=64, chunk=64), "must be smaller than the window"),
    (lambda: StreamingConfig(window=64, chunk=16, sinks=60), "sinks"),
    (lambda: LongCacheConfig(window=-5), "window must be > 0"),
    (lambda: LongCacheConfig(window=256, chunk=64, recall_clip=8, span=32), "budgets exceed the scope"),
    (lambda: LongCacheConfig(window=256, span=0), "span must be > 0"),
    (lambda: RazorConfig(keep_ratio=0), r"keep ratio \(1/C\) must be in \(0, 1\)"),
    (lambda: RazorConfig(keep_ratio=1.5), r"must be in \(0, 1\)"),
    (lambda: RazorConfig(induction_ratio=-0.1), r"induction ratio must be in \[0, 1\]"),
    (lambda: RazorConfig(min_window=0), "min window must be > 0"),
    (lambda: RazorConfig(compensation="max"), "unknown compensation"),
    (lambda: RazorConfig(prefill="lazy"), "unknown prefill"),
    (lambda: FullConfig(chunk=0), "chunk must be > 0"),
])
def test_invalid_budgets_are_clear_errors(tiny, make, message):
    with pytest.raises(InfinictxError, match=message):
        make().make_session(tiny)


def test_forked_sessions_match_fresh_ones(tiny):
    """The retrieval harness reads a shared prefix once and forks: results equal those of fresh sessions."""
    from dataclasses import replace

    from infinictx.methods import KVCacheSession

    class NoFork(KVCacheSession):
        @property
        def capabilities(self):
            return replace(super().capabilities, fork=False)

    def unforkable(session):
        session.__class__ = NoFork
        return session

    cfgs = [LongCacheConfig(window=96, chunk=16, global_tokens=4, span=4, recall_clip=4),
            RazorConfig(chunk=16, min_window=16, keep_ratio=0.1, induction_ratio=0.25, echo_ratio=0)]
    for cfg in cfgs:
        forked = run_retrieval(lambda: cfg.make_session(tiny), tiny.tokenizer, "passkey", [300], 3, progress=False)
        fresh = run_retrieval(lambda: unforkable(cfg.make_session(tiny)), tiny.tokenizer, "passkey", [300], 3,
                              progress=False)
        assert [r["output"] for r in forked.results[0]["per_trial"]] == \
            [r["output"] for r in fresh.results[0]["per_trial"]]
        assert forked.results[0]["kv_bytes"] == fresh.results[0]["kv_bytes"]


def test_temp_lora_on_top_of_a_policy(tiny, stream):
    before = weights_fingerprint(tiny.model)
    ids = stream[:160]
    alone = LongCacheConfig(window=64, chunk=16, global_tokens=4, span=4, recall_clip=2)
    with alone.make_session(tiny) as s:
        plain = streamed_nll(s, ids)
    tl = TempLoraConfig(window=64, chunk=16, lr=3e-3, rank=4, alpha=8)
    on_top = LongCacheConfig(window=64, chunk=16, global_tokens=4, span=4, recall_clip=2, temp_lora=tl)
    with on_top.make_session(tiny) as s:
        assert s.method == "longcache+temp-lora"
        trained = streamed_nll(s, ids)
        assert s.chunks_trained == 10
        with pytest.raises(InfinictxError, match="cannot be forked"):
            s.fork()
    torch.testing.assert_close(trained[:16], plain[:16])           # first chunk: read before any training
    assert not torch.allclose(trained[32:], plain[32:], atol=1e-4)  # then the adapter changes what is read
    assert weights_fingerprint(tiny.model) == before
    assert not any("lora" in n for n, _ in tiny.model.named_parameters())
