"""Shared fixtures: a tiny randomly initialised Llama (with a small byte-level BPE tokenizer) saved as a normal
HF directory, so the whole stack (loading, sessions, CLI) runs in seconds."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Where the tests put the model: the CPU (CI), or `INFINICTX_TEST_DEVICE=cuda` on a machine with a GPU. Tests of
# the CPU-only fast paths (AMX, int8 copies) and of numbers recorded on the CPU skip on another device.
DEVICE = os.environ.get("INFINICTX_TEST_DEVICE", "cpu")
cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="a CPU-only path, or numbers recorded on the CPU")

SAMPLE = (
    "Of Mans First Disobedience, and the Fruit Of that Forbidden Tree, whose mortal tast Brought Death into the "
    "World, and all our woe, With loss of Eden, till one greater Man Restore us, and regain the blissful Seat, "
    "Sing Heav'nly Muse, that on the secret top Of Oreb, or of Sinai, didst inspire That Shepherd, who first "
    "taught the chosen Seed, In the Beginning how the Heav'ns and Earth Rose out of Chaos. "
)


@pytest.fixture(autouse=True)
def keep_thread_count():
    """Commands under test set torch's thread count for the whole process (`--threads 1`); put it back so a later
    test's numerics do not depend on which tests ran before it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([SAMPLE * 4], vocab_size=320, min_frequency=1, special_tokens=["<eos>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None,
                         tie_word_embeddings=True, initializer_range=0.3)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_head32_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's shape with 32-dim attention heads (what the AMX selection kernel takes), same tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama-head32")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.head_dim = 32
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture
def tiny(tiny_model_dir):
    """A freshly loaded tiny model (sessions modify the module tree while they are open)."""
    from infinictx import load_model

    return load_model(tiny_model_dir, device=DEVICE, dtype="float32")


def stop_after(session, chunks: int):
    """Make `session` raise KeyboardInterrupt (as Ctrl-C would) when asked to read chunk number `chunks` + 1."""
    original, calls = session.score_and_absorb, {"n": 0}

    def score_and_absorb(chunk, compare_base=False):
        calls["n"] += 1
        if calls["n"] > chunks:
            raise KeyboardInterrupt
        return original(chunk, compare_base)

    session.score_and_absorb = score_and_absorb


@pytest.fixture
def stream():
    torch.manual_seed(1)
    return torch.randint(0, 300, (200,))
