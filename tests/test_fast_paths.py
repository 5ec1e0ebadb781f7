"""The fast kernels compute what the reference paths compute: same top-k sets, same attention, same logits."""

import sys

import pytest
import torch
from conftest import DEVICE, cpu_only

from infinictx import method_config
from infinictx.core.errors import InfinictxError
from infinictx.core.kernels import Scratch, block_topk, weighted_rows
from infinictx.methods.memory.session import Memory, memory_attention


@pytest.mark.parametrize("n, k, block", [(5000, 4, 32), (4099, 4, 32), (20000, 128, 16), (3000, 7, 64), (100, 4, 32)])
@pytest.mark.parametrize("ties", [False, True])
def test_block_topk_is_exact_topk_with_ties_to_the_lower_index(n, k, block, ties):
    torch.manual_seed(0)
    s = torch.randint(0, 6, (3, 40, n)).float() if ties else torch.randn(3, 40, n)
    planted = torch.randint(0, n, (3, 40, k))
    s.scatter_(-1, planted, 10 + (0 if ties else torch.rand(3, 40, k)))  # winners anywhere, also the short block
    s[..., -1] = 20.0                                                     # and the very last position
    order = torch.argsort(-s, dim=-1, stable=True)[..., :k]               # the definition: by value, then index
    want_idx = order.sort(-1).values
    vals, idx = block_topk(s, k, block)
    assert torch.equal(idx, want_idx)
    assert torch.equal(vals, s.gather(-1, want_idx))


def test_weighted_rows_equals_gather_then_sum():
    torch.manual_seed(0)
    values, idx, w = torch.randn(1, 3, 500, 16), torch.randint(0, 500, (1, 3, 20, 8)), torch.rand(1, 3, 20, 8)
    want = (w.unsqueeze(-2) @ values[torch.arange(1)[:, None, None, None], torch.arange(3)[None, :, None, None],
                                     idx]).squeeze(-2)
    torch.testing.assert_close(weighted_rows(values, idx, w), want, rtol=1e-5, atol=1e-6)


def test_memory_topk_kernel_finds_planted_keys_among_thousands_and_matches_the_reference():
    torch.manual_seed(0)
    B, Hq, Hkv, T, L, D, M, k = 1, 6, 2, 24, 40, 16, 6000, 8
    memory = Memory(torch.float32, faiss_min=None)
    keys, values = torch.randn(B, Hkv, M, D), torch.randn(B, Hkv, M, D)
    # queries of each KV head's group point along one direction; k keys planted along it score far above the rest
    direction = torch.nn.functional.normalize(torch.randn(Hkv, D), dim=-1) * 4
    q = direction.repeat_interleave(Hq // Hkv, 0)[None, :, None] + 0.3 * torch.randn(B, Hq, T, D)
    where = torch.stack([torch.randperm(M)[:k] for _ in range(Hkv)])
    for h in range(Hkv):
        keys[0, h, where[h]] = 3 * direction[h] + 0.3 * torch.randn(k, D)
    memory.append(keys, values)
    loc_k, loc_v = torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    want = memory_attention(q, loc_k, loc_v, q, memory, 0.25, "topk", k)
    got = memory_attention(q, loc_k, loc_v, q, memory, 0.25, "topk", k, scratch=Scratch())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the lookup the kernels share really finds the planted keys
    s = q.view(B, Hkv, -1, D) @ keys.transpose(-1, -2)
    idx = s.topk(k, dim=-1).indices
    for h in range(Hkv):
        assert torch.equal(idx[0, h].sort(-1).values, where[h].sort().values.expand(idx.shape[2], k))


@pytest.mark.parametrize("same_queries", [True, False])
@pytest.mark.parametrize("T", [1, 7])
def test_fused_dense_memory_attention_matches_the_reference(same_queries, T):
    """The fast dense lookup (one fused attention over [memory ‖ local]) is the blocked softmax of the reference,
    also when the memory's queries carry their own rotation (the doubled-head-size form)."""
    torch.manual_seed(0)
    B, Hq, Hkv, L, D, M = 1, 6, 2, 40, 16, 3000
    memory = Memory(torch.float32, faiss_min=None)
    memory.append(torch.randn(B, Hkv, M, D), torch.randn(B, Hkv, M, D))
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    q_mem = q if same_queries else torch.randn(B, Hq, T, D)
    want = memory_attention(q, k, v, q_mem, memory, 0.25, "dense")
    got = memory_attention(q, k, v, q_mem, memory, 0.25, "dense", scratch=Scratch())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, settings", [
    ("memory", {"window": 64, "chunk": 16, "mem_layers": [0, 1], "lookup": "topk", "topk": 8}),
    ("memory", {"window": 64, "chunk": 16, "mem_layers": [0, 1], "lookup": "dense"}),
    ("memory", {"window": 64, "chunk": 16, "mem_layers": [1], "lookup": "dense", "local_context": "cache"}),
    ("memory", {"window": 64, "chunk": 16, "mem_layers": [1], "lookup": "dense", "positionals": "distance"}),
    ("memory", {"window": 64, "chunk": 32, "mem_layers": [1], "lookup": "topk", "topk": 4, "positionals": "distance",
                "faiss_min": 64}),   # the reference side searches with faiss
    ("longcache", {"window": 96, "chunk": 16, "global_tokens": 4, "span": 4, "topk": 2}),  # rows < 512: plain topk
])
def test_fast_and_reference_sessions_give_the_same_logits_and_generation(tiny, method, settings):
    from infinictx.core.session import Sampler

    torch.manual_seed(3)
    ids = torch.randint(0, 300, (700,))   # tokens repeat: LongCache's selection scores tie exactly
    nll, generated = {}, {}
    for kernel in ("fast", "reference"):
        with method_config(method, **settings, kernel=kernel).make_session(tiny) as s:
            nll[kernel] = torch.cat([s.score_and_absorb(ids[i:i + s.chunk])[0] for i in range(0, len(ids), s.chunk)])
            generated[kernel] = s.generate_chunk(12, 0, Sampler(temperature=0.0, repetition_penalty=1.0))
    torch.testing.assert_close(nll["fast"], nll["reference"], rtol=1e-4, atol=1e-4)
    assert torch.equal(generated["fast"], generated["reference"])


