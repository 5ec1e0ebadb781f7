"""Long-document translation: parallel data, the translation loop (teacher-forced and free-running), its batched
decoding against the sequential reference, Temp-Lora's masked training sample, resume, Gemma-3's architecture,
and the GGUF assembly."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, SAMPLE

from infinictx.core.errors import InfinictxError
from infinictx.data.parallel import (
    Pair,
    ParallelDoc,
    align_verses,
    read_parallel,
    to_simplified,
)
from infinictx.learners.temp_lora import TempLoraConfig
from infinictx.methods.window import WindowConfig
from infinictx.tasks.translation import (
    DocumentTranslator,
    TranslationSettings,
    TranslationTask,
)

WORDS = SAMPLE.split()


def make_doc(chunks: int = 3, per_chunk: int = 4, seed: int = 0) -> ParallelDoc:
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(chunks):
        pairs = []
        for i in range(per_chunk):
            pick = torch.randint(0, len(WORDS), (6,), generator=g).tolist()
            ref = " ".join(WORDS[j] for j in pick)
            src = "".join("天地神光水人"[j % 6] for j in pick)
            pairs.append(Pair(src, ref, f"{c + 1}:{i + 1}"))
        out.append(pairs)
    return ParallelDoc("tiny", "zh", "en", out)


def translate(lm, doc, window=256, temp_lora=False, **settings):
    config = (TempLoraConfig(window=window, lr=3e-2, rank=4, alpha=8) if temp_lora
              else WindowConfig(window=window))
    with config.make_session(lm) as session:
        tr = DocumentTranslator(session, doc, TranslationSettings(max_new_tokens=12, **settings))
        results = [r for c, chunk in enumerate(doc.chunks) for r in tr.translate_chunk(c, chunk)]
        return results, tr


# --- parallel data -------------------------------------------------------------------------------------
def test_align_verses_merges_placeholder_and_drops_one_sided_keys():
    zh = {(1, 1, 1): "甲", (1, 1, 2): "乙丙", (1, 1, 3): "", (1, 1, 4): "丁", (1, 2, 1): "", (1, 2, 2): "戊"}
    en = {(1, 1, 1): "A", (1, 1, 2): "B", (1, 1, 3): "C", (1, 1, 5): "E", (1, 2, 1): "F", (1, 2, 2): "G"}
    pairs, dropped = align_verses(zh, en)
    assert pairs == [((1, 1, 1), "甲", "A"), ((1, 1, 2), "乙丙", "B C"), ((1, 2, 2), "戊", "G")]
    # 1:4 has no English, 1:5 no Chinese; 2:1 is merged into a verse of another chapter: nothing to join it to
    assert dropped == [(1, 1, 4), (1, 1, 5), (1, 2, 1)]


def test_opencc_converts_traditional_to_simplified():
    assert to_simplified(["起初，神創造天地。", "地是空虛混沌"]) == ["起初，神创造天地。", "地是空虚混沌"]


def test_read_parallel_files_and_jsonl(tmp_path):
    (tmp_path / "src.txt").write_text("一\n二\n三\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("one\ntwo\nthree\n", encoding="utf-8")
    [doc] = read_parallel(str(tmp_path / "src.txt"), str(tmp_path / "ref.txt"), "zh", "en", chunk_sentences=2)
    assert [[(p.src, p.ref) for p in c] for c in doc.chunks] == [[("一", "one"), ("二", "two")], [("三", "three")]]
    rows = [{"src": "一", "ref": "one", "doc": "a"}, {"src": "二", "ref": "two", "doc": "b"},
            {"src": "三", "ref": "three", "doc": "a"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    docs = read_parallel(str(tmp_path / "d.jsonl"), None, "zh", "en")
    assert [[p.ref for p in d.pairs] for d in docs] == [["one", "three"], ["two"]]


@pytest.mark.parametrize("src,ref,langs,message", [
    ("一\n二\n", "one\n", ("zh", "en"), "misaligned files"),
    ("一\n\n二\n", "one\ntwo\nthree\n", ("zh", "en"), "empty line"),
    ("一\n", "one\n", ("zh", "xx"), "unknown language code"),
    ("一\n", "one\n", ("en", "en"), "both"),
])
def test_read_parallel_rejects_bad_input(tmp_path, src, ref, langs, message):
    (tmp_path / "s.txt").write_text(src, encoding="utf-8")
    (tmp_path / "r.txt").write_text(ref, encoding="utf-8")
    with pytest.raises(InfinictxError, match=message):
        read_parallel(str(tmp_path / "s.txt"), str(tmp_path / "r.txt"), *langs)


def test_cli_bad_input_is_one_line(tmp_path, tiny_model_dir, capsys):
    from infinictx.fronts.cli import main

    (tmp_path / "s.txt").write_text("一\n二\n", encoding="utf-8")
    (tmp_path / "r.txt").write_text("one\n", encoding="utf-8")
    assert main(["translate", str(tmp_path / "s.txt"), "--ref", str(tmp_path / "r.txt"), "--model",
                 str(tiny_model_dir), "--method", "window", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("infinictx: error: misaligned files") and "\n" not in err
    assert main(["translate", str(tmp_path / "s.txt"), "--method", "longcache", "--no-progress"]) == 2
    assert "translate runs --method window or temp-lora" in capsys.readouterr().err


# --- the translation loop --------------------------------------------------------------------------------
def stream_of(tr: DocumentTranslator, doc: ParallelDoc, chunk: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The teacher-forced prompt of `chunk` (header, previous chunk's pairs, this chunk's pairs) and the spans of
    its reference lines."""
    ids = list(tr.header)
    for p in doc.chunks[chunk - 1] if chunk else []:
        ids += tr.source_ids(p.src) + tr.target_ids(p.ref)
    spans = []
    for p in doc.chunks[chunk]:
        ids += tr.source_ids(p.src)
        ref = tr.target_ids(p.ref)
        spans.append((len(ids), len(ids) + len(ref)))
        ids += ref
    return ids, spans


