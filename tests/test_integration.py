"""A few checks with the real embedded model (SmolLM2-135M-Instruct) on short texts."""

import pytest
import torch
from conftest import DEVICE

from infinictx import TempLoraConfig, load_model, read_text, streaming_perplexity, weights_fingerprint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    return load_model(None, device=DEVICE, dtype="float32")


def test_converted_gguf_matches_direct_gguf_load(smol):
    from transformers import AutoModelForCausalLM

    from infinictx.core.models import embedded_gguf

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


def test_layerwise_forward_and_memory_session_match_the_real_model(smol):
    """The forward the memory method runs equals transformers' on the real model, and with nothing yet in
    memory the memory session scores like full attention."""
    from infinictx import MemoryConfig
    from infinictx.core.attention import Rope, decoder_forward, local_attention

    text, _ = read_text(None)
    ids = smol.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][:96]
    rope = Rope(smol.model, smol.device, smol.dtype)

    def attend(i, a, q, k, v):
        return local_attention(rope.rotate(q, 0), rope.rotate(k, 0), v, a.scaling)

    with torch.no_grad():
        ref = smol.model(ids[None]).logits
        torch.testing.assert_close(decoder_forward(smol.model, ids[None], attend), ref, rtol=1e-4, atol=1e-4)
    with MemoryConfig(window=96, chunk=32).make_session(smol) as s:
        nll = torch.cat([s.score_and_absorb(ids[i:i + 32])[0] for i in range(0, 96, 32)])
    full = torch.nn.functional.cross_entropy(ref[0, :-1], ids[1:], reduction="none")
    torch.testing.assert_close(nll, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method, settings", [
    ("memory", {"window": 1024, "lookup": "topk", "topk": 128, "mem_layers": "auto"}),
    ("longcache", {"window": 1024}),
])
def test_fast_kernels_match_the_reference_on_a_4k_book_passage(smol, method, settings):
    """Same NLLs over 4K tokens of the book up to float rounding (the scores come from differently blocked
    matmuls and the softmax is summed in another order, so a near-tie at the k-th key can flip: measured for
    memory 1-18 of 4,095 positions beyond 1e-4, max 1.1e-3 nats) and the same greedy continuation."""
    from infinictx import method_config
    from infinictx.core.session import Sampler

    text, _ = read_text(None)
    ids = smol.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][:4096]
    nll, generated = {}, {}
    for kernel in ("fast", "reference"):
        with method_config(method, **settings, kernel=kernel).make_session(smol) as s:
            nll[kernel] = torch.cat([s.score_and_absorb(ids[i:i + s.chunk])[0] for i in range(0, len(ids), s.chunk)])
            generated[kernel] = s.generate_chunk(16, 0, Sampler(temperature=0.0, repetition_penalty=1.0))
    diff = (nll["fast"] - nll["reference"]).abs()
    assert diff.mean() < 2e-5 and diff.max() < 5e-3, (int((diff > 1e-4).sum()), float(diff.mean()), float(diff.max()))
    assert torch.equal(generated["fast"], generated["reference"])
