"""A multi-source instruction pool built offline, for data-selection experiments (TAGCOS): short examples from task
families of different sizes, with near-duplicates and some wrong answers, and a clean held-out test set per family.

Families (pool share by default; the make-up is returned with the pool):
  arithmetic   "What is 37 + 48?" → "85" (sums, differences, small products)          35%
  cloze        a line of Shakespeare or Milton with one word blanked → the word       25%
  strings      reverse / upper-case / count the letters of a word (words from the texts) 12%
  lists        sort, maximum, last element of a few numbers                          10%
  lookup       "a=3; b=7; c=1. What is b?" → "7"                                         8%
  dates        "Which day comes 3 days after Monday?" → "Thursday"                      6%
  translation  a Bible verse, Chinese (CUV) → English (KJV) (when the Bible is at hand)  4%
Near-duplicates: a share of examples repeated with small changes (spacing, punctuation, casing of the prompt).
Noise: a share of the pool gets a wrong answer (another example's answer of the same family). Test sets never
share a prompt with the pool.

Every example is {"id", "family", "prompt", "answer", "noisy", "duplicate_of"}; a model is trained on
`format_prompt(prompt) + answer` with the loss on the answer, and evaluated by exact match of its greedy answer."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..core.errors import InfinictxError

SHARES = {"arithmetic": 0.35, "cloze": 0.25, "strings": 0.12, "lists": 0.10, "lookup": 0.08, "dates": 0.06,
          "translation": 0.04}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["garden", "river", "candle", "window", "silver", "marble", "forest", "pepper", "castle", "thunder",
         "lantern", "harbor", "meadow", "violet", "copper", "falcon", "anchor", "velvet", "orchard", "ember"]


def format_prompt(prompt: str) -> str:
    return f"### Instruction:\n{prompt}\n### Response:\n"


def _arithmetic(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"]) if max(a, b) < 13 else rng.choice(["+", "-"])
    return f"What is {a} {op} {b}?", str(eval(f"{a}{op}{b}"))   # noqa: S307 (our own two integers)


def _strings_source(texts: list[str] | None):
    """Reverse / capitalise / count the letters of a word: the list above, plus the texts' lower-case words of 5-9
    letters (3 questions × 20 words alone would leave the pool nothing once the test set has taken its share)."""
    words = sorted(set(WORDS) | {w for t in texts or [] for w in re.findall(r"\b[a-z]{5,9}\b", t)})

    def make(rng):
        w = rng.choice(words)
        kind = rng.randrange(3)
        if kind == 0:
            return f"Reverse the word '{w}'.", w[::-1]
        if kind == 1:
            return f"Write '{w}' in capital letters.", w.upper()
        return f"How many letters are in the word '{w}'?", str(len(w))
    return make


def _lists(rng):
    xs = [rng.randint(0, 50) for _ in range(rng.randint(3, 6))]
    shown = " ".join(map(str, xs))
    kind = rng.randrange(3)
    if kind == 0:
        return f"Sort these numbers from smallest to largest: {shown}", " ".join(map(str, sorted(xs)))
    if kind == 1:
        return f"What is the largest of: {shown}?", str(max(xs))
    return f"What is the last number in: {shown}?", str(xs[-1])


def _lookup(rng):
    keys = rng.sample("abcdefghjkmnpqrstuvwxyz", rng.randint(3, 6))
    vals = {k: rng.randint(0, 99) for k in keys}
    k = rng.choice(keys)
    return "; ".join(f"{key}={v}" for key, v in vals.items()) + f". What is {k}?", str(vals[k])


def _dates(rng):
    d, n = rng.randrange(7), rng.randint(1, 12)
    if rng.random() < 0.5:
        return f"Which day comes {n} days after {DAYS[d]}?", DAYS[(d + n) % 7]
    return f"Which day was it {n} days before {DAYS[d]}?", DAYS[(d - n) % 7]


def _cloze_source(texts: list[str]):
    lines = [ln.strip() for t in texts for ln in t.splitlines()
             if 30 <= len(ln.strip()) <= 90 and len(ln.split()) >= 6]
    if not lines:
        raise InfinictxError("the cloze family needs lines of 30-90 characters in the given texts")

    def make(rng):
        line = rng.choice(lines)
        words = line.split()
        cands = [i for i, w in enumerate(words) if re.fullmatch(r"[A-Za-z]{4,}", w)]
        if not cands:
            return make(rng)
        i = rng.choice(cands)
        return f"Fill in the blank: {' '.join(words[:i] + ['____'] + words[i + 1:])}", words[i]
    return make


def _translation_source(pairs: list[tuple[str, str]]):
    pairs = [(zh, en) for zh, en in pairs if len(en) <= 120]

    def make(rng):
        zh, en = rng.choice(pairs)
        return f"Translate into English: {zh}", en
    return make


@dataclass
class Pool:
    train: list[dict]
    test: dict[str, list[dict]]
    makeup: dict


def _near_duplicate(prompt: str, rng) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return prompt.replace(" ", "  ", 1)
    if kind == 1:
        return prompt.rstrip("?.") + ("?" if prompt.endswith(".") else ".")
    return prompt[:1].lower() + prompt[1:] if prompt[:1].isupper() else prompt[:1].upper() + prompt[1:]


def build_pool(size: int = 3000, test_per_family: int = 100, texts: list[str] | None = None,
               bible: list[tuple[str, str]] | None = None, shares: dict | None = None, duplicate_rate: float = 0.1,
               noise_rate: float = 0.05, seed: int = 0) -> Pool:
    """The pool and the test sets. `texts` feed the cloze family and `bible` [(zh, en)] the translation family;
    a family without its source is left out (its share goes to the others)."""
    if size < 10 or test_per_family < 1:
        raise InfinictxError("the pool needs size >= 10 and test_per_family >= 1")
    if not (0 <= duplicate_rate < 1 and 0 <= noise_rate < 1):
        raise InfinictxError("duplicate_rate and noise_rate must be in [0, 1)")
    rng = random.Random(seed)
    makers = {"arithmetic": _arithmetic, "strings": _strings_source(texts), "lists": _lists, "lookup": _lookup,
              "dates": _dates}
    if texts:
        makers["cloze"] = _cloze_source(texts)
    if bible:
        makers["translation"] = _translation_source(bible)
    shares = {f: s for f, s in (shares or SHARES).items() if f in makers}
    total = sum(shares.values())
    # test sets first: their prompts are kept out of the pool
    test, taken = {}, set()
    for fam in shares:
        rows, tries = [], 0
        while len(rows) < test_per_family and tries < 50 * test_per_family:
            tries += 1
            p, a = makers[fam](rng)
            if p not in taken:
                taken.add(p)
                rows.append({"family": fam, "prompt": p, "answer": a})
        test[fam] = rows
    unique = round(size * (1 - duplicate_rate))
    counts = {f: round(unique * s / total) for f, s in shares.items()}
    train = []

    def make(fam: str, n: int) -> int:
        made, tries = 0, 0
        while made < n and tries < 50 * n:
            tries += 1
            p, a = makers[fam](rng)
            if p in taken:
                continue   # a test prompt (or a repeat: the duplicates below are the only ones)
            taken.add(p)
            train.append({"family": fam, "prompt": p, "answer": a, "noisy": False, "duplicate_of": None})
            made += 1
        return made

    for fam, n in counts.items():
        make(fam, n)
    for fam in sorted(shares, key=shares.get, reverse=True):   # a family short of distinct prompts: others fill
        if len(train) < unique:
            make(fam, unique - len(train))
    if len(train) < unique:
        raise InfinictxError(f"the families hold only {len(train)} distinct prompts; ask for a smaller pool")
    rng.shuffle(train)
    for k, row in enumerate(train):
        row["id"] = k
    originals = list(train)
    while len(train) < size:
        src = rng.choice(originals)
        train.append({**src, "id": len(train), "prompt": _near_duplicate(src["prompt"], rng),
                      "duplicate_of": src["id"]})
    by_family: dict[str, list[dict]] = {}
    for row in train:
        by_family.setdefault(row["family"], []).append(row)
    for row in rng.sample(train, round(noise_rate * len(train))):
        others = [r["answer"] for r in rng.sample(by_family[row["family"]], min(20, len(by_family[row["family"]])))
                  if r["answer"] != row["answer"]]
        if others:
            row["answer"], row["noisy"] = others[0], True
    return Pool(train, test, pool_makeup(train, test))


def pool_makeup(train: list[dict], test: dict[str, list[dict]]) -> dict:
    """Per test family: its rows in the pool, how many carry a wrong answer or are near-duplicates, its test size."""
    makeup = {}
    for f in test:
        rows = [r for r in train if r["family"] == f]
        makeup[f] = {"pool": len(rows), "noisy": sum(bool(r["noisy"]) for r in rows),
                     "duplicates": sum(r["duplicate_of"] is not None for r in rows), "test": len(test[f])}
    return makeup