@pytest.mark.parametrize("decode", ["batched", "sequential"])
def test_teacher_forced_nll_equals_a_plain_forward(tiny, decode):
    doc = make_doc()
    results, tr = translate(tiny, doc, window=512, decode=decode)   # the whole previous chunk fits in W/2
    for c in range(len(doc.chunks)):
        ids, spans = stream_of(tr, doc, c)
        with torch.no_grad():
            logits = tiny.model(input_ids=torch.tensor([ids], device=tiny.device)).logits[0].cpu()
        nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
        for (a, b), r in zip(spans, [r for r in results if r.chunk == c]):
            assert r.ref_tokens == b - a
            assert r.ref_nll == pytest.approx(float(nll[a - 1:b - 1].sum()), rel=1e-4)


@pytest.mark.parametrize("window", [512, 160])   # 160: the prompt overflows, is rebuilt inside chunks
def test_batched_decoding_equals_sequential(tiny, window):
    doc = make_doc(chunks=3, per_chunk=5)
    batched, _ = translate(tiny, doc, window=window, decode="batched")
    sequential, _ = translate(tiny, doc, window=window, decode="sequential")
    assert [r.hyp for r in batched] == [r.hyp for r in sequential]
    assert any(r.hyp for r in batched)
    assert [r.ref_nll for r in batched] == pytest.approx([r.ref_nll for r in sequential], rel=1e-4)


def test_free_running_uses_no_reference(tiny):
    doc = make_doc()
    blind = ParallelDoc("tiny", "zh", "en", [[Pair(p.src, None, p.key) for p in c] for c in doc.chunks])
    with_ref, _ = translate(tiny, doc, free_running=True)
    without, _ = translate(tiny, blind, free_running=True)
    assert [r.hyp for r in with_ref] == [r.hyp for r in without]
    assert all(r.ref_nll is not None for r in with_ref) and all(r.ref_nll is None for r in without)


def test_training_sample_masks_all_but_the_chunk_targets(tiny, monkeypatch):
    from infinictx.learners.temp_lora import TempLora

    doc = make_doc(chunks=2)
    samples = []
    original = TempLora.train_on

    def spy(self, session, context, piece, loss_mask=None):
        samples.append((context.tolist(), piece.tolist(), loss_mask.tolist()))
        return original(self, session, context, piece, loss_mask)

    monkeypatch.setattr(TempLora, "train_on", spy)
    _, tr = translate(tiny, doc, window=512, temp_lora=True)
    assert len(samples) == 2   # the helper trains after every chunk, the last included (the task skips that one)
    for c, (context, piece, mask) in enumerate(samples):
        ids, spans = stream_of(tr, doc, c)
        start = len(ids) - len(piece)
        assert context + piece == ids   # the context (header + previous chunk), then the chunk
        targets = {i for a, b in spans for i in range(a - start, b - start)}
        assert [i for i, m in enumerate(mask) if m] == sorted(targets)


