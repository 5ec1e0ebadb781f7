"""The analytic FLOP formula agrees with the model's actual parameter counts."""

import torch

from infinictx import TempLoraConfig
from infinictx.core.cost import ModelShape


def test_dense_flops_count_every_linear_weight(tiny):
    shape = ModelShape.from_config(tiny.model.config)
    linear = sum(m.weight.numel() for n, m in tiny.model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    f = shape.forward_flops(n=10, cached=0, logits=0)
    assert f["dense"] == 2 * 10 * linear
    head = shape.forward_flops(n=10, logits=3)["dense"] - f["dense"]
    assert head == 2 * 3 * tiny.model.lm_head.weight.numel()


def test_lora_flops_match_trainable_parameters(tiny):
    shape = ModelShape.from_config(tiny.model.config)
    with TempLoraConfig(window=32, chunk=16, rank=8).make_session(tiny) as s:
        trainable = sum(p.numel() for p in s.learner.params)
    assert shape.forward_flops(n=1, lora_rank=8)["lora"] == 2 * trainable


def test_attention_flops_causal_sum():
    shape = ModelShape(layers=1, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)
    # 3 new tokens after 5 cached: keys seen = 6 + 7 + 8 = 21
    assert shape.forward_flops(n=3, cached=5)["attention"] == 4 * 2 * 4 * 21
