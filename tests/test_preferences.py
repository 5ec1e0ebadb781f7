"""Reversal preference pairs: construction, reversal labels, held-out splits, the RPR loader's errors."""

import json

import pytest

from infinictx.core.errors import InfinictxError
from infinictx.data.preferences import (
    DIMENSIONS,
    MORE_SCENARIOS,
    TEST_DIMENSIONS,
    TOPICS,
    build_reversal_set,
    composed_by_family,
    composed_criteria,
    held_out_contexts,
    near_held_out,
    read_rpr,
    render,
)


def style_of(row, response):
    dim = DIMENSIONS[row["dimension"]]
    for style in dim[:2]:
        for prompt, facts, example in TOPICS:
            if prompt == row["prompt"] and render(prompt, facts, example, style) == response:
                return style
    raise AssertionError("unknown response")


def contexts_for(dim):
    """(criteria for style a, for style b, scenarios for a, for b): every context a row of `dim` may use."""
    sa, sb, crit_a, crit_b, scen_a, scen_b = DIMENSIONS[dim]
    if dim in TEST_DIMENSIONS:
        return crit_a, crit_b, scen_a, scen_b
    (composed_a, composed_b), (more_a, more_b) = composed_criteria(dim), MORE_SCENARIOS[dim]
    return (crit_a + list(composed_a), crit_b + list(composed_b), scen_a + more_a, scen_b + more_b)


def test_contexts_reverse_the_preference():
    data = build_reversal_set(seed=0)
    assert len(data.train) == len(TOPICS) * 2 * (len(DIMENSIONS) - len(TEST_DIMENSIONS))
    for row in data.train + data.test:
        sa, sb = DIMENSIONS[row["dimension"]][:2]
        crit_a, crit_b, scen_a, scen_b = contexts_for(row["dimension"])
        a, b = style_of(row, row["response_a"]), style_of(row, row["response_b"])
        assert {a, b} == {sa, sb} and row["response_a"] != row["response_b"]
        # the x contexts ask for response_a's style, the y contexts for response_b's
        assert row["criteria_x"] in (crit_a if a == sa else crit_b)
        assert row["criteria_y"] in (crit_b if a == sa else crit_a)
        assert row["scenario_x"] in (scen_a if a == sa else scen_b)
        assert row["scenario_y"] in (scen_b if a == sa else scen_a)
    assert {r["response_a"] == render(r["prompt"], *next((f, e) for p, f, e in TOPICS if p == r["prompt"]),
                                      DIMENSIONS[r["dimension"]][0]) for r in data.train} == {True, False}


def test_held_out_dimensions_and_phrasings():
    data = build_reversal_set(seed=0)
    assert not {r["dimension"] for r in data.train} & set(TEST_DIMENSIONS)
    assert set(TEST_DIMENSIONS) <= {r["dimension"] for r in data.test}
    seen = {r[c] for r in data.train for c in ("criteria_x", "criteria_y", "scenario_x", "scenario_y")}
    for r in data.test:
        assert not {r["criteria_x"], r["criteria_y"], r["scenario_x"], r["scenario_y"]} & seen
    # every phrasing but the held-out last one trains, in parallel lists
    for dim, (sa, sb, *phrasings) in DIMENSIONS.items():
        assert len({len(p) for p in phrasings}) == 1
        if dim not in TEST_DIMENSIONS:
            assert {s for p in phrasings for s in p[:-1]} <= seen
            # the added contexts: every hand-written scenario trains (none was too close to a held-out one), and
            # no composed or added context is a held-out one or a near paraphrase of one
            assert {s for more in MORE_SCENARIOS[dim] for s in more} <= seen
            for c in {s for more in MORE_SCENARIOS[dim] for s in more} | {c for p in composed_criteria(dim) for c in p}:
                assert not near_held_out(c), c
    assert all(r["label"] in ("a", "b") for r in data.adversarial)


def test_composed_criteria_say_what_they_ask_for():
    want_a, want_b = composed_criteria("length")   # a: concise, b: detailed
    # a negation asks for the other style: "does not want a thorough answer" asks for the concise one
    assert "The user wants a short answer." in want_a and "The user does not want a thorough answer." in want_a
    assert "The user wants a thorough answer." in want_b and "The user does not want a short answer." in want_b
    assert not set(want_a) & set(want_b)
    # criteria naming both styles ask for the one the word order and verb say, not the one named first or last
    assert "The user prefers a short answer to a thorough answer." in want_a
    assert "Instead of a short answer, the reader wants a thorough answer." in want_b
    assert "Give a thorough answer, not a short answer." in want_b and "Avoid a short answer." in want_b
    # no double negatives: a phrase that is itself a negation is never the thing refused
    assert not any("no recap" in c for c in composed_by_family("summary")["refuses"][0])
    # paraphrases of held-out phrasings are left out: two shared content words ("prefers", "detailed") with
    # "The user prefers long, detailed answers." (held out)
    assert near_held_out("The customer prefers a detailed explanation.")
    assert "The customer prefers a detailed explanation." not in want_b
    assert all(near_held_out(h) for h in held_out_contexts())
    assert not near_held_out("The user wants a thorough answer.")


def test_relevance_pairs_are_decided_by_the_prompt_not_the_context():
    data = build_reversal_set(seed=0)
    train_dims = [d for d in DIMENSIONS if d not in TEST_DIMENSIONS]
    assert len(data.relevance) == len(TOPICS) * len(train_dims)
    answers = {p: (f, e) for p, f, e in TOPICS}
    train_contexts = {r[c] for r in data.train for c in ("criteria_x", "criteria_y", "scenario_x", "scenario_y")}
    adversarial_pairs = {(r["prompt"], r["response_a"], r["response_b"]) for r in data.adversarial}
    for r in data.relevance:
        sa, sb = DIMENSIONS[r["dimension"]][:2]
        crit_a, crit_b, scen_a, scen_b = contexts_for(r["dimension"])
        asked = sa if r["criteria"] in crit_a else sb
        against = sb if asked == sa else sa
        assert r["scenario"] in (scen_a if asked == sa else scen_b)
        # the chosen answer answers the prompt in the style the context argues against ...
        assert r["chosen"] == render(r["prompt"], *answers[r["prompt"]], against)
        # ... the rejected one answers another prompt in the style the context asks for
        assert any(r["rejected"] == render(p, f, e, asked) for p, f, e in TOPICS if p != r["prompt"])
        assert {r["criteria"], r["scenario"]} <= train_contexts   # no held-out phrasing leaks into training
        assert (r["prompt"], r["chosen"], r["rejected"]) not in adversarial_pairs
    assert not {r["context"] for r in data.adversarial} & train_contexts


def test_rpr_loader(tmp_path):
    rows = build_reversal_set().train[:3]
    good = tmp_path / "rpr.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(read_rpr(good)) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({k: v for k, v in rows[0].items() if k != "scenario_y"}) + "\n")
    with pytest.raises(InfinictxError, match="scenario_y"):
        read_rpr(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({**rows[0], "criteria_x": " "}) + "\n")
    with pytest.raises(InfinictxError, match="empty criteria_x"):
        read_rpr(empty)
