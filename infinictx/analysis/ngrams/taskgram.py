"""The task-gram language model of Gen-vs-Mem (arXiv 2407.14985): which n-grams of a task's outputs go with which
n-grams of its inputs, and how often they co-occur in the pretraining corpus.

For an example (x, y): the word n-grams of x and of y (lower-cased, punctuation dropped; for n ≤ 2 an n-gram with
a stop word is dropped, for any n one made only of stop words), n-grams found in both dropped, every (x-gram,
y-gram) pair of the same n kept whose embeddings' cosine is at least γ (the paper's semantic filter, with
all-MiniLM-L6-v2). The task-gram probability of a pair is P(y-gram | x-gram) = C(x-gram, y-gram) / C(x-gram),
counts from the corpus index, co-occurrence within the index's token window (index.py). An n-gram is counted in
all of its spellings (with and without a leading space, lower-case and capitalised), as one clause.

Chinese (any CJK ideograph) counts one character as one word, joined without spaces."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...core.errors import InfinictxError

_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+(?:'[^\W_]+)*")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def stop_words() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN_PLUS

    return frozenset(STOPWORDS_EN_PLUS)


@dataclass(frozen=True)
class Gram:
    words: tuple[str, ...]
    start: int      # characters of the text it was found in (its first occurrence)
    end: int

    @property
    def text(self) -> str:
        return join(self.words)


def join(words) -> str:
    return "".join(words) if all(_CJK.fullmatch(w) for w in words) else " ".join(words)


def words(text: str) -> list[tuple[str, int, int]]:
    """(lower-cased word, start, end) of every word of `text`."""
    return [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(text)]


def ngrams(text: str, n: int, stop: frozenset[str] = frozenset()) -> list[Gram]:
    """The distinct word n-grams of `text`, each at its first occurrence, stop-word rules of the module applied."""
    if n < 1:
        raise InfinictxError(f"n must be >= 1 (got {n})")
    ws = words(text)
    seen, out = set(), []
    for i in range(len(ws) - n + 1):
        gram = tuple(w for w, _, _ in ws[i:i + n])
        is_stop = [w in stop for w in gram]
        if all(is_stop) or (n <= 2 and any(is_stop)) or gram in seen:
            continue
        seen.add(gram)
        out.append(Gram(gram, ws[i][1], ws[i + n - 1][2]))
    return out


@dataclass
class GramPair:
    example: int
    n: int
    x: Gram
    y: Gram
    similarity: float | None = None


@dataclass
class PairMiner:
    """Task-related n-gram pairs of (x, y) examples."""
    ns: tuple[int, ...] = (1, 2, 3)
    gamma: float | None = 0.7          # cosine threshold of the semantic filter (None: no filter)
    embedder: object | None = None     # a sentence-transformers model (needed when gamma is set)
    stop: frozenset[str] = field(default_factory=stop_words)

    def __post_init__(self):
        if not self.ns or min(self.ns) < 1:
            raise InfinictxError(f"n-gram sizes must be >= 1 (got {self.ns})")
        if self.gamma is not None and not -1.0 <= self.gamma <= 1.0:
            raise InfinictxError(f"gamma is a cosine in [-1, 1] (got {self.gamma})")

    def candidates(self, k: int, x: str, y: str) -> list[GramPair]:
        out = []
        for n in self.ns:
            xs, ys = ngrams(x, n, self.stop), ngrams(y, n, self.stop)
            shared = {g.words for g in xs} & {g.words for g in ys}
            out += [GramPair(k, n, gx, gy) for gx in xs if gx.words not in shared
                    for gy in ys if gy.words not in shared]
        return out

    def mine(self, examples: list[tuple[str, str]]) -> list[GramPair]:
        pairs = [p for k, (x, y) in enumerate(examples) for p in self.candidates(k, x, y)]
        if self.gamma is None or not pairs:
            return pairs
        if self.embedder is None:
            raise InfinictxError("the semantic filter (gamma) needs an embedder")
        texts = sorted({p.x.text for p in pairs} | {p.y.text for p in pairs})
        vecs = self.embedder.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        at = {t: i for i, t in enumerate(texts)}
        for p in pairs:
            p.similarity = float(vecs[at[p.x.text]] @ vecs[at[p.y.text]])
        return [p for p in pairs if p.similarity >= self.gamma]


def _contains(seq: tuple, part: tuple) -> bool:
    return any(seq[k:k + len(part)] == part for k in range(len(seq) - len(part) + 1))


class TaskGramModel:
    """P(y-gram | x-gram) = C(x-gram, y-gram) / C(x-gram) from an n-gram index, counts cached."""

    def __init__(self, index, tokenizer, window: int):
        if window < 1:
            raise InfinictxError(f"the co-occurrence window must be >= 1 token (got {window})")
        self.index, self.tokenizer, self.window = index, tokenizer, window
        self._clauses: dict[tuple, list[list[int]]] = {}
        self._counts: dict[tuple, int] = {}
        self._pairs: dict[tuple, int] = {}

    def clause(self, words: tuple[str, ...]) -> list[list[int]]:
        """The token ids of every spelling of a word n-gram."""
        if words not in self._clauses:
            text = join(words)
            spellings = {text, text[:1].upper() + text[1:]}
            ids = {tuple(self.tokenizer(s, add_special_tokens=False).input_ids)
                   for t in spellings for s in (t, " " + t)} - {()}
            # a spelling whose tokens contain another's would count the same occurrence twice: keep the shorter
            self._clauses[words] = [list(i) for i in sorted(ids)
                                    if not any(j != i and _contains(i, j) for j in ids)]
        return self._clauses[words]

    def count(self, words: tuple[str, ...]) -> int:
        if words not in self._counts:
            self._counts[words] = self.index.count_any(self.clause(words))
        return self._counts[words]

    def cooccur(self, x: tuple[str, ...], y: tuple[str, ...]) -> int:
        if (x, y) not in self._pairs:
            self._pairs[(x, y)] = self.index.cooccur(self.clause(x), self.clause(y), self.window)
        return self._pairs[(x, y)]

    def prob(self, x: tuple[str, ...], y: tuple[str, ...]) -> tuple[float | None, int, int]:
        """(P(y | x) or None when x never occurs, C(x), C(x, y))."""
        c_x = self.count(x)
        if c_x == 0:
            return None, 0, 0
        c_xy = self.cooccur(x, y)
        return c_xy / c_x, c_x, c_xy
