"""Long-document QA tasks in the spirit of NVIDIA's RULER (Hsieh et al. 2024), planted in a real book instead of
filler sentences: the haystack is the default book (Milton's *Paradise Lost*, which the memory fine-tuning holds
out), from its beginning, and the facts are lines inserted between its lines.

  niah        one fact, "The special magic number for <key> is <7 digits>."; the question asks it back (exact
              match of the number).
  multikey    four facts of that shape with different keys; one is asked, three are distractors.
  multivalue  one key with four values planted apart; all four must be returned (scored per value).
  vartrack    a chain of assignments "VAR ABCDE = 12345", "VAR FGHIJ = ABCDE", ... (five variables, four hops)
              spread over the text, plus a distractor chain of another value; the question asks which variables
              hold the value (scored per variable; naming a distractor variable makes the trial wrong).

A trial puts the asked fact (the first value, the chain's start) at its depth and the others at random line
breaks; the prompt is an instruction, the book with the facts inserted and the question, exactly `length`
tokens. Seeded: the same prompts for every method."""

from __future__ import annotations

import random
from functools import lru_cache

import torch

from ..core.errors import InfinictxError

ADJECTIVES = ("quiet", "amber", "hollow", "silver", "brisk", "ancient", "gentle", "crimson", "lonely", "velvet",
              "frozen", "golden", "hidden", "humble", "rapid", "scarlet", "shallow", "somber", "tender", "wicked")
NOUNS = ("harbor", "lantern", "meadow", "orchard", "falcon", "quarry", "thimble", "compass", "glacier", "kettle",
         "saddle", "chimney", "walnut", "beacon", "cellar", "ribbon", "anchor", "furnace", "pebble", "violin")
NIAH_TASK = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. I will "
             "quiz you about the numbers afterwards.\n")
NIAH_NEEDLE = "The special magic number for {key} is {value}.\n"
NIAH_QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? The special magic "
                 "number for {key} mentioned in the provided text is")
MULTIVALUE_QUESTION = ("\nWhat are all the special magic numbers for {key} mentioned in the provided text? The "
                       "special magic numbers for {key} mentioned in the provided text are")
VARTRACK_TASK = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
VARTRACK_NEEDLE = "VAR {name} = {value}\n"
VARTRACK_QUESTION = ("\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
                     "According to the chain(s) of variable assignment in the text above, {n} variables are assigned "
                     "the value {value}, they are:")
N_KEYS, N_VALUES, CHAIN = 4, 4, 5


@lru_cache(maxsize=4)
def book_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The haystack's tokens and the positions that start a line (where a fact may be inserted)."""
    from ..data.texts import read_text

    text, _ = read_text(None)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    line_ends = {t for t in set(ids) if tokenizer.decode([t]).endswith("\n")}
    starts = [i + 1 for i, t in enumerate(ids) if t in line_ends]
    return ids, starts



def _key(rng: random.Random, taken: set) -> str:
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _number(rng: random.Random, digits: int, taken: set) -> str:
    while True:
        value = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        if value not in taken:
            taken.add(value)
            return value


def _variable(rng: random.Random, taken: set) -> str:
    while True:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in taken:
            taken.add(name)
            return name


def _nearest(slots: list[int], target: float) -> int:
    return min(slots, key=lambda s: abs(s - target))


def _sample(rng: random.Random, slots: list[int], k: int) -> list[int]:
    """k distinct slots (with repeats only when there are fewer than k)."""
    return rng.sample(slots, k) if len(slots) >= k else rng.choices(slots or [0], k=k)