def test_own_outputs_that_repeat_carry_no_loss(tiny, monkeypatch):
    """Free-running: a translation that repeats another (in the chunk or its context) stays in the sample without
    a loss, unless train_on_repeats; references (teacher-forced) are all trained on; all repeats: no step;
    loss_on="source": the source lines carry the loss, every target line none; min_confidence: an output less
    probable than that carries none either."""
    from infinictx.learners.temp_lora import TempLora

    masks = []
    monkeypatch.setattr(TempLora, "train_on", lambda self, session, context, piece, loss_mask=None:
                        masks.append(loss_mask.tolist()))
    src, loop, other, old = [5, 6], [40, 41, 42], [50, 51], [60, 61]
    context, current = [(src, old)], [(src, loop), (src, other), (src, loop), (src, old)]

    def labelled(own, confidence=None, **settings):
        masks.clear()
        with TempLoraConfig(window=256, rank=4).make_session(tiny) as session:
            tr = DocumentTranslator(session, make_doc(), TranslationSettings(free_running=own, **settings))
            tr.learn(context, current, own_targets=own, confidence=confidence)
            return [m for mask in masks for m in mask], tr.repeats_not_trained + tr.unsure_not_trained

    # per pair: the source's 2 tokens carry no loss, the target's do when it is kept
    shape = lambda keep: [m for (s, t), k in zip(current, keep) for m in [False] * len(s) + [k] * len(t)]  # noqa
    assert labelled(True) == (shape([False, True, False, False]), 3)   # the loop twice, and the context's line
    assert labelled(True, train_on_repeats=True) == (shape([True] * 4), 0)
    assert labelled(False) == (shape([True] * 4), 0)
    sources = [m for s, t in current for m in [True] * len(s) + [False] * len(t)]
    assert labelled(True, loss_on="source") == (sources, 0)
    sure = [math.log(p) for p in (0.9, 0.3, 0.6, 0.2)]
    assert labelled(True, sure, train_on_repeats=True, min_confidence=0.5) == (shape([True, False, True, False]), 2)
    assert labelled(True, sure, min_confidence=0.5) == ([], 4)   # the repeats, then the one left is unsure
    assert labelled(False, sure, min_confidence=0.5) == (shape([True] * 4), 0)   # references are not filtered
    current[1] = (src, loop)
    assert labelled(True) == ([], 4)


def test_output_confidence_is_its_mean_log_probability(tiny):
    """Greedy decoding's confidence: the mean log-probability of the output's tokens under a plain forward of the
    prompt and the output, before the repetition penalty changes the choice."""
    with WindowConfig(window=256).make_session(tiny) as session:
        tr = DocumentTranslator(session, make_doc(), TranslationSettings(free_running=True))
        prompt = tr.header + tr.source_ids("天地神光水人天地")
        last = tr.prompt.rebuild(prompt)[-1]
        out, confidence = tr.greedy(last, 10)
    assert len(out) > 1
    with torch.no_grad():
        logits = tiny.model(input_ids=torch.tensor([prompt + out], device=tiny.device)).logits[0].float().cpu()
    logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
    assert confidence == pytest.approx(float(logprobs[torch.arange(len(out)), torch.tensor(out)].mean()), abs=1e-5)


def test_train_on_loss_is_the_masked_mean(tiny):
    config = TempLoraConfig(window=128, lr=1e-2, rank=4, steps=1)
    with config.make_session(tiny) as session:
        context, piece = torch.arange(5, 25), torch.arange(30, 50)
        mask = torch.zeros(20, dtype=torch.bool)
        mask[[3, 7, 8, 15]] = True
        with torch.no_grad():
            expected = session.chunk_nll(context, piece)[mask].mean()
        seen = []
        learner = session.learner
        step = learner._step
        learner._step = lambda s, nll, n: (seen.append(nll.mean().item()), step(s, nll, n))
        learner.train_on(session, context, piece, mask)
        assert seen == [pytest.approx(expected.item(), rel=1e-5)]


def test_temp_lora_lowers_the_nll_of_a_repeated_document(tiny):
    one = make_doc(chunks=1, per_chunk=6)
    doc = ParallelDoc("rep", "zh", "en", [one.chunks[0], list(one.chunks[0]), list(one.chunks[0])])
    base, _ = translate(tiny, doc, context_chunks=0)
    tl, _ = translate(tiny, doc, context_chunks=0, temp_lora=True)
    first = [r.ref_nll for r in base if r.chunk == 0]
    assert [r.ref_nll for r in tl if r.chunk == 0] == pytest.approx(first, rel=1e-4)   # nothing learned yet
    last_base = sum(r.ref_nll for r in base if r.chunk == 2)
    last_tl = sum(r.ref_nll for r in tl if r.chunk == 2)
    assert last_tl < 0.8 * last_base