def test_longcache_bf16_selection_keeps_bf16_keys_in_step_with_the_cache(tiny):
    from infinictx.core.session import Sampler

    torch.manual_seed(3)
    ids = torch.randint(0, 300, (400,))
    settings = {"window": 96, "chunk": 16, "global_tokens": 4, "span": 4, "topk": 2}
    with method_config("longcache", **settings, select_dtype="bfloat16").make_session(tiny) as s:
        for i in range(0, 320, s.chunk):
            s.score_and_absorb(ids[i:i + s.chunk])
        s.score(ids[320:352])                      # an uncommitted forward: both buffers roll back
        fork = s.fork()
        fork.absorb(ids[352:400])
        fork.generate_chunk(5, 0, Sampler(temperature=0.0, repetition_penalty=1.0))
        for session in (s, fork):
            policy = session.policy
            for cache, mirror in zip(policy.layers, policy.select_keys):
                assert torch.equal(mirror.keys(), cache.keys().to(torch.bfloat16))
        assert s.kv_bytes() == sum(b.nbytes() for b in s.policy.layers) * 5 // 4   # + bf16 keys: half the keys'
        fork.close()
        # a policy pickled without the copy (an older checkpoint) rebuilds it from the cache at its next step
        state = s.policy.__getstate__() if hasattr(s.policy, "__getstate__") else dict(s.policy.__dict__)
        state = {k: v for k, v in state.items() if k != "select_keys"}
        old = type(s.policy).__new__(type(s.policy))
        old.__setstate__(state)
        s.policy = old
        s.absorb(ids[320:336])
        for cache, mirror in zip(old.layers, old.select_keys):
            assert torch.equal(mirror.keys(), cache.keys().to(torch.bfloat16))


def test_bad_kernel_settings_get_one_line_errors():
    with pytest.raises(InfinictxError, match="kernel"):
        method_config("memory", kernel="turbo")
    with pytest.raises(InfinictxError, match="top-k must be >= 1"):
        method_config("memory", lookup="topk", topk=-1)
    with pytest.raises(InfinictxError, match="kernel"):
        method_config("longcache", kernel="turbo")


SPLITS = ("openmp", "pool", "one-thread")


def _split_native_calls(how: str, monkeypatch):
    """Make every native call split its work the way `how` says (on 2 threads even where tests run on one):
    over torch's OpenMP threads, over the thread pool, or not at all."""
    from infinictx.core import native

    if not native.available():
        pytest.skip("no C compiler: the torch path is used (and tested) instead")
    if how == "openmp" and not native.uses_openmp():
        pytest.skip("the native kernels were built without OpenMP here")
    monkeypatch.setattr(native, "_openmp", how == "openmp")
    monkeypatch.setattr(native, "OPENMP_MIN_ENTRIES", 0)
    monkeypatch.setattr(native, "POOL_MIN_ENTRIES", 0 if how == "pool" else 1 << 62)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)


@pytest.mark.parametrize("n, k", [(5000, 128), (40000, 128), (9000, 4), (300, 7), (1000, 128)])
@pytest.mark.parametrize("split", SPLITS)
def test_native_topk_equals_the_stable_definition(n, k, split, monkeypatch):
    """Rows split over torch's OpenMP threads, over the thread pool, or all on the calling thread: the same top-k.
    Rows long enough for block pruning and rows selected whole; ties, and −0 tying with +0."""
    from infinictx.core import native

    _split_native_calls(split, monkeypatch)
    torch.manual_seed(0)
    zeros = torch.randint(-3, 1, (2, 50, n)).float()
    zeros[zeros == 0] = torch.where(torch.rand(int((zeros == 0).sum())) < 0.5, -0.0, 0.0)
    for s in (torch.randn(2, 50, n), torch.randint(0, 9, (2, 50, n)).float(), zeros):   # continuous, massive ties
        s[0, 0, -1] = 100.0                                                              # a winner in the last block
        want = torch.argsort(-s, dim=-1, stable=True)[..., :k].sort(-1).values
        vals, idx = native.topk_rows(s, k)
        order = idx.sort(-1)
        assert torch.equal(order.values, want)
        assert torch.equal(vals.gather(-1, order.indices), s.gather(-1, want))
    # strided rows (a view into a wider buffer) are read correctly too
    wide = torch.randn(30, n + 17)
    vals, idx = native.topk_rows(wide[:, :n], k)
    assert torch.equal(idx.sort(-1).values, torch.argsort(-wide[:, :n], dim=-1, stable=True)[:, :k].sort(-1).values)


def test_native_topk_survives_nan_scores():
    from infinictx.core import native

    if not native.available():
        pytest.skip("no C compiler")
    s = torch.randn(4, 20000)
    s[1, 100:200] = float("nan")
    s[2] = float("nan")
    vals, idx = native.topk_rows(s, 128)    # returns (no hang, no garbage indices)
    assert idx.min() >= 0 and idx.max() < 20000
    assert torch.equal(idx[0].sort().values, s[0].topk(128).indices.sort().values)


def test_memory_kernel_without_native_topk_is_the_same(tiny, monkeypatch):
    """Where no C compiler exists the fast kernel falls back to torch.topk: same results."""
    from infinictx.core import native

    torch.manual_seed(5)
    ids = torch.randint(0, 300, (600,))
    cfg = method_config("memory", window=64, chunk=16, mem_layers=[0, 1], lookup="topk", topk=2)
    runs = []
    for allow in (True, False):
        if not allow:
            monkeypatch.setattr(native, "available", lambda: False)
        with cfg.make_session(tiny) as s:
            runs.append(torch.cat([s.score_and_absorb(ids[i:i + 16])[0] for i in range(0, len(ids), 16)]))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-5)


def _select_exact(q, keys, k, amx=False, excluded=None):
    """The bf16-candidate selection of rows q over keys: bf16 matmul scores, or (amx) int8 scores computed by AMX
    tiles inside the kernel."""
    from infinictx.core import native
    from infinictx.core.kernels import int8_key_parts, residual_weights
    from infinictx.methods.kv.longcache import AMX_SLACK, BF16_SCORE_REL, bf16_score_bounds

    norms = torch.linalg.vector_norm(keys, dim=-1)
    if amx:
        parts, weights = int8_key_parts(keys)
        slack = AMX_SLACK * torch.linalg.vector_norm(q, dim=-1) * norms.amax(-1)[:, None]
        found = native.select_exact_amx(parts, weights, q, keys, norms, k, slack, excluded)
        return None if found is None else found[1:]
    q16 = q.to(torch.bfloat16)
    scores = torch.matmul(q16, keys.to(torch.bfloat16).transpose(-1, -2))
    eps, eps_residual, slack = bf16_score_bounds(q, q16, norms.amax(-1))
    return native.select_exact(scores, q, keys, norms, eps, k, BF16_SCORE_REL, slack, excluded,
                               residual_weights(keys), eps_residual)


