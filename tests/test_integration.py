"""A few checks with the real embedded model (SmolLM2-135M-Instruct) on short texts."""

import pytest
import torch

from infinictx import TempLoraConfig, load_model, read_text, streaming_perplexity, weights_fingerprint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    return load_model(None, device="cpu", dtype="float32")


def test_converted_gguf_matches_direct_gguf_load(smol):
    from transformers import AutoModelForCausalLM

    from infinictx.models import embedded_gguf

    gguf = embedded_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = smol.tokenizer("Of Mans First Disobedience, and the Fruit", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(smol.model(ids).logits, direct(ids).logits, rtol=1e-5, atol=1e-5)
    assert smol.model.config.num_hidden_layers == 30 and smol.model.config.num_key_value_heads == 3


def test_temp_lora_remembers_a_passage_that_left_the_window(smol):
    text, _ = read_text(None)  # the default book
    ids = smol.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    passage, filler = ids[1000:1128], ids[5000:5128]
    stream = torch.cat([passage, filler, passage])  # the first copy is 128+ tokens back; the window is 64
    before = weights_fingerprint(smol.model)
    with TempLoraConfig(window=64, chunk=32, lr=3e-4).make_session(smol) as s:
        res = streaming_perplexity(s, stream, compare_base=True, progress=False)
    second = slice(256, 383)
    assert res.nll[second].mean() < 0.9 * res.base_nll[second].mean()
    assert weights_fingerprint(smol.model) == before
