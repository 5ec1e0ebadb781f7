"""An n-gram index over a tokenized corpus: counts, co-occurrence within a token window, ∞-gram probabilities.

One folder holds the corpus in infini-gram's own layout, written by us (infini-gram's indexer would tokenize with
tokenizers it downloads from the hub): `tokenized.0`, every document as a separator (all bits set) followed by its
tokens, u16 or u32 little-endian; `offset.0`, each document's byte offset as u64; `index.json`, what built it.
Two engines answer queries over the same files:

- `InfiniGramIndex`: the `infini-gram` package (`pip install 'infinictx[ngrams]'`): its Rust indexer builds the
  suffix array (`table.0`) in a subprocess, its C++ engine answers. Fast on hundreds of millions of tokens.
- `SuffixArrayIndex`: a pure numpy suffix array (`sa.npy`, prefix doubling): the fallback when the extra is
  missing, exact and fine for a few million tokens; tests check it against infini-gram and a brute-force scan.

Co-occurrence is infini-gram's CNF "AND", reproduced exactly by the numpy engine: take each occurrence of the
rarer n-gram (the anchor); find the nearest occurrence of the other that starts before it and the nearest that
starts at or after it; a side counts when its start is at most `window` tokens from the anchor's start, and the
span it makes with the anchor (both sides together when both count) must not cross a document boundary. The count
is the number of anchors kept: "the two n-grams appear within `window` tokens of each other in one document",
counted once per occurrence of the rarer one. It is proximity, not whole-document co-occurrence. One quirk is
kept for the engines to agree: when both sides are in reach and one lies in a neighbouring document, the anchor
is dropped even if the other side alone would count; it touches only anchors within `window` tokens of a
document's edge, so keep the window well below the documents' length."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...core.errors import InfinictxError

EXACT = 2 ** 40            # infini-gram's max_clause_freq: above it a clause is subsampled; ours never is
RESERVED_WORDS = ("table", "tokenized", "offset", "metadata")   # infini-gram's engine rewrites these in paths


@dataclass
class IndexInfo:
    tokenizer: str
    vocab_size: int
    eos_id: int
    dtype: str                # "u16" or "u32"
    documents: int
    tokens: int               # corpus tokens, separators not counted

    @property
    def np_dtype(self):
        return np.uint16 if self.dtype == "u16" else np.uint32


def token_dtype(vocab_size: int) -> str:
    """u16 while every id stays below 0xFF00: a larger id could put the separator's two 0xFF bytes across a token
    boundary, where infini-gram's byte-wise document-boundary check would see one."""
    if vocab_size < 1:
        raise InfinictxError(f"vocab_size must be >= 1 (got {vocab_size})")
    return "u16" if vocab_size <= 0xFF00 else "u32"


def check_index_dir(path: Path):
    for word in RESERVED_WORDS:
        if word in str(path.resolve()):
            raise InfinictxError(f"the index path {path} contains {word!r}, which infini-gram's engine rewrites in "
                                 f"paths; choose a folder whose path avoids {', '.join(RESERVED_WORDS)}")


def write_corpus(documents, folder: str | Path, tokenizer: str, vocab_size: int, eos_id: int,
                 dtype: str | None = None) -> IndexInfo:
    """Write tokenized documents (an iterable of int sequences) in the layout above; returns what was written."""
    folder = Path(folder)
    check_index_dir(folder)
    dtype = dtype or token_dtype(vocab_size)
    if dtype == "u16" and vocab_size > 0xFF00:
        raise InfinictxError(f"a u16 index holds ids below {0xFF00}; this tokenizer has {vocab_size} (use u32)")
    if dtype not in ("u16", "u32"):
        raise InfinictxError(f"token dtype must be u16 or u32 (got {dtype!r})")
    np_dtype = np.uint16 if dtype == "u16" else np.uint32
    sep = np.array([np.iinfo(np_dtype).max], dtype=np_dtype)
    folder.mkdir(parents=True, exist_ok=True)
    offsets, pos, n_docs, n_tokens = [], 0, 0, 0
    with open(folder / "tokenized.0", "wb") as data:
        for doc in documents:
            ids = np.asarray(doc, dtype=np.int64)
            if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
                raise InfinictxError(f"document {n_docs} has token ids outside [0, {vocab_size})")
            chunk = np.concatenate([sep, ids.astype(np_dtype)])
            data.write(chunk.tobytes())
            offsets.append(pos)
            pos += chunk.nbytes
            n_docs += 1
            n_tokens += len(ids)
    if not n_docs or not n_tokens:
        raise InfinictxError("the corpus is empty: no document with text")
    np.asarray(offsets, dtype=np.uint64).tofile(folder / "offset.0")
    info = IndexInfo(tokenizer, vocab_size, eos_id, dtype, n_docs, n_tokens)
    (folder / "index.json").write_text(json.dumps(info.__dict__, indent=2) + "\n")
    return info


