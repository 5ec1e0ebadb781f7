"""A second held-out test for the context-aware reward model (issue 23), written after the benchmark's test set
had been looked at: new criteria and scenarios for each training dimension, none a training context, judged on
every topic. It checks that what changed after looking at the first test's failures (the composed comparatives
and commands of `infinictx/data/preferences.py`) generalises beyond the phrasings that suggested it. Reads the
adapter `benchmarks/carm.py` trained (cache/carm/carm-<setup>); results: results/carm_probe.{json,md}
(another `--model`: the adapter `carm.py --model M` trained, results/carm_probe_<model>.{json,md}).

  .venv/bin/python benchmarks/carm_probe.py [--threads 2] [--model gemma3-270m]"""

from __future__ import annotations

import argparse
import random

import torch
from carm import result_tag, setups, train_config
from common import save

from infinictx.core.models import cpu_name
from infinictx.data.fetch import cache_dir

# dimension: ((criteria for style a, for style b) × 2, (scenario for a, for b)); style a/b as in DIMENSIONS
PROBE = {
    "length": [("Two lines at most, please.", "Walk the user through it at length."),
               ("The user would take brevity over completeness.", "The user would take completeness over brevity."),
               ("The user is typing with one hand while holding a baby.",
                "The user is researching the topic for a long blog post.")],
    "formality": [("Keep it respectful and businesslike.", "Keep it loose and chummy."),
                  ("The user wants the reply to sound like an office memo, not a chat.",
                   "The user wants the reply to sound like a chat, not an office memo."),
                  ("The user is applying for a grant.", "The user is planning a picnic with pals.")],
    "format": [("Itemise the answer.", "No itemising: write it out."),
               ("The user wants separate points rather than a paragraph.",
                "The user wants a paragraph rather than separate points."),
               ("The user will paste the answer into a checklist app.",
                "The user will read the answer aloud at a dinner.")],
    "tone": [("Point out the risks.", "Skip the warnings."),
             ("The user would rather be careful than quick.", "The user would rather be quick than careful."),
             ("The user is about to try this on a family heirloom.",
              "The user is a veteran who wants only the steps.")],
    "warmth": [("Be kind and motivating.", "Stay neutral and businesslike."),
               ("The user wants support, not dry facts.", "The user wants dry facts, not support."),
               ("The user just failed a test and feels low.", "The text goes into an appendix of a manual.")],
    "humour": [("Make it funny.", "Keep a straight face."),
               ("The user wants jokes rather than a stern answer.", "The user wants a stern answer rather than jokes."),
               ("The answer is for a roast at a friend's party.", "The answer is for a memorial service programme.")],
    "question": [("Check back with the user at the end.", "Close without asking anything."),
                 ("The user wants a conversation rather than a final word.",
                  "The user wants a final word rather than a conversation."),
                 ("The user wants to brainstorm together.", "The reply is printed on a flyer.")],
    "emoji": [("Use a few emoji.", "Keep emoji out of it."),
              ("The user wants icons, not bare text.", "The user wants bare text, not icons."),
              ("The answer goes in a playful message to a niece.", "The answer goes in a formal tax letter.")],
    "heading": [("Open with a title.", "Start straight with the content."),
                ("The user wants a titled answer rather than bare text.",
                 "The user wants bare text rather than a titled answer."),
                ("The answer is one section of a long wiki article.", "The answer is a one-line chat reply.")],
    "bold": [("Put the main idea in bold type.", "Keep the text free of any bold."),
             ("The user wants emphasis rather than plain text.", "The user wants plain text rather than emphasis."),
             ("The text goes into a rich-text study note.", "The text goes into a plain text message.")],
    "numbering": [("Count the steps 1, 2, 3.", "Mark the points with dashes."),
                  ("The user wants numbers rather than dashes.", "The user wants dashes rather than numbers."),
                  ("The user must do the steps in a strict order.", "The tips can be taken in any order.")],
    "summary": [("Close with a one-line takeaway.", "End on the last point, with no recap."),
                ("The user wants a recap rather than an abrupt end.",
                 "The user wants an abrupt end rather than a recap."),
                ("The user reads only the last sentence of each answer.",
                 "The text must be as short as possible, no repetition.")],
}


