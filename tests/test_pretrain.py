"""Pretraining a small Llama from scratch: the loss falls, the result loads, an interrupted run resumes exactly."""

import pytest
import torch
from conftest import DEVICE, SAMPLE

from infinictx.core.errors import InfinictxError
from infinictx.training.pretrain import PretrainConfig, pretrain, train_tokenizer

TEXTS = [SAMPLE * 3, " ".join(reversed(SAMPLE.split())) * 2]
CFG = dict(hidden=32, layers=2, heads=2, intermediate=64, context=32, batch=4, epochs=6, lr=1e-2, warmup=2,
           save_every=3)


def test_pretrain_learns_and_loads(tmp_path):
    from infinictx import load_model

    tok = train_tokenizer(TEXTS, vocab_size=320)
    rec = pretrain(TEXTS, tok, PretrainConfig(**CFG), tmp_path / "m")
    assert rec["loss_last_50"] < rec["loss_first"] - 1.0
    lm = load_model(tmp_path / "m", device=DEVICE, dtype="float32")
    assert lm.model.config.num_hidden_layers == 2 and len(lm.tokenizer) == len(tok)
    assert pretrain(TEXTS, tok, PretrainConfig(**CFG), tmp_path / "m") == rec   # done: not trained again


def test_an_interrupted_run_resumes_exactly(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=320)
    whole = pretrain(TEXTS, tok, PretrainConfig(**CFG), tmp_path / "a")

    def stop_at_7(step, total, loss):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(TEXTS, tok, PretrainConfig(**CFG), tmp_path / "b", progress=stop_at_7)
    assert (tmp_path / "b" / "train.ckpt").exists()   # saved at step 6
    resumed = pretrain(TEXTS, tok, PretrainConfig(**CFG), tmp_path / "b")
    assert resumed["losses"] == whole["losses"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings():
    with pytest.raises(InfinictxError, match="multiple of heads"):
        PretrainConfig(hidden=30, heads=4)
    with pytest.raises(InfinictxError, match="dtype"):
        PretrainConfig(dtype="float16")
    with pytest.raises(InfinictxError, match="fewer than one block"):
        pretrain(["a b"], train_tokenizer(TEXTS, 320), PretrainConfig(**CFG), "/tmp/never-written")