def _int8_test_data():
    """Rows and centred keys the int8 split must bound: magnitudes over 8 decades, one large component, a zero
    row, a block of zero keys, a block of tiny keys beside large ones."""
    torch.manual_seed(3)
    q = torch.randn(2, 40, 64) * torch.logspace(-4, 4, 40)[None, :, None]
    q[0, 3, 7] = 1e3
    q[1, 5] = 0
    x = torch.randn(2, 300, 64) * 3
    x[0, 16:32] = 0
    x[1, 40:50] *= 1e-6
    x[1, 0, 0] = -50
    return q, x


def test_int8_scores_stay_within_their_bound():
    """The AMX kernel's score from the int8 parts, exactly and rounded as the kernel rounds it (the integer to fp32,
    times the rows' and blocks' scales), is within e·‖x‖ + e2·‖r‖ + e3·w of the exact q·x for every pair, and the
    bound is tight enough to leave few keys to re-score (~2^-13 of ‖q‖·‖x‖)."""
    from infinictx.core.kernels import int8_key_parts, int8_row_parts

    q, x = _int8_test_data()
    D = q.shape[-1]
    kp, kw = int8_key_parts(x, first=5)
    qp, qs, qb = int8_row_parts(q)
    kh, kl, qh, ql = kp[..., :D].long(), kp[..., D:].long(), qp[..., :D].long(), qp[..., D:].long()
    assert kh.abs().max() <= 127 and qh.abs().max() <= 127 and kp.dtype == qp.dtype == torch.int8
    integer = 256 * torch.einsum("hrd,hnd->hrn", qh, kh) + torch.einsum("hrd,hnd->hrn", ql, kh) + torch.einsum(
        "hrd,hnd->hrn", qh, kl)
    assert integer.abs().max() < 2 ** 31   # the kernel's int32 sum cannot overflow
    scale = qs[:, :, None].double() * kw[:, None, :, 2].double() * 256
    exact = torch.einsum("hrd,hnd->hrn", q.double(), x.double())
    rounded = integer.float() * (qs[:, :, None] * (256 * kw[:, None, :, 2]))   # fp32, as the kernel computes it
    bound = (qb[..., 0:1].double() * x.double().norm(dim=-1)[:, None] + qb[..., 1:2].double() * kw[:, None, :, 0]
             + qb[..., 2:3].double() * kw[:, None, :, 1])
    assert ((integer.double() * scale - exact).abs() <= bound).all()
    assert ((rounded.double() - exact).abs() <= bound).all()
    scale_of = q.double().norm(dim=-1)[:, :, None] * x.double().norm(dim=-1)[:, None]
    # (the planted large components loosen their own row's and block's bounds: ~2% of the pairs here)
    assert (bound <= 2.0 ** -11 * scale_of + 1e-30).float().mean() > 0.97


def test_native_int8_copies_match_the_torch_reference():
    """The native rows (packed as the tiles' B operands) and key copies are `int8_row_parts` and `int8_key_parts`:
    the same integers and scales, the bound's terms to rounding; rows past R are zero; a row or a block with a value
    that is not finite is reported (None; an infinite scale)."""
    from infinictx.core import native
    from infinictx.core.kernels import int8_key_parts, int8_row_parts

    if not native.available():
        pytest.skip("no C compiler")
    q, x = _int8_test_data()
    H, R, D = q.shape
    slack = torch.rand(H, R)
    packed, scales, terms = native.int8_rows(q, slack)
    parts, ref_scales, bounds = int8_row_parts(q)
    G = packed.shape[1]
    unpacked = packed.permute(0, 1, 4, 2, 3, 5).reshape(H, 16 * G, 2 * D)   # [h, row, part·D + dim]
    assert torch.equal(unpacked[:, :R], parts) and not unpacked[:, R:].any()
    assert torch.equal(scales[:, :R], ref_scales) and not scales[:, R:].any()
    torch.testing.assert_close(terms[..., :3], bounds, rtol=1e-6, atol=0)
    assert torch.equal(terms[..., 3], slack)
    q[1, 2, 3] = float("nan")
    assert native.int8_rows(q, slack) is None
    centre = torch.randn(H, 1, D)
    x[1, 100, 5] = float("inf")
    keys = x + centre
    x = keys - centre   # what the native copies centre
    k8, norms, weights, kmax = native.int8_key_copies(keys, centre, 5)
    ref_parts, ref_weights = int8_key_parts(x, first=5)
    finite = torch.ones(H, x.shape[1], dtype=torch.bool)
    finite[1, 85:101] = False   # the block of key 100 (blocks from key 5: 85..100)
    assert torch.equal(k8[finite], ref_parts[finite])
    torch.testing.assert_close(weights[finite], ref_weights[finite], rtol=1e-6, atol=0)
    assert torch.isinf(weights[1, 85:101, 2]).all() and torch.isinf(ref_weights[1, 85:101, 2]).all()
    torch.testing.assert_close(norms[..., 0][finite], x.norm(dim=-1)[finite], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kmax[0], keys[0].norm(dim=-1).max())


def _stable_topk_idx(q, keys, k):
    s = torch.einsum("hrd,hnd->hrn", q.double(), keys.double())   # exact enough to rank distinct fp32 scores
    return torch.argsort(-s, dim=-1, stable=True)[..., :k].sort(-1).values


def _skip_without_amx(amx: bool, D: int = 64):
    from infinictx.core import native

    if amx and not native.has_amx():
        pytest.skip("no AMX here: the bf16 matmul path is used (and tested) instead")
    if amx and D not in (32, 64):
        pytest.skip("a head size the tile kernel does not take")


