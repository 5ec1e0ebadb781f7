"""CrossBatch training on a tiny random Llama: memory layers really read other rows (positives and negatives)
in one softmax, with gradients; no memory = plain causal attention; training lowers the loss; the result saves
as a LongLLaMA-format checkpoint that loads back with its memory settings."""

import random

import torch
from conftest import DEVICE

from infinictx import MemoryConfig, load_model, streaming_perplexity, weights_fingerprint
from infinictx.core.attention import Rope, local_attention
from infinictx.methods.memory.crossbatch import (
    Batch,
    CrossBatchConfig,
    crossbatch_attention,
    crossbatch_loss,
    make_batch,
    train_crossbatch,
)


def test_no_memory_rows_is_plain_causal_attention(tiny):
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape).to(DEVICE) for shape in ((3, 4, 10, 16), (3, 2, 10, 16), (3, 2, 10, 16)))
    rope = Rope(tiny.model, tiny.device, tiny.dtype)
    rows = torch.full((3, 2), -1)
    out = crossbatch_attention(q, k, v, rows, rope, 0.25)
    ref = local_attention(rope.rotate(q, 0), rope.rotate(k, 0), v, 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_extra_negatives_reach_rows_with_memory_only(tiny):
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape).to(DEVICE) for shape in ((2, 4, 6, 16), (2, 2, 6, 16), (2, 2, 6, 16)))
    rope = Rope(tiny.model, tiny.device, tiny.dtype)
    rows = torch.tensor([[1], [-1]])  # row 0 reads row 1; row 1 has no memory
    extra = ((torch.randn(1, 2, 5, 16) * 3).to(DEVICE), torch.randn(1, 2, 5, 16).to(DEVICE))
    a = crossbatch_attention(q, k, v, rows, rope, 0.25)
    b = crossbatch_attention(q, k, v, rows, rope, 0.25, extra=extra)
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_memory_rows_are_read_with_gradient(tiny):
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (3, 12))
    rope = Rope(tiny.model, tiny.device, tiny.dtype)
    with_memory = Batch(ids=ids, memory_rows=torch.tensor([[-1, -1], [0, 2], [-1, -1]]))
    # row 1 reads rows 0 (positive) and 2 (negative) in memory layer 1: changing row 0 changes row 1's loss
    model = tiny.model
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    loss = crossbatch_loss(model, with_memory, {1}, rope)
    loss.backward()
    assert emb.grad is not None and emb.grad[ids[0]].abs().sum() > 0
    emb.requires_grad_(False)

    def row1_logits(batch):
        from infinictx.core.attention import decoder_forward

        def attend(i, a, q, k, v):
            if i == 1:
                return crossbatch_attention(q, k, v, batch.memory_rows, rope, a.scaling)
            return local_attention(rope.rotate(q, 0), rope.rotate(k, 0), v, a.scaling)
        with torch.no_grad():
            return decoder_forward(model, batch.ids.to(DEVICE), attend)[1]

    changed = ids.clone()
    changed[0] = torch.randint(0, 300, (12,))
    a = row1_logits(with_memory)
    assert not torch.allclose(a, row1_logits(Batch(ids=changed, memory_rows=with_memory.memory_rows)))
    no_mem = torch.full((3, 2), -1)
    assert torch.allclose(row1_logits(Batch(ids=ids, memory_rows=no_mem)),
                          row1_logits(Batch(ids=changed, memory_rows=no_mem)))


def test_batch_layout_follows_the_mix(tiny):
    docs = [torch.randint(0, 300, (400,)) for _ in range(5)]
    cfg = CrossBatchConfig(context=16, mix=((0, 0), (1, 1), (2, 1), (3, 0)), negative_growth=((0.0, 1), (0.5, 2)),
                           needle_rate=0.0)
    b = make_batch(docs, cfg, random.Random(0), tiny.tokenizer, progress=0.0)
    assert b.ids.shape == (10, 16)
    mem = [[r for r in row if r >= 0] for row in b.memory_rows.tolist()]
    # groups occupy rows [0], [1,2], [3,4,5], [6,7,8,9]
    assert mem[0] == [] and mem[1] == [] and mem[2][0] == 1 and len(mem[2]) == 2 and mem[2][1] not in (1, 2)
    assert mem[5][:2] == [3, 4] and len(mem[5]) == 3
    assert mem[9] == [6, 7, 8]
    # consecutive rows of a group are consecutive text
    late = make_batch(docs, cfg, random.Random(0), tiny.tokenizer, progress=0.9)
    assert len([r for r in late.memory_rows[2].tolist() if r >= 0]) == 3  # 1 positive + 1×2 negatives


