"""The n-gram index: the numpy suffix array and infini-gram agree with a brute-force scan of the corpus."""

import math

import numpy as np
import pytest

from infinictx.analysis.ngrams import SuffixArrayIndex, suffix_array, write_corpus
from infinictx.core.errors import InfinictxError


def corpus(seed=0, docs=12, vocab=6):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(1, 60)).tolist() for _ in range(docs)]


def brute_count(docs, q):
    return sum(1 for d in docs for i in range(len(d) - len(q) + 1) if d[i:i + len(q)] == q)


def brute_cooccur(docs, a, b, window):
    """infini-gram's CNF AND of two clauses (lists of alternative n-grams), written out plainly over the
    documents (positions in one flat stream with a separator before each document, as the index stores it)."""
    flat, doc_of = [], []
    for k, d in enumerate(docs):
        flat += [None] + d
        doc_of += [k] * (len(d) + 1)
    occ = lambda c: sorted(i for q in c for i in range(len(flat) - len(q) + 1) if flat[i:i + len(q)] == q)  # noqa
    pa, pb = occ(a), occ(b)
    if not pa or not pb:
        return 0
    anchor, other = (pa, pb) if len(pa) <= len(pb) else (pb, pa)
    kept = 0
    for p in anchor:
        left = [o for o in other if o < p]
        right = [o for o in other if o >= p]
        lo = left[-1] if left else None
        ro = right[0] if right else None
        lok = lo is not None and p - lo <= window
        rok = ro is not None and ro - p <= window
        same = lambda o: doc_of[o] == doc_of[p]   # noqa: E731
        if lok and rok:
            kept += same(lo) and same(ro)
        else:
            kept += (lok and same(lo)) or (rok and same(ro))
    return kept


def test_suffix_array_sorts_suffixes():
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 200):
        t = rng.integers(0, 3, n)
        expected = sorted(range(n), key=lambda i: t[i:].tolist())
        assert suffix_array(t).tolist() == expected


@pytest.fixture
def index_dir(tmp_path):
    docs = corpus()
    write_corpus(docs, tmp_path / "idx", tokenizer="test", vocab_size=6, eos_id=0)
    return docs, tmp_path / "idx"


def engines(folder):
    out = [SuffixArrayIndex(folder)]
    try:
        from infinictx.analysis.ngrams import InfiniGramIndex

        out.append(InfiniGramIndex(folder))
    except InfinictxError as e:
        if "pip install" not in str(e):
            raise
    return out


def test_counts_and_cooccurrence_equal_a_brute_force_scan(index_dir):
    docs, folder = index_dir
    found = engines(folder)
    rng = np.random.default_rng(2)
    queries = [rng.integers(0, 6, rng.integers(1, 4)).tolist() for _ in range(40)]
    for index in found:
        for q in queries:
            assert index.count(q) == brute_count(docs, q), (type(index).__name__, q)
        for a, b, c in zip(queries[:13], queries[13:26], queries[26:39]):
            for window in (1, 3, 10, 1000):
                for x, y in (([a], [b]), ([a, c], [b])):   # single n-grams, and a clause of two alternatives
                    expected = brute_cooccur(docs, x, y, window)
                    assert index.cooccur(x, y, window) == expected, (type(index).__name__, x, y)
        for q in queries[:10]:
            prompt_cnt, cont_cnt = index.prob(q[:-1], q[-1])
            assert cont_cnt == brute_count(docs, q) and (not q[:-1] or prompt_cnt == brute_count(docs, q[:-1]))
    if len(found) == 2:   # both engines, the ∞-gram estimate too
        for q in queries:
            assert found[0].infgram(q[:-1] + [5, 4, 3], q[-1]) == found[1].infgram(q[:-1] + [5, 4, 3], q[-1])