# k=20: the k-th best by counting; n=4111: a short last block; D=32: one tile per part of a key
@pytest.mark.parametrize("n, D, k", [(5000, 64, 4), (4111, 16, 4), (3000, 64, 20), (4111, 32, 4)])
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("amx", [False, True])
def test_native_bf16_candidate_selection_is_the_exact_fp32_topk(n, D, k, split, amx, monkeypatch):
    """bf16 scores only find candidates: the k chosen are the exact top-k, also among planted keys whose scores
    differ far below bf16's resolution (and below the split scores' bound), and identical keys tie to the earlier
    position. Scores from a bf16 matmul, or int8 scores from AMX tiles inside the kernel."""
    _split_native_calls(split, monkeypatch)
    _skip_without_amx(amx, D)
    torch.manual_seed(0)
    H, R = 2, 70
    q, keys = torch.randn(H, R, D), torch.randn(H, n, D) * 2
    # near-ties: k + 3 keys along the first row's query, 1e-5 apart (bf16 resolves ~4e-3)
    where = torch.randperm(n)[:k + 3]
    keys[0, where] = q[0, 0] * (3 + 1e-5 * torch.arange(k + 3, dtype=torch.float32))[:, None]
    keys[1, n - 40:] = keys[1, 100:140]   # bit-identical keys, the later copies in the short last block
    idx, rescored = _select_exact(q, keys, k, amx)
    assert torch.equal(idx.sort(-1).values, _stable_topk_idx(q, keys, k))
    assert torch.equal(idx[0, 0].sort().values, where[3:].sort().values)   # the k largest of the planted ones
    assert (rescored >= k).all() and rescored.float().mean() < n / 10      # it re-scored few keys per row
    # strided views, as the cache hands them over (the middle of a longer buffer)
    wide = torch.randn(H, n + 50, D)
    wide[:, 20:20 + n] = keys
    idx2, _ = _select_exact(q, wide[:, 20:20 + n], k, amx)
    assert torch.equal(idx2.sort(-1).values, idx.sort(-1).values)


@pytest.mark.parametrize("amx", [False, True])
def test_native_bf16_candidate_selection_skips_excluded_keys(amx):
    """Keys flagged as never selectable (each has at least k earlier bit-identical twins) are passed over, and
    the selection is still the exact top-k: the best key repeated 40 times gives its first k copies; a block made
    only of flagged copies is never a candidate block (the AMX kernel's maxima leave flagged keys out)."""
    from infinictx.core import native

    if not native.available():
        pytest.skip("no C compiler")
    _skip_without_amx(amx)
    torch.manual_seed(1)
    H, R, n, D, k = 1, 20, 4000, 64, 4
    q, keys = torch.randn(H, R, D), torch.randn(H, n, D)
    best = q[0, :10].mean(0) * 30   # the best key of the first rows
    copies = torch.tensor([7] + list(range(1600, 1632)) + list(range(2000, 2007)))
    keys[0, copies] = best
    excluded = torch.zeros(H, n, dtype=torch.uint8)
    excluded[0, copies[k:]] = 1
    idx, rescored = _select_exact(q, keys, k, amx, excluded)
    assert torch.equal(idx.sort(-1).values, _stable_topk_idx(q, keys, k))
    others = torch.ones(n, dtype=torch.bool)
    others[copies] = False
    top_rows = (q[0] @ best > (q[0] @ keys[0, others].T).amax(-1)).nonzero().flatten()
    assert len(top_rows) >= 5 and all(idx[0, r].sort().values.tolist() == copies[:k].tolist() for r in top_rows)
    assert (rescored[0, top_rows] < len(copies)).all()   # the flagged copies were never re-scored


@pytest.mark.parametrize("amx", [False, True])
def test_native_bf16_candidate_selection_survives_nan(amx):
    from infinictx.core import native

    if not native.available():
        pytest.skip("no C compiler")
    _skip_without_amx(amx)
    torch.manual_seed(0)
    q, keys = torch.randn(1, 8, 64), torch.randn(1, 3000, 64)
    keys[0, 100:200] = float("nan")
    found = _select_exact(q, keys, 4, amx)   # returns: None (the caller falls back) or indices in range
    assert found is None or (found[0].min() >= 0 and found[0].max() < 3000)




@cpu_only
@pytest.mark.parametrize("bf16", ["amx", "matmul", False])
def test_longcache_bf16_candidates_select_what_the_reference_selects(tiny_head32_dir, monkeypatch, bf16):
    """The fast selection with bf16 candidates (int8 scores by AMX tiles, or a bf16 matmul: forced on where
    the CPU has no AMX), fp32 scores only, and the reference give the same logits and greedy generation over a
    stream with repeated tokens (exact ties)."""
    from infinictx import load_model
    from infinictx.core import native
    from infinictx.core.kernels import int8_key_parts
    from infinictx.core.session import Sampler
    from infinictx.methods.kv import longcache

    if bf16 and not native.available():
        pytest.skip("no C compiler")
    _skip_without_amx(bf16 == "amx", 32)
    tiny = load_model(tiny_head32_dir, device=DEVICE, dtype="float32")
    monkeypatch.setattr(longcache, "_fast_bf16_here", lambda: bool(bf16))
    monkeypatch.setattr(longcache, "_amx_here", lambda: bf16 == "amx")
    amx_calls = []
    original = native.select_exact_amx
    monkeypatch.setattr(native, "select_exact_amx", lambda *a: amx_calls.append(1) or original(*a))
    monkeypatch.setattr(longcache, "BF16_MIN_KEYS", 0)   # this stream's middle is shorter than where bf16 pays
    monkeypatch.setattr(longcache, "AMX_MIN_KEYS", 0)
    torch.manual_seed(4)
    ids = torch.randint(0, 300, (1100,))
    settings = {"window": 256, "chunk": 64, "global_tokens": 4, "span": 4, "topk": 2}   # 128 rows per KV head
    nll, generated = {}, {}
    for kernel in ("fast", "fast-fp32", "reference"):
        with method_config("longcache", **settings, kernel=kernel).make_session(tiny) as s:
            nll[kernel] = torch.cat([s.score_and_absorb(ids[i:i + s.chunk])[0] for i in range(0, 960, s.chunk)])
            s.score(ids[960:1024])                     # an uncommitted forward: the copies roll back too
            fork = s.fork()
            generated[kernel] = fork.generate_chunk(12, 0, Sampler(temperature=0.0, repetition_penalty=1.0))
            policy = fork.policy
            if kernel == "fast" and bf16:
                assert policy.rescored > 0                      # the bf16 path really ran
                for cache, k16, norms, weights, centre in zip(policy.layers, policy.candidate_keys, policy.key_norms,
                                                              policy.key_residuals, policy.key_centres):
                    centred = cache.keys() - centre
                    if bf16 == "amx":   # int8 parts in blocks of 16 from the middle's start, blocks re-quantized
                        parts, scaled = int8_key_parts(centred[0], first=settings["global_tokens"])  # as they fill
                        assert torch.equal(k16.keys()[0], parts)
                        torch.testing.assert_close(weights.keys()[0], scaled, rtol=1e-6, atol=0)
                    else:
                        assert torch.equal(k16.keys(), centred.to(torch.bfloat16))
                    torch.testing.assert_close(norms.keys()[..., 0], torch.linalg.vector_norm(centred, dim=-1))
                _check_duplicate_flags(policy, settings["topk"], settings["global_tokens"])
            else:
                assert policy.rescored == 0 and all(len(c) == 0 for c in policy.candidate_keys)
            fork.close()
    for kernel in ("fast", "fast-fp32"):
        torch.testing.assert_close(nll[kernel], nll["reference"], rtol=1e-4, atol=1e-4)
        assert torch.equal(generated[kernel], generated["reference"])
    assert bool(amx_calls) == (bf16 == "amx")   # the tile kernel ran exactly where it should