def test_training_lowers_loss_and_saves_a_loadable_longllama_checkpoint(tiny_model_dir, tmp_path):
    lm = load_model(tiny_model_dir, device=DEVICE, dtype="float32")
    before = weights_fingerprint(lm.model)
    torch.manual_seed(0)
    docs = [torch.randint(0, 300, (300,)) for _ in range(4)]
    cfg = CrossBatchConfig(context=16, steps=25, lr=3e-3, mem_layers=[1], needle_rate=0.0, warmup=1,
                           last_context_length=48, extra_negatives=40, share_tokens=24)
    fixed = make_batch(docs, cfg, random.Random(5), lm.tokenizer)
    rope = Rope(lm.model, lm.device, lm.dtype)
    with torch.no_grad():
        start = crossbatch_loss(lm.model, fixed, {1}, rope).item()
    log = train_crossbatch(lm, docs, cfg, out=tmp_path / "fot", progress=False)
    with torch.no_grad():
        end = crossbatch_loss(lm.model, fixed, {1}, rope).item()
    assert log["steps_done"] == 25 and end < start
    assert weights_fingerprint(lm.model) != before  # fine-tuning (unlike Temp-Lora) changes the weights: merged
    assert not any("lora" in n for n, _ in lm.model.named_parameters())
    back = load_model(tmp_path / "fot", device=DEVICE, dtype="float32")
    assert back.memory["mem_layers"] == [1] and back.memory["last_context_length"] == 48
    assert weights_fingerprint(back.model) == weights_fingerprint(lm.model)
    with MemoryConfig().make_session(back) as s:
        assert s.window == 48 and list(s.memory) == [1]
        res = streaming_perplexity(s, torch.randint(0, 300, (120,)), progress=False)
    assert res.summary()["ppl"] > 0
    # the memory gate saved with the checkpoint is its default; an explicit N wins, 0 turns it off
    text = torch.randint(0, 300, (200,))
    nll = {}
    for share in (None, 24, 0):
        with MemoryConfig(memory_share_tokens=share).make_session(back) as s:
            assert s.config.memory_share_tokens == (None if share == 0 else 24)
            nll[share] = streaming_perplexity(s, text, progress=False).nll
    assert (nll[None] == nll[24]).all()
    assert abs(nll[None] - nll[0]).max() > 1e-5   # 200 tokens, W=48: the memory holds more than 24 entries