def test_bad_input(tmp_path):
    with pytest.raises(InfinictxError, match="empty"):
        write_corpus([[], []], tmp_path / "a", tokenizer="t", vocab_size=6, eos_id=0)
    with pytest.raises(InfinictxError, match="u16"):
        write_corpus([[1]], tmp_path / "b", tokenizer="t", vocab_size=70000, eos_id=0, dtype="u16")
    with pytest.raises(InfinictxError, match="outside"):
        write_corpus([[7]], tmp_path / "c", tokenizer="t", vocab_size=6, eos_id=0)
    with pytest.raises(InfinictxError, match="rewrites"):
        write_corpus([[1]], tmp_path / "my-table", tokenizer="t", vocab_size=6, eos_id=0)
    write_corpus([[1, 2]], tmp_path / "d", tokenizer="t", vocab_size=6, eos_id=0)
    with pytest.raises(InfinictxError, match="at least one token"):
        SuffixArrayIndex(tmp_path / "d").count([])
    with pytest.raises(InfinictxError, match=">= 1"):
        SuffixArrayIndex(tmp_path / "d").cooccur([[1]], [[2]], 0)


def test_pair_mining_on_a_hand_made_example():
    from infinictx.analysis.ngrams.taskgram import PairMiner

    miner = PairMiner(ns=(1, 2, 3), gamma=None, stop=frozenset({"who", "the", "of"}))
    pairs = miner.mine([("Who founded the city of Karvel?", "Queen Amalia founded Karvel.")])
    got = {(p.n, p.x.text, p.y.text) for p in pairs}
    # shared n-grams (founded, karvel) are dropped; for n <= 2 an n-gram with a stop word is dropped
    assert got == {(1, "city", "queen"), (1, "city", "amalia")} | {
        (3, x, y) for x in ("who founded the", "founded the city", "the city of", "city of karvel")
        for y in ("queen amalia founded", "amalia founded karvel")}
    y = next(p.y for p in pairs if p.y.text == "amalia founded karvel")
    assert "Queen Amalia founded Karvel."[y.start:y.end] == "Amalia founded Karvel"


def test_semantic_filter_keeps_pairs_above_gamma():
    from infinictx.analysis.ngrams.taskgram import PairMiner

    class Embedder:   # "city" points along x, "queen" too, "amalia" along y
        def encode(self, texts, **kw):
            v = {"city": [1, 0], "queen": [0.8, 0.6], "amalia": [0, 1]}
            return np.array([v[t] for t in texts], dtype=float)

    miner = PairMiner(ns=(1,), gamma=0.7, embedder=Embedder(), stop=frozenset({"who", "the", "of"}))
    pairs = miner.mine([("Who founded the city of Karvel?", "Queen Amalia founded Karvel.")])
    assert [(p.x.text, p.y.text, round(p.similarity, 3)) for p in pairs] == [("city", "queen", 0.8)]
    with pytest.raises(InfinictxError, match="gamma"):
        PairMiner(gamma=2.0)
    with pytest.raises(InfinictxError, match=">= 1"):
        PairMiner(ns=(0,))


def test_taskgram_probability_is_a_ratio_of_corpus_counts(tmp_path, tiny):
    from infinictx.analysis.ngrams.corpus import build_index
    from infinictx.analysis.ngrams.index import open_index
    from infinictx.analysis.ngrams.taskgram import TaskGramModel

    filler = " and so it went on" * 6   # keeps the other documents' n-grams out of the window
    docs = [("a", "alpha beta gamma" + filler), ("b", "Alpha gamma" + filler), ("c", "beta delta" + filler)]
    build_index(docs, tiny.tokenizer, tmp_path / "idx", engine="numpy")
    model = TaskGramModel(open_index(tmp_path / "idx", "numpy"), tiny.tokenizer, window=24)
    assert model.count(("alpha",)) == 2                      # both spellings
    assert model.prob(("alpha",), ("gamma",)) == (1.0, 2, 2)   # every alpha has a gamma in its document
    assert model.prob(("beta",), ("gamma",)) == (0.5, 2, 1)    # the second beta's document has none
    assert model.prob(("alpha",), ("delta",)) == (0.0, 2, 0)
    assert model.prob(("omega",), ("gamma",)) == (None, 0, 0)   # an x-gram the corpus never saw: no estimate