def probe_rows(seed: int = 0) -> list[dict]:
    """Reversal rows in the RPR layout: each training dimension × topic × probe criterion pair (the scenario pair
    alongside), responses in random order, contexts matched to it."""
    from infinictx.data.preferences import DIMENSIONS, TOPICS, render

    rng = random.Random(seed)
    rows = []
    for dim, (crit1, crit2, scen) in PROBE.items():
        sa, sb = DIMENSIONS[dim][:2]
        for prompt, facts, example in TOPICS:
            a, b = render(prompt, facts, example, sa), render(prompt, facts, example, sb)
            for form, (ca, cb) in zip(("one style named", "both named"), (crit1, crit2)):
                swap = rng.random() < 0.5
                rows.append({"prompt": prompt, "response_a": b if swap else a, "response_b": a if swap else b,
                             "criteria_x": cb if swap else ca, "criteria_y": ca if swap else cb,
                             "scenario_x": scen[1] if swap else scen[0], "scenario_y": scen[0] if swap else scen[1],
                             "dimension": dim, "form": form})
    return rows


def main():
    from infinictx.core.models import resolve_model_path
    from infinictx.data.preferences import build_reversal_set
    from infinictx.reward.carm import evaluate, load_reward_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", help="the causal LM under the CARM (default: the embedded SmolLM2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = build_reversal_set(seed=0)
    seen = {r[c] for r in data.train for c in ("criteria_x", "criteria_y", "scenario_x", "scenario_y")}
    rows = probe_rows()
    overlap = {r[c] for r in rows for c in ("criteria_x", "criteria_y", "scenario_x", "scenario_y")} & seen
    if overlap:
        raise SystemExit(f"probe contexts also train: {sorted(overlap)[:3]}")

    setup = setups(data, train_config())[1]["carm"]
    model_dir, model_name = resolve_model_path(args.model)
    tag = result_tag(model_name)
    adapter = cache_dir() / tag / f"carm-{setup}"
    if not (adapter / "adapter_config.json").exists():
        flag = f" --model {args.model}" if tag != "carm" else ""
        raise SystemExit(f"no trained CARM at {adapter}: run benchmarks/carm.py --models carm{flag} first")
    model, tok = load_reward_model(model_dir, adapter)
    scores = evaluate(model, tok, rows, group_by=("dimension", "form"))
    out = {"model": model_name, "adapter_setup": setup, "pairs": len(rows), "cpu": cpu_name(), **scores}
    crit, scen = scores["criteria"], scores["scenario"]
    lines = [f"# CARM ({model_name}) on a second held-out test (new phrasings of the training dimensions)", "",
             f"{len(rows)} pairs: two criteria pairs and one scenario pair per training dimension, on every topic; "
             "accuracy under each pair's two contexts.", "",
             f"Criteria {crit['accuracy']:.3f} (reversal {crit['reversal_consistency']:.3f}); "
             f"scenarios {scen['accuracy']:.3f} (reversal {scen['reversal_consistency']:.3f}).",
             "", "Criteria by form: " + ", ".join(f"{form} {v['accuracy']:.3f}" for form, v in crit["by_form"].items())
             + " (both named: \"X rather than Y\", the form of the composed comparatives in training, with other "
             "phrases).",
             "", "| dimension | criteria | scenario |", "|---|---|---|"]
    for dim in PROBE:
        lines.append(f"| {dim} | {crit['by_dimension'][dim]['accuracy']:.3f} | "
                     f"{scen['by_dimension'][dim]['accuracy']:.3f} |")
    save(tag.replace("carm", "carm_probe", 1), out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
