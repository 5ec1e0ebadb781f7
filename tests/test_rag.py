"""RAG: chunks cover the text with the exact overlap, prompts keep the budget and the document order, the
retrievers find a planted fact, the question is answered from retrieved text, the index survives a resumed
run, and bad settings get one-line errors."""

import random

import pytest
import torch

from infinictx import InfinictxError, Sampler, make_spec, method_config
from infinictx.methods.rag.chunks import choose, chunk_spans
from infinictx.methods.rag.retrievers import BM25Retriever, DenseRetriever, HybridRetriever
from infinictx.tasks.retrieval import ask

FILLER = ["The river ran past the old mill and the fields of barley under a grey sky.",
          "Children played by the church wall while their mothers talked of the harvest.",
          "A cart of apples went slowly up the hill towards the market square.",
          "In the evening the bells rang and the shepherds brought the flocks home.",
          "The baker rose before dawn to light the ovens and knead the bread."]
FACT = "The lighthouse keeper's cat is called Marmalade and sleeps on the lamp."
QUESTION = "What is the lighthouse keeper's cat called?"


def texts_with_fact(n: int, at: int) -> list[str]:
    return [FACT if i == at else " ".join(FILLER[(i + j) % len(FILLER)] for j in range(2)) for i in range(n)]


@pytest.mark.parametrize("n, size, overlap", [(1, 4, 0), (10, 4, 1), (100, 7, 3), (128, 128, 0), (129, 128, 127),
                                              (1000, 64, 16)])
def test_chunks_cover_every_token_with_the_exact_overlap(n, size, overlap):
    spans = chunk_spans(n, size, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(b - a == size for a, b in spans[:-1]) and 0 < spans[-1][1] - spans[-1][0] <= size
    for (a, b), (c, _) in zip(spans, spans[1:]):
        assert c == a + size - overlap and b - c == overlap
    assert set().union(*(range(a, b) for a, b in spans)) == set(range(n))
    assert chunk_spans(0, size, overlap) == []
    with pytest.raises(InfinictxError, match="overlap"):
        chunk_spans(n, size, size)


def test_prompts_keep_the_budget_the_top_k_and_the_document_order():
    spans = chunk_spans(1000, 50, 10)
    rng = random.Random(0)
    for _ in range(300):
        ranked = rng.sample(range(len(spans)), len(spans))
        budget, k = rng.randint(1, 400), rng.choice([None, 1, 3, 8])
        order = rng.choice(["document", "score", "best-last"])
        shown = choose(ranked, spans, budget, k, order, separator=2)
        assert sum(b - a + 2 for a, b in shown) <= budget
        if order == "document":   # sorted, and overlapping or touching chunks joined into one passage
            assert all(b < c for (_, b), (c, _) in zip(shown, shown[1:]))
        else:                     # best first, as ranked (or best last, next to the question)
            as_ranked = [spans[c] for c in ranked if spans[c] in shown]
            assert shown == (as_ranked if order == "score" else as_ranked[::-1])
            assert k is None or len(shown) <= k
        best = spans[ranked[0]]
        if budget >= 52:          # the best chunk fits, so it is shown
            assert any(a <= best[0] and best[1] <= b for a, b in shown)
    # a chunk that does not fit is skipped and the next one tried
    assert choose([0, 1], [(0, 30), (30, 35)], budget=10, top_k=None, order="score", separator=1) == [(30, 35)]


def test_bm25_ranks_the_chunk_with_the_planted_fact_first():
    r = BM25Retriever()
    r.sync(texts_with_fact(40, 23))
    assert r.rank(QUESTION, 3)[0] == 23
    assert 23 not in r.rank(QUESTION, 3, limit=20)         # only chunks before the limit
    r.sync(texts_with_fact(40, 23)[:10] + ["", "!!"])      # chunks without a word do not break it
    assert len(r.rank("nothing in common", 5)) == 5
    empty = BM25Retriever()
    empty.sync(["", "..."])
    assert empty.rank(QUESTION, 2) == [0, 1]


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["dense", "hnsw", "hybrid"])
def test_dense_and_hybrid_rank_the_planted_fact_first(kind):
    texts = texts_with_fact(60, 41)
    r = (HybridRetriever(None, "cpu", 50_000) if kind == "hybrid"
         else DenseRetriever(None, "cpu", ann_min=10 if kind == "hnsw" else 50_000))
    r.sync(texts)
    assert r.rank(QUESTION, 3)[0] == 41
    if kind == "dense":   # a chunk longer than the embedder's limit is embedded in pieces, scored by its best
        long = " ".join(FILLER * 12) + " " + FACT
        r.sync(texts[:5] + [long])
        assert int((r.piece_chunk == 5).sum()) > 1 and r.rank(QUESTION, 1) == [5]


@pytest.mark.integration
def test_the_dense_index_survives_a_resumed_run(tiny):
    cfg = method_config("rag", window=128, chunk=32, chunk_tokens=16, retriever="dense", prompt_format="plain")
    doc = tiny.tokenizer(" ".join(texts_with_fact(30, 17)), return_tensors="pt").input_ids[0]
    with cfg.make_session(tiny) as s:
        s.absorb(doc)
        state, history = s.state_dict(), s.history.clone()
        ranked = s.retriever.rank(QUESTION, 5)
    with cfg.make_session(tiny) as s:
        s.load_state_dict(state, history)
        calls = []
        real = s.retriever._embed
        s.retriever._embed = lambda texts: calls.append(len(texts)) or real(texts)
        s._sync(s._spans(complete_only=True))
        assert s.retriever.rank(QUESTION, 5) == ranked
        assert calls == [1]   # only the query was embedded: the chunks came back with the state