def test_a_bf16_base_is_merged_and_saved_in_fp32(tiny_model_dir, tmp_path):
    # AMX CPUs and GPUs train on a bf16 base: merging the fp32 update into bf16 weights would round it away
    from safetensors.torch import load_file

    lm = load_model(tiny_model_dir, device=DEVICE, dtype="bfloat16")
    base = {n: p.detach().float().cpu() for n, p in lm.model.named_parameters()}
    torch.manual_seed(0)
    docs = [torch.randint(0, 300, (300,)) for _ in range(4)]
    cfg = CrossBatchConfig(context=16, steps=3, lr=1e-4, mem_layers=[1], needle_rate=0.0, warmup=1,
                           last_context_length=48, extra_negatives=0)
    train_crossbatch(lm, docs, cfg, out=tmp_path / "fot", progress=False)
    saved = load_file(tmp_path / "fot" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert next(lm.model.parameters()).dtype == torch.bfloat16     # handed back as loaded
    name = "model.layers.1.self_attn.q_proj.weight"
    update = saved[name] - base[name]
    assert update.abs().max() > 0
    # an update this small, merged in bf16, would mostly vanish; in fp32 it is kept whole
    assert ((base[name] + update).bfloat16().float() - base[name] != update).float().mean() > 0.5


def test_needles_mark_the_repeated_code_and_weight_its_loss(tiny):
    """The recorded needle spans hold the repeated code (a character tokenizer makes them easy to read), and
    needle_weight adds their loss to the language-modelling loss."""

    class CharTokenizer:  # one token per character
        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": [ord(c) % 256 for c in text]})()

    docs = [torch.randint(0, 256, (2000,)) for _ in range(3)]
    cfg = CrossBatchConfig(context=120, mix=((1, 0), (2, 1)), needle_rate=1.0)
    b = make_batch(docs, cfg, random.Random(3), CharTokenizer())
    assert len(b.needles) == 2
    for row, s, e in b.needles:
        code = "".join(chr(t) for t in b.ids[row, s:e].tolist())
        assert code.strip().isdigit() and len(code.strip()) == 6
        assert "".join(chr(t) for t in b.ids[row, :s].tolist()).endswith(" is")
        first = "".join(chr(t) for t in b.ids[row - (1 if row == 1 else 2)].tolist())
        assert f"is {code.strip()}." in first  # the first mention sits in the group's first row
    rope = Rope(tiny.model, tiny.device, tiny.dtype)
    with torch.no_grad():
        plain = crossbatch_loss(tiny.model, b, {1}, rope).item()
        weighted = crossbatch_loss(tiny.model, b, {1}, rope, needle_weight=5.0).item()
    assert weighted > plain


def test_held_out_and_test_documents_never_reach_training():
    import pytest

    from infinictx import InfinictxError
    from infinictx.methods.memory.crossbatch import split_documents

    docs = [(f"book{i}", i) for i in range(6)]
    train, held = split_documents(docs, ["book1", "book4"], ["book5"])
    assert [n for n, _ in train] == ["book0", "book2", "book3"] and [n for n, _ in held] == ["book1", "book4"]
    with pytest.raises(InfinictxError, match="unknown documents"):
        split_documents(docs, ["book9"])
    with pytest.raises(InfinictxError, match="both held out and excluded"):
        split_documents(docs, ["book1"], ["book1"])


def test_the_best_evaluated_adapter_is_the_one_merged(tiny_model_dir):
    """Checkpoint selection: evaluate() every k steps and at the end; the adapter of the lowest score is kept."""
    lm = load_model(tiny_model_dir, device=DEVICE, dtype="float32")
    torch.manual_seed(0)
    docs = [torch.randint(0, 300, (300,)) for _ in range(4)]
    probe = torch.randint(0, 300, (1, 24)).to(DEVICE)
    seen = []

    def evaluate(model_lm, mem_layers):
        assert mem_layers == [1] and not torch.is_grad_enabled()
        seen.append(model_lm.model(probe).logits.clone())
        return {"score": [3.0, 1.0, 2.0][len(seen) - 1]}   # the second evaluation (after step 8) is the best

    cfg = CrossBatchConfig(context=16, steps=10, lr=1e-2, mem_layers=[1], needle_rate=0.0, warmup=1)
    log = train_crossbatch(lm, docs, cfg, progress=False, evaluate=evaluate, eval_every=4)
    assert [e["step"] for e in log["evals"]] == [4, 8, 10] and log["kept_step"] == 8
    with torch.no_grad():
        torch.testing.assert_close(lm.model(probe).logits, seen[1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(seen[1], seen[2], atol=1e-3)   # the last adapter differed: selection mattered


def test_trained_checkpoints_load_by_name_from_the_cache(tmp_path, monkeypatch):
    """`--model smollm2-fot` / `smollm2-fot-books`: the recipe's folder under the cache; untrained, the error names
    the recipe that makes it."""
    import pytest

    from infinictx import InfinictxError
    from infinictx.core.models import TRAINED_MODELS, resolve_model_path

    monkeypatch.setenv("INFINICTX_CACHE", str(tmp_path))
    assert {"smollm2-fot", "smollm2-fot-books"} <= set(TRAINED_MODELS)
    for name, (folder, recipe) in TRAINED_MODELS.items():
        with pytest.raises(InfinictxError, match=f"{name} is not trained yet: run .*{recipe}"):
            resolve_model_path(name)
        (tmp_path / "models" / folder).mkdir(parents=True)
        (tmp_path / "models" / folder / "config.json").write_text("{}")
        assert resolve_model_path(name) == (tmp_path / "models" / folder, name)


def test_stop_after_is_the_same_run_cut_short(tiny_model_dir):
    """stop_after rebuilds a time-budgeted run on any machine: the first k steps of the same schedule, exactly."""
    import pytest

    from infinictx import InfinictxError

    torch.manual_seed(0)
    docs = [torch.randint(0, 300, (300,)) for _ in range(4)]
    losses, weights = {}, {}
    for stop in (2, 4):
        lm = load_model(tiny_model_dir, device=DEVICE, dtype="float32")
        cfg = CrossBatchConfig(context=16, steps=4, stop_after=stop, lr=3e-3, mem_layers=[1], needle_rate=0.0,
                               warmup=1, last_context_length=48)
        log = train_crossbatch(lm, docs, cfg, out=None, progress=False)
        losses[stop], weights[stop] = [h["loss"] for h in log["history"]], weights_fingerprint(lm.model)
    assert len(losses[2]) == 2 and len(losses[4]) == 4
    assert losses[2] == losses[4][:2] and weights[2] != weights[4]
    with pytest.raises(InfinictxError, match="stop_after must be within"):
        CrossBatchConfig(steps=4, stop_after=5)
