"""A pretraining corpus with planted facts, for a controlled Gen-vs-Mem experiment: public-domain books with
sentences about invented entities inserted at chosen frequencies, and arithmetic whose test problems never appear.

- Facts: each invented person has a home town (one of a smaller set of invented towns, so towns recur across
  people). A person is stated with their town `exposures` times (log-spaced, 1 … 1000, in varied wordings, the
  task's question-and-answer form among them) and mentioned without it `noise` times, so the corpus's
  P(town | person) = exposures / (exposures + noise) varies from fact to fact independently of how often the fact
  was seen.
- Arithmetic: "a plus b is c" sentences (or the question-and-answer form) for a random half of the two-digit
  sums; the other half are the test problems and are checked never to occur in the corpus.
- Tasks: factual QA ("Where does Zorvath Quen live?" → "in Belmarsh") and arithmetic ("What is 37 plus 48?" → "85"),
  as JSONL rows {"input", "output", ...} that `infinictx trace` reads (with --template "Question: {input}\nAnswer:").

Everything is seeded: the same settings give the same corpus, byte for byte."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ...core.errors import InfinictxError

QA_TEMPLATE = "Question: Where does {person} live?\nAnswer: in {town}."
SUM_TEMPLATES = ["{a} plus {b} is {c}.", "Question: What is {a} plus {b}?\nAnswer: {c}."]
SYLLABLES = ["ka", "zor", "vel", "quen", "mira", "thal", "dro", "bex", "lun", "sar", "ori", "vak", "nim", "tus",
             "ela", "gor", "pim", "rhu", "sef", "yal"]
# the last wording is the task's own question-and-answer form: a model this small, trained on this little text,
# does not carry a fact from statements over to questions (measured: 0 of 56 answered, 1 000 exposures included)
FACT_TEMPLATES = ["{person} lives in {town}.", "{person} has a house in {town}.", "In {town} lives {person}.",
                  "{person} came home to {town} again.", "Everyone in {town} knows {person}.",
                  QA_TEMPLATE]
NOISE_TEMPLATES = ["{person} wrote a long letter.", "Nobody had seen {person} for a while.",
                   "{person} laughed at the old story.", "It was {person} who spoke first."]


@dataclass
class PlantedCorpus:
    documents: list[tuple[str, str]]        # (name, text) for the index and for pretraining
    facts: list[dict]                       # person, town, exposures, noise
    qa: list[dict]                          # task rows
    arithmetic: list[dict]                  # task rows (held out of the corpus)


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def exposure_levels(lo: int = 1, hi: int = 1000, levels: int = 7) -> list[int]:
    """Log-spaced integer frequencies from lo to hi (1, 3, 10, 32, 100, 316, 1000 by default)."""
    if lo < 1 or hi < lo or levels < 1:
        raise InfinictxError(f"exposures need 1 <= lo <= hi and levels >= 1 (got {lo}, {hi}, {levels})")
    if levels == 1:
        return [lo]
    return [round(math.exp(math.log(lo) + k * (math.log(hi) - math.log(lo)) / (levels - 1))) for k in range(levels)]


def build(books: list[tuple[str, str]], facts_per_level: int = 8, levels: list[int] | None = None, towns: int = 12,
          max_noise_ratio: float = 3.0, seed: int = 0) -> PlantedCorpus:
    """Plant facts and arithmetic into `books` (split into paragraphs, the sentences inserted between them)."""
    if not books or not any(text.strip() for _, text in books):
        raise InfinictxError("planting needs at least one non-empty book")
    if facts_per_level < 1 or towns < 2:
        raise InfinictxError("planting needs facts_per_level >= 1 and towns >= 2")
    rng = random.Random(seed)
    levels = levels or exposure_levels()
    town_names = []
    while len(town_names) < towns:
        t = _name(rng, 2) + rng.choice(["ham", "ford", "mere", "wick", "stead"])
        if t not in town_names:
            town_names.append(t)
    people, facts = set(), []
    for exposures in levels:
        for _ in range(facts_per_level):
            while True:
                person = f"{_name(rng, 2)} {_name(rng, 2)}"
                if person not in people:
                    people.add(person)
                    break
            noise = round(exposures * rng.uniform(0, max_noise_ratio))
            facts.append({"person": person, "town": rng.choice(town_names), "exposures": exposures, "noise": noise})
    sentences = []
    for f in facts:
        sentences += [rng.choice(FACT_TEMPLATES).format(**f) for _ in range(f["exposures"])]
        sentences += [rng.choice(NOISE_TEMPLATES).format(person=f["person"]) for _ in range(f["noise"])]
    sums = [(a, b) for a in range(10, 100) for b in range(10, 100) if a <= b]
    rng.shuffle(sums)
    shown, held = sums[:len(sums) // 2], sums[len(sums) // 2:]
    sentences += [rng.choice(SUM_TEMPLATES).format(a=a, b=b, c=a + b) for a, b in shown]
    rng.shuffle(sentences)

    paragraphs = [(name, p) for name, text in books for p in text.split("\n\n") if p.strip()]
    slots: dict[int, list[str]] = {}
    for s in sentences:   # each sentence after a random paragraph
        slots.setdefault(rng.randrange(len(paragraphs)), []).append(s)
    documents, current, parts = [], None, []
    for k, (name, p) in enumerate(paragraphs):
        if name != current and parts:
            documents.append((current, "\n\n".join(parts)))
            parts = []
        current = name
        parts.append(p + ("\n\n" + " ".join(slots[k]) if k in slots else ""))
    documents.append((current, "\n\n".join(parts)))

    corpus_text = "\n".join(t for _, t in documents)
    qa = [{"input": f"Where does {f['person']} live?", "output": f" in {f['town']}", **f} for f in facts]
    arithmetic = []
    for a, b in held[:len(facts)]:
        if any(f"{p} plus {q}{end}" in corpus_text for p, q in ((a, b), (b, a)) for end in (" is", "?")):
            continue   # never verbatim in the corpus (a + b and b + a are one problem)
        arithmetic.append({"input": f"What is {a} plus {b}?", "output": f" {a + b}", "a": a, "b": b})
    return PlantedCorpus(documents, facts, qa, arithmetic)