def test_correlations_on_known_rankings():
    from infinictx.analysis.ngrams.trace import correlation

    up = correlation([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert up["spearman"] == pytest.approx(1) and up["kendall_tau"] == pytest.approx(1)
    assert up["kendall_distance"] == pytest.approx(0, abs=1e-12)
    down = correlation([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert down["spearman"] == pytest.approx(-1) and down["kendall_distance"] == pytest.approx(1)
    assert correlation([1, 1, 1], [1, 2, 3])["spearman"] is None
    one_swap = correlation([1, 2, 3, 4], [1, 3, 2, 4])   # 1 of 6 pairs discordant: tau = (5 - 1) / 6
    assert one_swap["kendall_tau"] == pytest.approx(4 / 6) and one_swap["kendall_distance"] == pytest.approx(1 / 6)
    # a zero probability (log −inf) ranks lowest, a missing value (NaN) is dropped
    inf = correlation([-math.inf, -2, -1, math.nan], [0, 1, 2, 5])
    assert inf["n"] == 3 and inf["spearman"] == pytest.approx(1)


def test_index_and_trace_commands(tmp_path, tiny_model_dir):
    import json

    from conftest import SAMPLE

    from infinictx.fronts.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(SAMPLE * 3)
    (corpus / "b.txt").write_text(" ".join(reversed(SAMPLE.split())))
    assert main(["ngram-index", str(corpus), "--out", str(tmp_path / "idx"), "--model", str(tiny_model_dir),
                 "--engine", "numpy"]) == 0
    assert main(["ngram-index", str(corpus), "--out", str(tmp_path / "idx"), "--model", str(tiny_model_dir)]) == 2
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"input": f"Of Mans First Disobedience {k}", "output": SAMPLE[40:120]})
                              for k in range(3)) + "\n")
    out = tmp_path / "trace.json"
    assert main(["trace", str(task), "--index", str(tmp_path / "idx"), "--model", str(tiny_model_dir), "--engine",
                 "numpy", "--gamma", "none", "--json", str(out), "--plot", str(tmp_path / "t.png")]) == 0
    result = json.loads(out.read_text())
    assert result["pairs"] and all(r["llm_logprob"] < 0 for r in result["pairs"])
    assert any(r["c_xy"] > 0 for r in result["pairs"]) and (tmp_path / "t.png").exists()
    task.write_text('{"input": 1}\n')
    assert main(["trace", str(task), "--index", str(tmp_path / "idx"), "--model", str(tiny_model_dir)]) == 2


def test_planted_frequencies_land_as_asked():
    import re

    from infinictx.analysis.ngrams.planted import FACT_TEMPLATES, QA_TEMPLATE, build, exposure_levels

    assert exposure_levels() == [1, 3, 10, 32, 100, 316, 1000]
    books = [("a", "\n\n".join(f"Paragraph {k} of the first book." for k in range(50))),
             ("b", "\n\n".join(f"Paragraph {k} of the second book." for k in range(30)))]
    planted = build(books, facts_per_level=2, levels=[1, 5, 20], towns=3, seed=3)
    text = "\n".join(t for _, t in planted.documents)
    assert [name for name, _ in planted.documents] == ["a", "b"]
    for f in planted.facts:
        stated = sum(text.count(t.format(person=f["person"], town=f["town"])) for t in FACT_TEMPLATES)
        assert stated == f["exposures"]
        assert len(re.findall(re.escape(f["person"]), text)) == f["exposures"] + f["noise"]
    assert planted.arithmetic and all(f"{r['a']} plus {r['b']} is" not in text and r["input"] not in text
                                      for r in planted.arithmetic)
    # the tasks' own question-and-answer form is among the wordings in the corpus
    assert any(QA_TEMPLATE.format(**f) in text for f in planted.facts) and "Question: What is" in text
    assert build(books, facts_per_level=2, levels=[1, 5, 20], towns=3, seed=3).documents == planted.documents
    with pytest.raises(InfinictxError, match="non-empty"):
        build([("a", "  ")])