def plant(tokenizer, length: int, task: str, needles: list[str], question: str, place):
    """The prompt: `task`, the book with `needles` inserted at line starts, then `question`; exactly `length`
    tokens. `place(slots, n_fill)` picks each needle's line start among `slots` (the book's first n_fill tokens
    are used); needles at one line start keep their order. Returns (ids, question_start, [(position, length) of
    each needle in ids], answer_start: where the question's answer beginning starts in ids, or None)."""
    from .retrieval import answer_offset

    def tokens(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    head, tail, pieces = tokens(task), tokens(question), [tokens(n) for n in needles]
    n_fill = length - len(head) - len(tail) - sum(map(len, pieces))
    book, starts = book_tokens(tokenizer)
    if n_fill < 1:
        raise InfinictxError(f"length {length} is too short for this prompt (needs more than {length - n_fill} "
                             "tokens)")
    if n_fill > len(book):
        raise InfinictxError(f"length {length} is longer than the book the facts are planted in "
                             f"({len(book):,} tokens)")
    at = place([s for s in starts if s < n_fill] or [0], n_fill)
    ids, spans, prev = list(head), [None] * len(needles), 0
    for i in sorted(range(len(needles)), key=lambda i: (at[i], i)):
        ids += book[prev:at[i]]
        spans[i] = (len(ids), len(pieces[i]))
        ids += pieces[i]
        prev = at[i]
    ids += book[prev:n_fill]
    question_start = len(ids)
    ids += tail
    assert len(ids) == length
    cut = question.index(" Answer:") if " Answer:" in question else None
    offset = answer_offset(tokenizer, question, cut)
    return torch.tensor(ids), question_start, spans, None if offset is None else question_start + offset


def _first_at_depth(depth: float, rng: random.Random, n: int):
    """The first needle at the line start nearest the depth, the others at random other line starts."""
    def place(slots, n_fill):
        first = _nearest(slots, depth * n_fill)
        return [first] + _sample(rng, [s for s in slots if s != first], n - 1)
    return place


def niah_trial(tokenizer, length: int, depth: float, rng: random.Random, n_keys: int = 1):
    from .retrieval import Trial

    keys, values = set(), set()
    facts = [(_key(rng, keys), _number(rng, 7, values)) for _ in range(n_keys)]
    needles = [NIAH_NEEDLE.format(key=k, value=v) for k, v in facts]
    ids, q, spans, answer = plant(tokenizer, length, NIAH_TASK, needles, NIAH_QUESTION.format(key=facts[0][0]),
                                  _first_at_depth(depth, rng, n_keys))
    return Trial(ids, facts[0][1], depth, q, *spans[0], answer_start=answer)


def multikey_trial(tokenizer, length: int, depth: float, rng: random.Random):
    return niah_trial(tokenizer, length, depth, rng, n_keys=N_KEYS)


def multivalue_trial(tokenizer, length: int, depth: float, rng: random.Random):
    from .retrieval import Trial

    key, values = _key(rng, set()), set()
    answers = [_number(rng, 7, values) for _ in range(N_VALUES)]
    needles = [NIAH_NEEDLE.format(key=key, value=v) for v in answers]
    ids, q, spans, answer = plant(tokenizer, length, NIAH_TASK, needles, MULTIVALUE_QUESTION.format(key=key),
                                  _first_at_depth(depth, rng, N_VALUES))
    return Trial(ids, answers[0], depth, q, *spans[0], answers=answers, answer_tokens=48, evidence=spans,
                 answer_start=answer)


def vartrack_trial(tokenizer, length: int, depth: float, rng: random.Random):
    """The asked chain starts at `depth` and its links follow in order at random later line starts; the decoy
    chain (another value) sits anywhere, in its own order."""
    from .retrieval import Trial

    names, values = set(), set()
    value, other = _number(rng, 5, values), _number(rng, 5, values)
    chain = [_variable(rng, names) for _ in range(CHAIN)]
    decoy = [_variable(rng, names) for _ in range(CHAIN)]
    needles = []
    for links, v in ((chain, value), (decoy, other)):
        needles += [VARTRACK_NEEDLE.format(name=links[0], value=v)]
        needles += [VARTRACK_NEEDLE.format(name=b, value=a) for a, b in zip(links, links[1:])]

    def place(slots, n_fill):
        first = _nearest(slots, depth * n_fill)
        later = sorted(_sample(rng, [s for s in slots if s > first] or [first], CHAIN - 1))
        return [first] + later + sorted(_sample(rng, [s for s in slots if s != first], CHAIN))

    ids, q, spans, answer = plant(tokenizer, length, VARTRACK_TASK, needles,
                                  VARTRACK_QUESTION.format(value=value, n=CHAIN), place)
    return Trial(ids, chain[0], depth, q, *spans[0], answers=chain, answer_tokens=32, wrong=decoy,
                 evidence=spans[:CHAIN], answer_start=answer)


PLANTED_BUILDERS = {"niah": niah_trial, "multikey": multikey_trial, "multivalue": multivalue_trial,
                    "vartrack": vartrack_trial}