def read_info(folder: str | Path) -> IndexInfo:
    path = Path(folder) / "index.json"
    if not path.exists():
        raise InfinictxError(f"{folder} is not an n-gram index (no index.json); build one with `infinictx ngram-index`")
    return IndexInfo(**json.loads(path.read_text()))


class NgramIndex:
    """What both engines answer. An n-gram is a list of token ids; a *clause* is a list of n-grams taken as
    alternatives (one word sequence's spellings: "the king", "The king"), whose occurrences are all of theirs."""

    info: IndexInfo

    def count(self, ids) -> int:
        raise NotImplementedError

    def count_any(self, clause) -> int:
        return sum(self.count(ids) for ids in clause)

    def cooccur(self, a, b, window: int) -> int:
        """Co-occurrences of clauses `a` and `b` within `window` tokens (module docstring)."""
        raise NotImplementedError

    def prob(self, prompt, cont: int) -> tuple[int, int]:
        """(count of prompt, count of prompt + cont)."""
        raise NotImplementedError

    def infgram(self, prompt, cont: int) -> dict:
        """The ∞-gram estimate: the longest suffix of `prompt` found in the corpus, and P(cont | that suffix) as
        counts {suffix_len, prompt_cnt, cont_cnt, prob} (prob -1 when the suffix is empty and nothing matches)."""
        prompt = list(prompt)
        lo, hi = 0, 1   # binary lifting, then binary search, on the longest suffix with a nonzero count
        while True:
            if hi > len(prompt):
                hi = len(prompt) + 1
                break
            if self.count(prompt[len(prompt) - hi:]) == 0:
                break
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.count(prompt[len(prompt) - mid:]) == 0:
                hi = mid
            else:
                lo = mid
        suffix = prompt[len(prompt) - lo:]
        prompt_cnt, cont_cnt = self.prob(suffix, cont)
        return {"suffix_len": lo, "prompt_cnt": prompt_cnt, "cont_cnt": cont_cnt,
                "prob": cont_cnt / prompt_cnt if prompt_cnt else -1.0}


def _check_query(ids, what: str = "an n-gram"):
    if len(ids) < 1:
        raise InfinictxError(f"{what} needs at least one token")


def _check_clause(clause, window: int | None = None):
    if not len(clause):
        raise InfinictxError("a clause needs at least one n-gram")
    for ids in clause:
        _check_query(ids)
    if window is not None and window < 1:
        raise InfinictxError(f"the co-occurrence window must be >= 1 token (got {window})")