def test_cli_run_writes_outputs_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
    from infinictx.fronts.cli import main

    doc = make_doc(chunks=3, per_chunk=3)
    (tmp_path / "s.txt").write_text("".join(p.src + "\n" for p in doc.pairs), encoding="utf-8")
    (tmp_path / "r.txt").write_text("".join(p.ref + "\n" for p in doc.pairs), encoding="utf-8")
    args = ["translate", str(tmp_path / "s.txt"), "--ref", str(tmp_path / "r.txt"), "--model", str(tiny_model_dir),
            "--method", "temp-lora", "-W", "256", "--rank", "4", "--chunk-sentences", "3", "--max-new-tokens", "8",
            "--no-progress", "--buckets", "3"]
    assert main(args + ["--json", str(tmp_path / "full.json"), "--out", str(tmp_path / "full.txt")]) == 0
    full = json.loads((tmp_path / "full.json").read_text())
    assert full["base_weights_unchanged"] and full["sentences"] == 9 and len(full["documents"][0]["buckets"]) == 3
    assert {"ref_ppl", "ref_ppl_sentence_weighted", "bleu", "chrf"} <= set(full)
    # each sentence's reference NLL is in the JSON (for paired comparisons) and adds up to the reference PPL
    t = full["translations"]
    assert [s["chunk"] for s in t] == [0] * 3 + [1] * 3 + [2] * 3
    assert math.exp(sum(s["ref_nll"] for s in t) / sum(s["ref_tokens"] for s in t)) == pytest.approx(full["ref_ppl"])
    assert len((tmp_path / "full.txt").read_text().split("\n")) == 10
    assert (tmp_path / "full.md").read_text().startswith("## Translation zh→en")

    calls = {"n": 0}
    original = DocumentTranslator.translate_chunk

    def stop_at_third(self, index, chunk, learn=True):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, index, chunk, learn)

    monkeypatch.setattr(DocumentTranslator, "translate_chunk", stop_at_third)
    ckpt = tmp_path / "run.ckpt"
    resumed = args + ["--json", str(tmp_path / "resumed.json"), "--checkpoint", str(ckpt)]
    assert main(resumed) == 130 and ckpt.exists()
    monkeypatch.setattr(DocumentTranslator, "translate_chunk", original)
    assert main(resumed) == 0 and not ckpt.exists()
    again = json.loads((tmp_path / "resumed.json").read_text())
    for key in ("translations", "ref_ppl", "bleu", "chrf"):
        assert again[key] == full[key]


# --- Gemma-3's architecture ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    out = tmp_path_factory.mktemp("tiny-gemma3")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              max_position_embeddings=512, eos_token_id=tok.eos_token_id, bos_token_id=None,
                              pad_token_id=None, initializer_range=0.3)
    Gemma3ForCausalLM(config).save_pretrained(out)
    return out


def test_gemma3_sessions_lora_and_batched_decoding(tiny_gemma_dir):
    from infinictx import load_model

    lm = load_model(tiny_gemma_dir, device=DEVICE, dtype="float32")
    assert type(lm.model).__name__ == "Gemma3ForCausalLM"
    doc = make_doc(chunks=2, per_chunk=6)   # prompts longer than the 16-token sliding window
    batched, _ = translate(lm, doc, window=256, decode="batched")
    sequential, _ = translate(lm, doc, window=256, decode="sequential")
    assert [r.hyp for r in batched] == [r.hyp for r in sequential]
    assert [r.ref_nll for r in batched] == pytest.approx([r.ref_nll for r in sequential], rel=1e-4)
    before = lm.fingerprint
    rep = ParallelDoc("rep", "zh", "en", [doc.chunks[0], list(doc.chunks[0])])
    tl, _ = translate(lm, rep, context_chunks=0, temp_lora=True)   # peft LoRA on Gemma-3's linears
    base, _ = translate(lm, rep, context_chunks=0)
    assert sum(r.ref_nll for r in tl if r.chunk == 1) < sum(r.ref_nll for r in base if r.chunk == 1)
    from infinictx.core.models import weights_fingerprint

    assert weights_fingerprint(lm.model) == before


# --- the embedded multilingual model's file ------------------------------------------------------------------
def test_assemble_parts_checks_the_hash(tmp_path):
    from infinictx.core.models import assemble_parts

    parts = []
    for i, data in enumerate([b"abc" * 1000, b"def" * 7, b"g"]):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(data)
    whole = b"abc" * 1000 + b"def" * 7 + b"g"
    good = hashlib.sha256(whole).hexdigest()
    dest = assemble_parts(parts, tmp_path / "out" / "model.gguf", good)
    assert dest.read_bytes() == whole
    with pytest.raises(InfinictxError, match="SHA-256"):
        assemble_parts(parts[:2], tmp_path / "bad.gguf", good)
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob(".bad.gguf*"))


