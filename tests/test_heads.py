"""The retrieval-head probe (echo / induction scores, RazorAttention §3.2) and the memory-layer choice built
on it."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from infinictx import InfinictxError
from infinictx.analysis.heads import head_scores, retrieval_layers
from infinictx.methods.memory import resolve_mem_layers, spread_mem_layers


def reference_scores(model_dir, block, repeats, seed, bos_id):
    """The same scores read off transformers' own (eager) attention weights, with plain loops."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(min(1000, cfg.vocab_size // 4), cfg.vocab_size, (block,), generator=g)
    ids = torch.cat([torch.tensor([bos_id]), tokens.repeat(repeats)])[None]
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions      # per layer (1, Hq, T, T)
    T = ids.shape[1]
    echo = torch.zeros(len(attentions), cfg.num_attention_heads)
    induction = torch.zeros_like(echo)
    queries = range(1 + block, T)
    for layer, att in enumerate(attentions):
        for p in queries:
            same = [j for j in range(1, p) if (p - j) % block == 0]
            echo[layer] += att[0, :, p, same].sum(-1)
            induction[layer] += att[0, :, p, [j + 1 for j in same if j + 1 < p]].sum(-1)
    return echo / len(queries), induction / len(queries)


def test_scores_equal_those_read_from_transformers_attention(tiny_model_dir, tiny):
    ours = head_scores(tiny.model, block=12, repeats=3, seed=3, bos_id=0)
    echo, induction = reference_scores(tiny_model_dir, 12, 3, 3, 0)
    torch.testing.assert_close(ours["echo"], echo, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["induction"], induction, rtol=1e-5, atol=1e-6)
    # The KV-group view takes the strongest query head of each group (2 query heads per KV head here).
    torch.testing.assert_close(ours["induction_kv"], induction.view(2, 2, 2).amax(-1))


def echo_model(layers=2, plant_layer=1):
    """A tiny random Llama with one echo head planted: in `plant_layer`, KV head 0 reads its key straight from
    the normalised hidden state (identity rows) and query head 0 reads the same rows (times 6), so a token's
    query matches the keys of its own copies far better than any other token's (random 128-d embeddings are
    nearly orthogonal). RoPE is nearly off: a huge base, and the dimensions its faster frequencies turn left
    empty. The layers below are identities (no attention or MLP output), so
    every copy of a token reaches the planted layer with the same hidden state."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, bos_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e9})
    model = LlamaForCausalLM(config).eval()
    attn = model.model.layers[plant_layer].self_attn
    D = attn.head_dim
    # RoPE pair j turns dims j and j + D/2 by inv_freq[j] per position: use the pairs that turn < 0.1 rad over
    # the whole probe sequence.
    still = (model.model.rotary_emb.inv_freq * 128 < 0.1).nonzero().flatten().tolist()
    with torch.no_grad():
        attn.k_proj.weight[:D] = 0
        for j in still:
            attn.k_proj.weight[j, j] = attn.k_proj.weight[j + D // 2, j + D // 2] = 1.0
        attn.q_proj.weight[:D] = 6 * attn.k_proj.weight[:D]
        for layer in model.model.layers[:plant_layer]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def test_a_planted_echo_head_is_found():
    model = echo_model()
    scores = head_scores(model, block=16, repeats=4)
    # Each query sees itself and c = 1..3 earlier copies of its token: c/(c+1) of its attention goes to the
    # copies, 0.64 on average.
    assert float(scores["echo"][1, 0]) > 0.55
    others = scores["echo"].clone()
    others[1, 0] = 0
    assert float(others.max()) < 0.2                 # no other head echoes
    assert float(scores["echo_kv"][1, 0]) == float(scores["echo"][1, 0])
    assert retrieval_layers(model, 1) == [1]
    assert retrieval_layers(echo_model(plant_layer=0), 1) == [0]


def test_memory_layer_specs(tiny):
    assert resolve_mem_layers([1, 0], tiny) == [1, 0]
    assert resolve_mem_layers("spread", tiny) == spread_mem_layers(2) == [0, 1]
    auto = resolve_mem_layers("auto:2", tiny)
    assert auto == [0, 1]
    assert len(resolve_mem_layers("auto", tiny)) == 1          # 40% of 2 layers, at least one
    for bad in ("auto:0", "auto:3", "auto:x", "every-other"):
        with pytest.raises(InfinictxError, match="memory layers"):
            resolve_mem_layers(bad, tiny)