class SuffixArrayIndex(NgramIndex):
    """The pure numpy engine."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.info = read_info(folder)
        raw = np.fromfile(self.folder / "tokenized.0", dtype=self.info.np_dtype)
        self.sep = int(np.iinfo(self.info.np_dtype).max)
        self.tokens = raw.astype(np.int64)
        # position -> document number (documents start at their separator)
        self.doc_starts = np.flatnonzero(self.tokens == self.sep)
        sa_path = self.folder / "sa.npy"
        if not sa_path.exists():
            np.save(sa_path, suffix_array(self.tokens))
        self.sa = np.load(sa_path, mmap_mode="r")

    def _range(self, ids) -> tuple[int, int]:
        """The suffix array rows whose suffixes start with `ids` (empty `ids`: every row)."""
        q = np.asarray(ids, dtype=np.int64)
        n, k = len(self.tokens), len(q)
        if k == 0:
            return 0, n

        def cmp(row) -> int:   # the sign of suffix(row)[:k] against q; a proper prefix of q sorts before it
            start = int(self.sa[row])
            p = self.tokens[start:start + k]
            diff = np.flatnonzero(p != q[:len(p)])
            if len(diff):
                return -1 if p[diff[0]] < q[diff[0]] else 1
            return -1 if len(p) < k else 0

        first = _partition(lambda row: cmp(row) < 0, 0, n)
        return first, _partition(lambda row: cmp(row) <= 0, first, n)

    def positions(self, ids) -> np.ndarray:
        lo, hi = self._range(ids)
        return np.sort(np.asarray(self.sa[lo:hi], dtype=np.int64))

    def count(self, ids) -> int:
        _check_query(ids)
        lo, hi = self._range(ids)
        return hi - lo

    def prob(self, prompt, cont: int) -> tuple[int, int]:
        lo, hi = self._range(prompt)
        if hi == lo:
            return 0, 0
        lo2, hi2 = self._range(list(prompt) + [cont])
        return hi - lo, hi2 - lo2

    def cooccur(self, a, b, window: int) -> int:
        _check_clause(a, window)
        _check_clause(b)
        pa, pb = (np.sort(np.concatenate([self.positions(ids) for ids in c])) for c in (a, b))
        if not len(pa) or not len(pb):
            return 0
        anchor, other = (pa, pb) if len(pa) <= len(pb) else (pb, pa)
        doc = lambda p: np.searchsorted(self.doc_starts, p, side="right") - 1   # noqa: E731
        i = np.searchsorted(other, anchor, side="left")   # first other starting at or after the anchor
        has_left, has_right = i > 0, i < len(other)
        left = np.where(has_left, other[np.maximum(i - 1, 0)], -1)
        right = np.where(has_right, other[np.minimum(i, len(other) - 1)], -1)
        left_ok = has_left & (anchor - left <= window)
        right_ok = has_right & (right - anchor <= window)
        same_left = doc(np.where(has_left, left, anchor)) == doc(anchor)
        same_right = doc(np.where(has_right, right, anchor)) == doc(anchor)
        # both sides in reach: one span from left to right, kept only if it stays in the anchor's document
        kept = np.where(left_ok & right_ok, same_left & same_right,
                        (left_ok & same_left) | (right_ok & same_right))
        return int(kept.sum())


def _partition(pred, lo: int, hi: int) -> int:
    """The first index in [lo, hi) where `pred` turns False (it is True, then False, along the range)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            lo = mid + 1
        else:
            hi = mid
    return lo


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Suffix array of an int array by prefix doubling (argsort on rank pairs): O(n log² n) time, a few n-sized
    int64 arrays of memory. Ties never remain: a shorter suffix sorts first."""
    n = len(tokens)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rank = np.unique(tokens, return_inverse=True)[1].astype(np.int64) + 1   # 0 is "past the end"
    k = 1
    while True:
        second = np.zeros(n, dtype=np.int64)
        second[:n - k] = rank[k:] if k < n else 0
        order = np.lexsort((second, rank))
        r, s = rank[order], second[order]
        new = np.empty(n, dtype=np.int64)
        new[order] = np.cumsum(np.concatenate([[1], (r[1:] != r[:-1]) | (s[1:] != s[:-1])]))
        rank = new
        if rank.max() == n or k >= n:
            return order
        k *= 2


class InfiniGramIndex(NgramIndex):
    """The infini-gram engine over the same files (its suffix array `table.0` built on first use)."""

    def __init__(self, folder: str | Path, cpus: int = 1, mem_gib: int = 4):
        try:
            from infini_gram.engine import InfiniGramEngine
        except ImportError:
            raise InfinictxError("the infini-gram engine needs its package: pip install 'infinictx[ngrams]'")
        self.folder = Path(folder).resolve()
        check_index_dir(self.folder)
        self.info = read_info(self.folder)
        if not (self.folder / "table.0").exists():
            build_table(self.folder, cpus, mem_gib)
        self.engine = InfiniGramEngine(index_dir=str(self.folder), eos_token_id=self.info.eos_id,
                                       vocab_size=np.iinfo(self.info.np_dtype).max, version=4,
                                       token_dtype=self.info.dtype, max_clause_freq=EXACT)

    @staticmethod
    def _ok(result: dict) -> dict:
        if "error" in result:
            raise InfinictxError(f"infini-gram: {result['error']}")
        return result

    def count(self, ids) -> int:
        _check_query(ids)
        return self._ok(self.engine.count(input_ids=[int(t) for t in ids]))["count"]

    def prob(self, prompt, cont: int) -> tuple[int, int]:
        r = self._ok(self.engine.prob(prompt_ids=[int(t) for t in prompt], cont_id=int(cont)))
        return r["prompt_cnt"], r["cont_cnt"]

    def cooccur(self, a, b, window: int) -> int:
        _check_clause(a, window)
        _check_clause(b)
        cnf = [[[int(t) for t in ids] for ids in clause] for clause in (a, b)]
        r = self._ok(self.engine.count_cnf(cnf=cnf, max_clause_freq=EXACT, max_diff_tokens=window))
        return r["count"]


def build_table(folder: Path, cpus: int = 1, mem_gib: int = 4):
    """infini-gram's indexer on our token files (its tokenizing step sees them and skips itself). Its default
    open-files limit is above what an unprivileged process may set: pass the hard limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    ulimit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    empty = folder / "no-raw-text"
    empty.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "infini_gram.indexing", "--data_dir", str(empty), "--save_dir", str(folder),
           "--token_dtype", read_info(folder).dtype, "--version", "4", "--cpus", str(cpus), "--mem", str(mem_gib),
           "--ulimit", str(min(ulimit, 1 << 20))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    empty.rmdir()
    if done.returncode != 0 or not (folder / "table.0").exists():
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise InfinictxError(f"infini-gram's indexer failed: {tail[-1] if tail else done.returncode}")


def open_index(folder: str | Path, engine: str = "auto") -> NgramIndex:
    """The index in `folder` with the engine asked for ("auto": infini-gram when installed, else numpy)."""
    if engine not in ("auto", "infini-gram", "numpy"):
        raise InfinictxError(f"unknown n-gram engine {engine!r}; choose auto, infini-gram or numpy")
    if engine == "auto":
        try:
            import infini_gram.engine  # noqa: F401
            engine = "infini-gram"
        except ImportError:
            engine = "numpy"
    return InfiniGramIndex(folder) if engine == "infini-gram" else SuffixArrayIndex(folder)