def _check_duplicate_flags(policy, topk: int, global_tokens: int):
    """Every key flagged as never selectable has at least `topk` earlier bit-identical keys after the global
    tokens; layer 0 (keys a function of the token alone) has flagged keys where tokens repeat."""
    flagged_layers = 0
    for cache, flags in zip(policy.layers, policy.key_excluded):
        keys = cache.keys()[0].view(torch.int32)   # (H, N, D) as bits
        f = flags.keys()[0, ..., 0]
        assert f.shape == keys.shape[:2]
        for h, j in f.nonzero().tolist():
            assert j > global_tokens
            same = (keys[h, global_tokens:j] == keys[h, j]).all(-1)
            assert int(same.sum()) >= topk
        flagged_layers += bool(f.any())
    assert len(policy.key_excluded[0]) and policy.key_excluded[0].keys().any()
    assert flagged_layers >= 1


@cpu_only
def test_longcache_duplicate_flags_on_a_repetitive_stream(tiny):
    """Flags only keys that cannot be selected, and then the selection is still the reference's: a stream that
    repeats a 50-token phrase (whole layers' keys repeat), the bf16 path forced on."""
    from infinictx.core import native
    from infinictx.methods.kv import longcache

    if not native.available():
        pytest.skip("no C compiler")
    torch.manual_seed(5)
    ids = torch.randint(0, 300, (50,)).repeat(20)
    settings = {"window": 256, "chunk": 64, "global_tokens": 4, "span": 4, "topk": 2}
    nll = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(longcache, "_fast_bf16_here", lambda: True)
        mp.setattr(longcache, "BF16_MIN_KEYS", 0)
        for kernel in ("fast", "reference"):
            with method_config("longcache", **settings, kernel=kernel).make_session(tiny) as s:
                nll[kernel] = torch.cat([s.score_and_absorb(ids[i:i + 64])[0] for i in range(0, 960, 64)])
                if kernel == "fast":
                    _check_duplicate_flags(s.policy, 2, 4)
                    assert sum(int(f.keys().sum()) for f in s.policy.key_excluded) > 1000
    torch.testing.assert_close(nll["fast"], nll["reference"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("native_copies", [True, False])
def test_longcache_duplicate_flags_need_topk_earlier_identical_keys_in_the_middle(native_copies, monkeypatch):
    """A key is flagged only with `topk` earlier bit-identical keys after the global tokens: not with fewer,
    not for a twin among the global tokens, not for a key one ulp away; the native copies and flags (one call per
    layer and chunk) hold what the torch path computes: the same hashes and split, the norms and weights to
    rounding."""
    from infinictx.core import native
    from infinictx.methods.kv.longcache import LongCachePolicy, _key_copies, _key_hashes

    if native_copies and not native.available():
        pytest.skip("no C compiler")
    if not native_copies:
        monkeypatch.setattr(native, "available", lambda: False)

    torch.manual_seed(0)
    H, N, D, chunk = 2, 1200, 16, 50
    keys = torch.randn(1, H, N, D)
    a, b = keys[0, 0, 300].clone(), keys[0, 1, 1].clone()
    for j in (500, 700, 900):
        keys[0, 0, j] = a             # 700 has two earlier copies (flagged with topk=2), 500 one
    for j in (400, 600):
        keys[0, 1, j] = b             # 600: one copy in the middle, one among the global tokens
    keys[0, 0, 1000] = torch.nextafter(a, torch.full_like(a, 1e9))   # one ulp away: not a copy
    policy = LongCachePolicy(window=256, global_tokens=4, span=4, recall_clip=4, topk=2)
    policy.start(1)
    for past in range(0, N, chunk):
        policy.layers[0].append(keys[:, :, past:past + chunk], keys[:, :, past:past + chunk])
        policy._candidate_copies(0, policy.layers[0].keys(), keys[:, :, past:past + chunk], past)
    flags = policy.key_excluded[0].keys()[0, ..., 0]
    assert flags.nonzero().tolist() == [[0, 700], [0, 900]]
    assert torch.equal(policy.key_hashes[0].keys(), _key_hashes(keys))
    x16, norms, weights = _key_copies(keys - policy.key_centres[0])
    assert torch.equal(policy.candidate_keys[0].keys(), x16)
    torch.testing.assert_close(policy.key_norms[0].keys(), norms, rtol=1e-6, atol=0)
    torch.testing.assert_close(policy.key_residuals[0].keys(), weights, rtol=1e-6, atol=0)
    torch.testing.assert_close(policy.key_norm_max[0], torch.linalg.vector_norm(keys[0], dim=-1).amax(-1),
                               rtol=1e-6, atol=0)


def test_bf16_score_bound_holds_where_rounding_adds_up():
    """The bound on a bf16 score's error holds for a query and key built so that every rounding goes the same
    way (inputs rounded down by almost a unit roundoff, the sum rounded down by almost one): 2^-7·‖q‖·‖k‖ alone
    does not, there; and on random rows."""
    from infinictx.core.kernels import residual_weights
    from infinictx.methods.kv.longcache import BF16_SCORE_REL, bf16_score_bounds

    below_half_ulp = 2.0 ** -8 - 2.0 ** -20   # just under half of bf16's spacing at 1: rounds down to 1
    q = torch.full((1, 1, 64), 1 + below_half_ulp)
    k = q.clone()
    k[..., 63] = 1.2421875 * (1 + below_half_ulp)   # bf16 1.2421875: the bf16 sum 64.24 rounds down to 64
    torch.manual_seed(0)
    q = torch.cat([q, torch.randn(1, 200, 64)], 1)
    k = torch.cat([k, torch.randn(1, 500, 64)], 1)
    s16 = torch.matmul(q.to(torch.bfloat16), k.to(torch.bfloat16).transpose(-1, -2)).float()
    exact = torch.einsum("hrd,hnd->hrn", q.double(), k.double())
    err = (s16.double() - exact).abs()
    norms = torch.linalg.vector_norm(k, dim=-1)
    eps, eps_residual, _ = bf16_score_bounds(q, q.to(torch.bfloat16), norms.amax(-1))
    bound = (eps[..., None] * norms[:, None, :] + eps_residual[..., None] * residual_weights(k)[:, None, :]
             + BF16_SCORE_REL * s16.abs())
    assert (err <= bound).all()
    naive = 2.0 ** -7 * torch.linalg.vector_norm(q, dim=-1)[..., None] * norms[:, None, :]
    assert err[0, 0, 0] > naive[0, 0, 0]


@pytest.mark.parametrize("k", [4, 128])
@pytest.mark.parametrize("split", SPLITS)
def test_bf16_key_copy_top_k_is_the_exact_fp32_topk(k, split, monkeypatch):
    """Decode lookups through the bf16 copy of the memory keys: the exact top-k (indices and fp32 scores) of a
    few query rows, among planted keys 1e-5 apart (far below bf16's resolution) and bit-identical keys (ties to
    the earlier one), with the copy grown chunk by chunk and over a head subset."""
    from infinictx.core.kernels import Bf16KeyCopy

    _split_native_calls(split, monkeypatch)
    torch.manual_seed(1)
    H, R, n, D = 3, 3, 5000, 64
    q, keys = torch.randn(H, R, D), torch.randn(H, n, D) + 0.5   # an offset: the centre matters
    where = torch.randperm(n)[:k + 3]
    keys[1, where] = q[1, 0] * (3 + 1e-5 * torch.arange(k + 3, dtype=torch.float32))[:, None]
    keys[2, n - 40:] = keys[2, 100:140]
    copy = Bf16KeyCopy()
    for s in range(0, n, 700):
        copy.append(keys[:, s:s + 700])
    vals, idx = copy.top_k(q[1:], keys[1:], 1, 3, k)
    assert torch.equal(idx.sort(-1).values, _stable_topk_idx(q[1:], keys[1:], k))
    assert torch.equal(idx[0, 0].sort().values, where[3:].sort().values)
    exact = torch.einsum("hrd,hrkd->hrk", q[1:].double(), keys[1:].gather(1, idx.view(2, -1, 1).expand(-1, -1, D))
                         .view(2, R, k, D).double())
    torch.testing.assert_close(vals.double(), exact, rtol=1e-5, atol=1e-5)
    assert copy.rescored < 0.3 * copy.rows * n   # it re-scored a small part of the keys


def test_bf16_key_copy_native_append_writes_what_the_torch_path_writes(monkeypatch):
    """The copy's native append (one call per decode step) stores the same bf16 keys, the same error weights (to
    rounding: the bound's margin covers it) and the same running norm maximum as its torch path, appended one key at a
    time or in chunks; the weights bound the bf16 score error."""
    from infinictx.core import native
    from infinictx.core.kernels import Bf16KeyCopy

    if not native.available():
        pytest.skip("no C compiler: the torch path is used (and tested) instead")
    torch.manual_seed(2)
    keys = torch.randn(3, 300, 64) * 4 + 0.5
    keys[1, 7, :5] = torch.tensor([1e-30, -0.0, 1e15, 1e-41, 2.0 ** -126])   # tiny, signed zero, huge, denormal
    copies = {}
    for name, use_native in (("native", True), ("torch", False)):
        monkeypatch.setattr(native, "available", lambda use_native=use_native: use_native)
        copy = Bf16KeyCopy()
        copy.append(keys[:, :100])
        for j in range(100, 300):   # one key at a time, as decoding appends them
            copy.append(keys[:, j:j + 1])
        copies[name] = copy
    a, b = copies["native"], copies["torch"]
    assert len(a) == len(b) == 300 and torch.equal(a.blocks, b.blocks)
    torch.testing.assert_close(a.norms[:, :300], b.norms[:, :300], rtol=1e-6, atol=0)
    torch.testing.assert_close(a.norm_max, b.norm_max, rtol=1e-6, atol=0)
    q = torch.randn(3, 64)
    x = keys - a.centre
    stored = a.blocks.transpose(2, 3).reshape(3, -1, 64)[:, :300].float()   # (H, n, D) back from blocks of 16
    err = torch.einsum("hd,hnd->hn", q.double(), (x - stored).double()).abs()
    assert (err <= torch.linalg.vector_norm(q, dim=-1)[:, None].double() * a.norms[:, :300].double()).all()


@pytest.mark.parametrize("split", SPLITS)
def test_decode_attend_is_one_softmax_over_memory_and_window(split, monkeypatch):
    """The native decode step of a memory layer: softmax over [scaled memory scores + bias ‖ local scores] and the
    weighted sum of the memory rows it names and the local values, equal to the float64 computation; local scores
    given (with hidden keys) or computed from the local queries and keys; a NaN score gives a NaN row."""
    from infinictx.core import native

    _split_native_calls(split, monkeypatch)
    torch.manual_seed(3)
    H, R, k, L, M, D = 3, 3, 16, 40, 500, 64
    vals, idx = torch.randn(H, R, k) * 20, torch.randint(0, M, (H, R, k))
    values = torch.randn(H, 700, D)[:, :M]                    # a view into a growing buffer: strided heads
    q_loc, k_loc = torch.randn(H, R, D), torch.randn(H, 2, L, D)[:, 1]
    v_loc = torch.randn(H, L, D)
    scale, bias = 0.125, -0.7
    s_loc = (q_loc @ k_loc.transpose(-1, -2)) * scale
    s_loc[0, 1, 30:] = float("-inf")
    gathered = values.double()[torch.arange(H)[:, None, None], idx]

    def reference(s_local):
        p = torch.softmax(torch.cat([vals.double() * scale + bias, s_local.double()], -1), -1)
        return torch.einsum("hrk,hrkd->hrd", p[..., :k], gathered) + p[..., k:] @ v_loc.double()

    out = native.decode_attend(vals, idx, scale, bias, values, v_loc, s_loc=s_loc)
    torch.testing.assert_close(out.double(), reference(s_loc), rtol=1e-5, atol=1e-5)
    out = native.decode_attend(vals, idx, scale, bias, values, v_loc, q_loc=q_loc, k_loc=k_loc)
    torch.testing.assert_close(out.double(), reference((q_loc.double() @ k_loc.double().transpose(-1, -2)) * scale),
                               rtol=1e-5, atol=1e-5)
    s_loc[2, 0, 3] = float("nan")
    out = native.decode_attend(vals, idx, scale, bias, values, v_loc, s_loc=s_loc)
    assert out[2, 0].isnan().all() and not out[2, 1:].isnan().any() and not out[:2].isnan().any()


@pytest.mark.parametrize("k", [4, 20, 128])
def test_int8_key_copy_grows_in_pieces_and_finds_the_exact_topk(k):
    """The int8 copy built in uneven pieces (the block still filling re-quantized) equals one built at once, and
    its lookup is the exact fp32 top-k (also among planted near-ties far below the int8 resolution), with the
    keys' fp32 scores. k = 4: the k-th best bound by the insertion network; 20 and 128 (memory's): by counting,
    and the k best without a heap."""
    from infinictx.core.kernels import Int8KeyCopy, int8_key_parts

    _skip_without_amx(True)
    torch.manual_seed(2)
    H, R, n, D = 2, 40, 5000, 64
    keys, q = torch.randn(H, n, D) * 2 + 1, torch.randn(H, R, D)
    where = torch.randperm(n)[:k + 3]   # k + 3 keys along the first row, 1e-5 apart
    keys[0, where] = q[0, 0] * (3 + 1e-5 * torch.arange(k + 3, dtype=torch.float32))[:, None]
    copy, whole = Int8KeyCopy(), Int8KeyCopy()
    bounds = [0, 5, 25, 28, 128, 1000, n]
    for a, b in zip(bounds, bounds[1:]):
        copy.append(keys[:, :b], b - a)
    whole.centre = copy.centre
    whole.append(keys, n)
    assert torch.equal(copy.parts[:, :n], whole.parts[:, :n]) and torch.equal(copy.weights[:, :n], whole.weights[:, :n])
    parts, weights = int8_key_parts(keys - copy.centre)
    assert torch.equal(copy.parts[:, :n], parts)
    vals, idx = copy.top_k(q, keys, 0, H, k)
    assert torch.equal(idx.sort(-1).values, _stable_topk_idx(q, keys, k))
    assert torch.equal(idx[0, 0].sort().values, where[3:].sort().values)
    torch.testing.assert_close(vals, torch.einsum("hrd,hrkd->hrk", q, keys[torch.arange(H)[:, None, None], idx]),
                               rtol=1e-5, atol=1e-5)
    assert copy.rescored < copy.rows * n / 10   # it re-scored few keys per row


def test_capped_memory_rebuilds_its_int8_copy_from_the_kept_keys():
    """A memory capped to its newest entries (`keep_last`) rebuilds its int8 copy from what it kept, blocks counted
    from the new first key, and the copy's lookup is again the exact top-k of the kept keys."""
    from infinictx.core.kernels import int8_key_parts

    _skip_without_amx(True)
    torch.manual_seed(9)
    memory = Memory(torch.float32, faiss_min=None, int8_copy=True)
    keys = torch.randn(1, 2, 3000, 64)
    memory.append(keys, torch.randn(1, 2, 3000, 64))
    memory.keep_last(2100)
    copy, kept = memory.int8_copy, memory.keys()[0]
    assert len(copy) == 2100 and torch.equal(kept, keys[0, :, 900:])
    assert torch.equal(copy.parts[:, :2100], int8_key_parts(kept - copy.centre)[0])
    q = torch.randn(2, 40, 64)
    vals, idx = copy.top_k(q, kept, 0, 2, 8)
    assert torch.equal(idx.sort(-1).values, _stable_topk_idx(q, kept, 8))


@cpu_only
def test_memory_prefill_reads_the_int8_copy_and_matches_the_reference(tiny_head32_dir, monkeypatch):
    """On a CPU with AMX the fast kernel's prefill lookups go through the int8 copy (unless --no-prefill-copy) and
    give the reference kernel's scores and greedy generation; the copy stays in step with the memory (forks,
    uncommitted forwards)."""
    from infinictx import load_model
    from infinictx.core.kernels import int8_key_parts
    from infinictx.core.session import Sampler
    from infinictx.methods.memory import session as memory_session

    _skip_without_amx(True, 32)
    tiny = load_model(tiny_head32_dir, device=DEVICE, dtype="float32")
    monkeypatch.setattr(memory_session, "INT8_LOOKUP_MIN_KEYS", 0)   # this stream's memory is short
    torch.manual_seed(7)
    ids = torch.randint(0, 300, (900,))
    settings = {"window": 64, "chunk": 32, "mem_layers": [0, 1], "lookup": "topk", "topk": 8}
    nll, generated = {}, {}
    runs = {"fast": {"kernel": "fast"}, "no-copy": {"kernel": "fast", "prefill_copy": False},
            "reference": {"kernel": "reference"}}
    for name, extra in runs.items():
        with method_config("memory", **settings, **extra).make_session(tiny) as s:
            nll[name] = torch.cat([s.score_and_absorb(ids[i:i + 32])[0] for i in range(0, 800, 32)])
            s.score(ids[800:832])   # an uncommitted forward
            fork = s.fork()
            generated[name] = fork.generate_chunk(12, 0, Sampler(temperature=0.0, repetition_penalty=1.0))
            copies = [m.int8_copy for m in fork.memory.values()]
            if name == "fast":
                assert sum(c.rows for c in copies) > 0   # the copy answered lookups
                for c, m in zip(copies, fork.memory.values()):
                    assert len(c) == len(m)
                    assert torch.equal(c.parts[:, :len(m)], int8_key_parts(m.keys()[0] - c.centre)[0])
            else:   # --no-prefill-copy, or the reference kernel: no copy kept
                assert all(c is None for c in copies)
            fork.close()
    for name in ("fast", "no-copy"):
        torch.testing.assert_close(nll[name], nll["reference"], rtol=1e-4, atol=1e-4)
        assert torch.equal(generated[name], generated["reference"])


@cpu_only
def test_memory_decode_reads_the_bf16_copy_and_matches_the_reference(tiny):
    """The fast kernel's decode lookups go through the bf16 copy (on CPUs with AVX-512) and give the reference
    kernel's logits and greedy generation."""
    from infinictx.core import native
    from infinictx.core.session import Sampler

    if not native.has_avx512():
        pytest.skip("the copy is kept only where the native kernels have AVX-512")
    torch.manual_seed(6)
    ids = torch.randint(0, 300, (800,))
    settings = {"window": 64, "chunk": 16, "mem_layers": [0, 1], "lookup": "topk", "topk": 8}
    logits, generated = {}, {}
    runs = {"fast": {"kernel": "fast"}, "no-copy": {"kernel": "fast", "decode_copy": False},
            "reference": {"kernel": "reference"}}
    for name, extra in runs.items():
        with method_config("memory", **settings, **extra).make_session(tiny) as s:
            s.absorb(ids)
            logits[name] = torch.stack([s.score(ids[i:i + 1])[0] for i in range(8)])   # one-token steps
            generated[name] = s.generate_chunk(16, 0, Sampler(temperature=0.0, repetition_penalty=1.0))
            copies = [m.bf16_copy for m in s.memory.values()]
            if name == "fast":
                assert all(c is not None and len(c) == len(m) for c, m in zip(copies, s.memory.values()))
                assert sum(c.rows for c in copies) > 0   # the copy answered lookups
            else:   # --no-decode-copy, or the reference kernel: no copy kept
                assert all(c is None for c in copies)
    for name in ("fast", "no-copy"):
        torch.testing.assert_close(logits[name], logits["reference"], rtol=1e-4, atol=1e-4)
        assert torch.equal(generated[name], generated["reference"])


def test_lm_head_runs_as_one_mm_with_the_same_logits_and_gradients(tiny):
    """load_model's head hook: the kept positions' logits come from one mm, not a bmm against a copy of the
    transposed head weight, and logits and gradients equal those of the head without the hook."""
    from torch.profiler import profile

    from infinictx.core.models import fold_head_input

    model = tiny.model
    head = model.get_output_embeddings()
    assert head._infinictx_folds_input and not fold_head_input(model)   # added once, at load
    ids = torch.randint(0, model.config.vocab_size, (1, 40), device=DEVICE)

    def step():
        x = model.model.embed_tokens(ids).detach().requires_grad_(True)
        hidden = model.model(inputs_embeds=x).last_hidden_state
        logits = head(hidden[:, -16:, :])
        logits.float().logsumexp(-1).sum().backward()
        return logits.detach(), x.grad

    def head_bmms(prof) -> int:   # batched matmuls with the vocabulary in a shape: the head's unfolded product
        return sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                   if e.key == "aten::bmm" and any(model.config.vocab_size in s for s in e.input_shapes if s))

    with profile(record_shapes=True) as prof:
        logits, grad = step()
    assert head_bmms(prof) == 0
    hooks = dict(head._forward_pre_hooks)
    head._forward_pre_hooks.clear()
    try:
        with profile(record_shapes=True) as prof:
            want_logits, want_grad = step()
        assert head_bmms(prof) > 0   # what the hook avoids (torch's fold check)
    finally:
        head._forward_pre_hooks.update(hooks)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_freed_blocks_are_reused_without_page_faults():
    """After keep_freed_memory (load_model calls it on the CPU), a 64 MiB tensor freed and allocated again reuses
    the same pages: not one page fault per page per step, as glibc's fresh mmap for every large block costs."""
    import resource

    from infinictx.core.models import keep_freed_memory

    assert keep_freed_memory()
    pages = (64 << 20) // resource.getpagesize()
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)   # the first one is faulted in once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2 * pages   # default glibc: 8 × pages



