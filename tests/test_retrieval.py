"""Retrieval prompts: exact token lengths, the needle where the depth says, answers parsed strictly."""

import random

import pytest
import torch

from infinictx.tasks.report import wilson_interval
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
        assert tok.decode(trial.ids[trial.needle.start:trial.needle.stop].tolist()).strip() == needle
        assert tok.decode(trial.ids[trial.answer_start:].tolist()) == " The pass key is"
        where.append(text.index(needle) / len(text))
    assert where[0] < 0.2 and 0.4 < where[1] < 0.65 and where[2] > 0.85


def test_kv_prompt_asks_for_a_value_that_is_in_it(tiny):
    tok = tiny.tokenizer
    trial = kv_trial(tok, 600, 0.3, random.Random(1))
    text = tok.decode(trial.ids.tolist())
    assert len(trial.ids) <= 600
    key = text.rsplit("What is the value of key ", 1)[1].split("?")[0]
    assert f"key {key}: value {trial.answer}.\n" in text
    assert tok.decode(trial.ids[trial.needle.start:trial.needle.stop].tolist()) == f"key {key}: value {trial.answer}.\n"
    assert tok.decode(trial.ids[trial.answer_start:].tolist()) == f" The value of key {key} is"


def test_misses_say_where_the_needle_sat():
    from infinictx.tasks.report import accuracy_markdown

    rows = [{"depth": 0.0, "needle_at": 40, "ok": True, "answer": "11111", "output": "11111."},
            {"depth": 1.0, "needle_at": 1300, "ok": False, "answer": "22222", "output": "is the\npass key"}]
    summary = {"task": "passkey", "method": "memory", "config": {"window": 1024, "chunk": 512},
               "results": [{"length": 2048, "accuracy": 0.5, "trials": 2, "correct": 1, "per_trial": rows,
                            "s_per_trial": 1.0, "kv_bytes_full": 2**20}]}
    md = accuracy_markdown(summary)
    assert "- 2K, depth 1.00, token 1,300 (276 into a 512-token chunk): expected 22222, got “is the⏎pass key”" in md
    assert "11111" not in md


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


def test_memory_trace_reruns_the_trials_and_says_which_layers_hold_the_needle(tiny_model_dir, tmp_path, monkeypatch):
    import json
    import sys
    from pathlib import Path

    from infinictx.fronts.cli import main

    result = tmp_path / "pk.json"
    assert main(["passkey", "--model", str(tiny_model_dir), "--method", "memory", "-W", "200", "--lookup", "topk",
                 "--topk", "4", "--lengths", "500", "--trials", "3", "--no-progress", "--json", str(result)]) == 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import common
    import retrieval_trace

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    retrieval_trace.main(["--json", str(result), "--trials", "all", "--model", str(tiny_model_dir)])
    trace = json.loads((tmp_path / "pk_trace.json").read_text())
    source = json.loads(result.read_text())
    rows = source["results"][0]["per_trial"]
    # the rerun reads each prompt exactly as the run did: the same answers
    assert [(t["output"], t["ok"]) for t in trace["trials"]] == [(r["output"], r["ok"]) for r in rows]
    assert [t["needle_at"] for t in trace["trials"]] == [r["needle_at"] for r in rows]
    for t in trace["trials"]:
        assert [r["layer"] for r in t["layers"]] == source["config"]["mem_layers"]
        for r in t["layers"]:
            assert 0 <= r["heads_with_needle"] <= r["heads"] == 4 and 0.0 <= r["max_mass"] <= 1.0
    first, last = trace["trials"][0]["layers"][0], trace["trials"][-1]["layers"][0]
    assert first["needle_in_memory"] > 0 and first["best_rank"] is not None   # depth 0: long gone to memory
    assert last["needle_in_memory"] == 0 and last["best_rank"] is None        # depth 1: still in the window
    assert "| layer |" in (tmp_path / "pk_trace.md").read_text()


@pytest.mark.parametrize("task", ["niah", "multikey", "multivalue", "vartrack"])
def test_planted_facts_sit_at_the_depth_and_a_perfect_reader_finds_them(tiny, task):
    """Exact length, the asked fact where the depth says (at a line start of the book), the same prompt for the
    same seed, and the answer recoverable from the prompt: a reader that follows the facts scores 100%."""
    import re

    from infinictx.tasks.retrieval import TRIAL_BUILDERS, score_output

    tok = tiny.tokenizer
    build = TRIAL_BUILDERS[task]
    for depth in (0.0, 0.5, 1.0):
        trial = build(tok, 3000, depth, random.Random(f"{task}{depth}"))
        assert len(trial.ids) == 3000
        assert torch.equal(trial.ids, build(tok, 3000, depth, random.Random(f"{task}{depth}")).ids)
        assert abs(trial.needle_at / trial.question_start - depth) < 0.1
        text = tok.decode(trial.ids.tolist())
        doc, question = tok.decode(trial.ids[:trial.question_start].tolist()), tok.decode(
            trial.ids[trial.question_start:].tolist())
        needle = tok.decode(trial.ids[trial.needle.start:trial.needle.stop].tolist())
        assert needle.endswith("\n") and text.count(needle) == 1
        if task == "vartrack":   # follow the chain from the asked value
            value = re.search(r"assigned the value (\d+)", question).group(1)
            held, found = {value}, []
            for name, src in re.findall(r"VAR (\w+) = (\w+)", doc):
                if src in held:
                    held.add(name)
                    found.append(name)
            answer = ", ".join(found)
            assert score_output(trial, answer + ", " + trial.wrong[0])[2] is False   # a decoy makes it wrong
        else:
            key = re.search(r"numbers? for (\S+) mentioned", question).group(1)
            values = re.findall(rf"special magic number for {key} is (\d+)\.", doc)
            answer = ", ".join(values)
            assert len(values) == (4 if task == "multivalue" else 1)
            if task == "multikey":
                assert len(re.findall(r"special magic number for \S+ is \d+\.", doc)) == 4
        # the answer's given beginning follows the asking part (a chat-format reader splits them there)
        asking = tok.decode(trial.ids[trial.question_start:trial.answer_start].tolist())
        beginning = tok.decode(trial.ids[trial.answer_start:].tolist())
        assert asking.rstrip().endswith("?" if task != "vartrack" else "above.")
        assert beginning.startswith(" The special magic number" if task != "vartrack" else " Answer: According")
        hits, items, ok = score_output(trial, " " + answer + ".")
        assert ok and hits == items == (len(trial.answers) if trial.answers else 1)
        assert score_output(trial, " 1234.")[2] is False


def test_item_scored_rows_report_items_and_their_interval():
    from infinictx.tasks.report import accuracy_markdown
    from infinictx.tasks.retrieval import length_row

    rows = [{"depth": 0.0, "needle_at": 5, "ok": True, "answer": "a b", "output": "a b", "hits": 2, "items": 2},
            {"depth": 1.0, "needle_at": 9, "ok": False, "answer": "c d", "output": "c", "hits": 1, "items": 2}]
    row = length_row(100, rows, 100, 1, 1.0)
    assert (row["correct"], row["items"], row["trials_right"], row["accuracy"]) == (3, 4, 1, 0.75)
    assert row["ci95"] == [round(x, 4) for x in wilson_interval(3, 4)]
    md = accuracy_markdown({"task": "multivalue", "method": "rag", "config": {}, "results": [row]})
    assert "3 / 4 items, 1 / 2 trials all right" in md