def document(tok, n_sentences: int, fact_at: int) -> torch.Tensor:
    text = " ".join(FACT if i == fact_at else FILLER[i % len(FILLER)] for i in range(n_sentences))
    return tok(text, return_tensors="pt").input_ids[0]


def test_a_question_is_answered_from_the_retrieved_chunk(tiny):
    tok = tiny.tokenizer
    doc = document(tok, 40, 25)
    question = tok(" " + QUESTION, return_tensors="pt").input_ids[0]
    prompt = torch.cat([doc, question])
    cfg = method_config("rag", window=256, chunk=64, chunk_tokens=32, retriever="bm25", prompt_format="plain")
    with cfg.make_session(tiny) as s:
        assert s.capabilities.question
        ask(s, prompt, n_tokens=4, question_at=len(doc))
        seen = s.last_retrieval
        assert torch.equal(s.history, doc)   # the question is the query, not part of the document
        shown = "".join(tok.decode(doc[a:b].tolist()) for a, b in seen["passages"])
        assert "Marmalade" in shown
        total = sum(b - a + len(s.separator) for a, b in seen["passages"])
        assert total <= seen["budget"] == 256 - len(question) - 4
        # the prompt the model answers from: retrieved passages, then the question, within the window
        s.question(question)
        asked = s._question_prompt(4)
        assert tok.decode(asked.tolist()).endswith(QUESTION) and len(asked) <= 256 - 4
        # a forked session shares the index and answers alike
        other = s.fork()
        other.question(question)
        other._question_prompt(4)
        assert other.last_retrieval["passages"] == seen["passages"]


def test_chatqa_prompt_opens_the_assistant_turn_with_the_answer_beginning(tiny):
    """A question with a given answer beginning ("... called? The cat is called"): in ChatQA's format the asking
    part is the user's turn and the query, the beginning opens the assistant's turn (a chat model answers instead
    of restating the question); in the plain format the question stays whole."""
    tok = tiny.tokenizer
    doc = document(tok, 40, 25)
    asking = tok(" " + QUESTION, return_tensors="pt").input_ids[0]
    beginning = tok(" The cat is called", return_tensors="pt").input_ids[0]
    question = torch.cat([asking, beginning])
    for fmt in ("chatqa", "plain"):
        cfg = method_config("rag", window=512, chunk=64, chunk_tokens=32, retriever="bm25", prompt_format=fmt)
        with cfg.make_session(tiny) as s:
            s.absorb(doc)
            s.question(question, answer_at=len(asking))
            text = tok.decode(s._question_prompt(4).tolist())
            assert s.last_retrieval["query"] == QUESTION
            if fmt == "chatqa":
                assert text.endswith(f"User: {QUESTION}\n\nAssistant: The cat is called")
            else:
                assert text.endswith(f"{QUESTION} The cat is called") and "Assistant" not in text
            with pytest.raises(InfinictxError, match="inside the question"):
                s.question(question, answer_at=len(question))


def test_rag_refuses_bad_settings_in_one_line(tiny):
    for bad, message in [({"top_k": 0}, "top-k must be >= 1"), ({"window": 256, "chunk_tokens": 300}, "does not fit"),
                         ({"overlap": 128}, "overlap"), ({"budget": 2048}, "budget"),
                         ({"retriever": "grep"}, "unknown retriever")]:
        with pytest.raises(InfinictxError, match=message):
            make_spec("passkey", "rag", bad)
    assert method_config("rag", chunk_tokens=128).overlap == 32   # default O = C/4
    assert method_config("rag", chunk_tokens=128, overlap=0).overlap == 0
    cfg = method_config("rag", window=64, chunk=16, chunk_tokens=8, retriever="bm25", budget=40)
    with cfg.make_session(tiny) as s:
        s.question(torch.arange(10, 20))
        with pytest.raises(InfinictxError, match="no document"):
            s.generate_chunk(4, 0, Sampler())
        s.absorb(torch.arange(30, 130))
        s.question(torch.arange(10, 40))                     # a question that leaves less than the budget
        with pytest.raises(InfinictxError, match="budget .* does not fit"):
            s.generate_chunk(4, 0, Sampler())
        s.question(torch.arange(10, 70))                     # longer than the window itself
        with pytest.raises(InfinictxError, match="no room"):
            s.generate_chunk(4, 0, Sampler())


def test_the_harness_records_whether_the_evidence_was_retrieved(tiny):
    """On a fact planted in the book, BM25 puts it in every prompt (the model may still answer wrong: the tiny one
    is random); the recall, per needle for several, and the index bytes are in the results."""
    from infinictx.tasks.retrieval import run_retrieval

    # chunks of 96 tokens overlapping by 48: every needle (< 48 tiny tokens) lies whole inside one of them
    cfg = method_config("rag", window=512, chunk=64, chunk_tokens=96, overlap=48, retriever="bm25",
                        prompt_format="plain")
    for task in ("niah", "multivalue"):
        res = run_retrieval(lambda: cfg.make_session(tiny), tiny.tokenizer, task, [2500], trials=3, progress=False)
        row = res.results[0]
        shown = [r["evidence_shown"] for r in row["per_trial"]]
        assert row["kv_bytes"] > 0 and row["evidence_shown"] == pytest.approx(sum(shown) / 3, abs=1e-4)
        if task == "niah":
            assert shown == [1.0, 1.0, 1.0]
        else:   # four values, each a quarter of the evidence
            assert all(x in (0.25, 0.5, 0.75, 1.0) for x in shown)