def _loss_and_lora_grads(lm, ids, attention_mask=None):
    from infinictx.training.lora import add_lora

    model, params = add_lora(lm.model, 4, 8, seed=0)
    g = torch.Generator().manual_seed(5)
    for p in params:   # B = 0 at init: make the adapter matter (the same values in both models)
        p.data = (torch.randn(p.shape, generator=g) * 0.1).to(p.device)
    logits = model(input_ids=ids, attention_mask=attention_mask).logits
    keep = torch.ones_like(ids[:, 1:], dtype=torch.bool)
    if attention_mask is not None:   # predictions from and of real tokens only
        keep = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    (nll * keep).sum().backward()
    return logits.detach(), [p.grad.clone() for p in params]


@cpu_only
@pytest.mark.parametrize("padded", [False, True])
def test_training_attention_equals_sdpa_with_gradients(tiny_model_dir, monkeypatch, padded):
    """The plain product path that short CPU training samples take gives SDPA's logits and LoRA gradients, with the
    causal flag (no mask) and with a padding mask; a sample over the size limit goes to SDPA itself."""
    from infinictx import load_model
    from infinictx.core import train_attention

    ours = load_model(tiny_model_dir, device=DEVICE, dtype="float32")
    stock = load_model(tiny_model_dir, device=DEVICE, dtype="float32")
    stock.model.set_attn_implementation("sdpa")
    assert ours.model.config._attn_implementation == train_attention.NAME
    ids = torch.randint(0, 300, (2, 60), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[0, :13] = 0   # left padding on one row
    calls = []
    plain = train_attention.plain_attention
    monkeypatch.setattr(train_attention, "plain_attention", lambda *a, **k: calls.append(1) or plain(*a, **k))
    logits, grads = _loss_and_lora_grads(ours, ids, mask)
    assert len(calls) == ours.model.config.num_hidden_layers   # every layer took the plain path
    want_logits, want_grads = _loss_and_lora_grads(stock, ids, mask)
    rows = slice(None) if mask is None else (mask.bool())   # padded queries' outputs are not defined alike
    torch.testing.assert_close(logits[rows], want_logits[rows], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):   # fp32 sums in another order: 1e-5 of the tensor's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))

    calls.clear()
    monkeypatch.setattr(train_attention, "MAX_SCORES", 2 * 4 * 60 * 60 - 1)   # batch × heads × T × T, less one
    _loss_and_lora_grads(load_model(tiny_model_dir, device=DEVICE, dtype="float32"), ids, mask)
    with torch.no_grad():
        ours.model(input_ids=ids[:, :10])   # scoring (no gradients) stays on SDPA
    assert calls == []


def test_training_attention_leaves_non_sdpa_models_alone(tiny_model_dir):
    from infinictx import load_model
    from infinictx.core.train_attention import use_training_attention

    lm = load_model(tiny_model_dir, device=DEVICE, dtype="float32")
    lm.model.set_attn_implementation("eager")
    assert not use_training_attention(lm.model)
    assert lm.model.config._attn_implementation == "eager"