def test_task_checks_settings():
    for bad, message in [({"context_chunks": -1}, "context-chunks"), ({"max_new_tokens": 0}, "max-new-tokens"),
                         ({"src_lang": "xx"}, "unknown language"), ({"buckets": 0}, "buckets")]:
        task = TranslationTask(source="x.txt", **bad)
        with pytest.raises(InfinictxError, match=message):
            task.check(WindowConfig(window=256))


@pytest.mark.parametrize("method,flags", [("full", ["-W", "256", "-D", "64"]), ("streaming", ["-W", "64"]),
                                          ("longcache", ["-W", "256"]), ("razor", []), ("memory", ["-W", "64"])])
def test_methods_needing_llama_internals_refuse_gemma3_in_one_line(tmp_path, tiny_gemma_dir, method, flags, capsys):
    from infinictx.fronts.cli import main

    (tmp_path / "t.txt").write_text(SAMPLE * 6)
    assert main(["ppl", str(tmp_path / "t.txt"), "--model", str(tiny_gemma_dir), "--method", method,
                 "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after the loader's own progress bar
    assert err.startswith("infinictx: error: this method needs a Llama-family decoder") and "gemma3_text" in err


def _stock_and_banded(tiny_gemma_dir):
    from infinictx import load_model

    banded = load_model(tiny_gemma_dir, device=DEVICE, dtype="float32")
    stock = load_model(tiny_gemma_dir, device=DEVICE, dtype="float32")
    stock.model.set_attn_implementation("sdpa")
    assert banded.model.config._attn_implementation == "infinictx_banded_sdpa"
    return stock, banded


def test_banded_sliding_attention_equals_the_stock_path(tiny_gemma_dir):
    from infinictx.training.lora import add_lora

    stock, banded = _stock_and_banded(tiny_gemma_dir)
    ids = torch.randint(0, 300, (1, 203), generator=torch.Generator().manual_seed(3)).to(DEVICE)   # 12×16 and a bit
    grads = []
    for lm in (stock, banded):
        model, params = add_lora(lm.model, 4, 8, seed=0)
        g = torch.Generator().manual_seed(5)
        for p in params:   # B = 0 at init: make the adapter matter (the same values in both models)
            p.data = (torch.randn(p.shape, generator=g) * 0.1).to(p.device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            cached = model(input_ids=ids[:, :150], use_cache=True).past_key_values
            tail = model(input_ids=ids[:, 150:], past_key_values=cached).logits   # queries after a cache
        loss = F.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:])
        loss.backward()
        grads.append(([p.grad.clone() for p in params], logits, tail))
    (g_stock, l_stock, t_stock), (g_banded, l_banded, t_banded) = grads
    torch.testing.assert_close(l_banded, l_stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t_banded, l_stock[:, 150:], rtol=1e-4, atol=1e-4)
    for a, b in zip(g_banded, g_stock):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_mst_on_a_non_llama_model_matches_the_plain_loss_and_gradients(tiny_gemma_dir):
    from infinictx import load_model
    from infinictx.training.lora import add_lora
    from infinictx.training.mst import MSTConfig, causal_lm_nll

    lm = load_model(tiny_gemma_dir, device=DEVICE, dtype="float32")
    model, params = add_lora(lm.model, 4, 8, seed=0)
    for p in params:
        torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 300, (1, 120), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    plain = F.cross_entropy(model(input_ids=ids[:, :-1]).logits[0, -50:], ids[0, -50:], reduction="none")
    plain.mean().backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad()
    mst = causal_lm_nll(model, ids[:, :-1], ids[:, -50:], MSTConfig(head_chunks=4, min_chunk_tokens=1))[0]
    mst.mean().backward()
    torch.testing.assert_close(mst, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip([p.grad for p in params], expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_chinese_outputs_are_scored_in_simplified_script():
    from infinictx.tasks.translation import SentenceResult, quality

    ref = "起初，神创造天地。"
    traditional = [SentenceResult("1:1", 0, "In the beginning", ref, "起初，神創造天地。")]
    assert quality(traditional, "zh")["chrf"] == pytest.approx(100.0)
    assert quality(traditional, "en")["chrf"] < 100.0   # no conversion for other targets
