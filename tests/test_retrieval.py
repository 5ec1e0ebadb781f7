"""Retrieval prompts: exact token lengths, the needle where the depth says, answers parsed strictly."""

import random


from infinictx.tasks.retrieval import answer_of, kv_trial, parse_lengths, passkey_trial


def test_parse_lengths():
    assert parse_lengths("1k, 2k,4096,0.5k") == [1024, 2048, 4096, 512]


def test_passkey_prompt_has_exact_length_and_needle_at_depth(tiny):
    tok = tiny.tokenizer
    where = []
    for depth in (0.0, 0.5, 1.0):
        trial = passkey_trial(tok, 1500, depth, random.Random(0))
        assert len(trial.ids) == 1500
        text = tok.decode(trial.ids.tolist())
        needle = f"The pass key is {trial.answer}. Remember it. {trial.answer} is the pass key."
        assert text.count(needle) == 1 and text.endswith("What is the pass key? The pass key is")
        where.append(text.index(needle) / len(text))
    assert where[0] < 0.2 and 0.4 < where[1] < 0.65 and where[2] > 0.85


def test_kv_prompt_asks_for_a_value_that_is_in_it(tiny):
    tok = tiny.tokenizer
    trial = kv_trial(tok, 600, 0.3, random.Random(1))
    text = tok.decode(trial.ids.tolist())
    assert len(trial.ids) <= 600
    key = text.rsplit("What is the value of key ", 1)[1].split("?")[0]
    assert f"key {key}: value {trial.answer}.\n" in text


def test_answer_parsing():
    assert answer_of(" 12345. Remember") == "12345"
    assert answer_of(" the key is 123 45") == "123"
    assert answer_of(" none") == ""


def test_shared_prefix_forks_give_the_same_answers_as_fresh_sessions(tiny):
    from dataclasses import replace

    from infinictx import MemoryConfig
    from infinictx.tasks.retrieval import run_retrieval

    cfg = MemoryConfig(window=64, chunk=32, mem_layers=[1], lookup="topk", topk=8)

    class NoFork:  # the same session declaring no `fork`: every trial reads its whole prompt
        def __init__(self):
            self.s = cfg.make_session(tiny)
            self.capabilities = replace(self.s.capabilities, fork=False)

        def __getattr__(self, name):
            if name == "fork":
                raise AttributeError(name)
            return getattr(self.s, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.s.close()

    forked = run_retrieval(lambda: cfg.make_session(tiny), tiny.tokenizer, "passkey", [400], 4, progress=False)
    fresh = run_retrieval(NoFork, tiny.tokenizer, "passkey", [400], 4, progress=False)
    assert [r["output"] for r in forked.results[0]["per_trial"]] == [r["output"] for r in fresh.results[0]["per_trial"]]
    assert forked.results[0]["kv_bytes"] == fresh.results[0]["kv_bytes"] > 0
