import json

import pytest

from infinictx import InfinictxError, read_text
from infinictx.data.texts import strip_gutenberg


def test_plain_txt_and_crlf(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"line one\r\nline two\r\n")
    text, name = read_text(p)
    assert text == "line one\nline two\n" and name == "a.txt"


def test_folder_joins_txt_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.md").write_text("ignored")
    text, _ = read_text(tmp_path)
    assert text.index("first") < text.index("second") and "ignored" not in text


def test_jsonl_and_parquet_pick_a_record(tmp_path):
    rows = [{"text": "book zero", "id": 0}, {"text": "book one", "id": 1}]
    p = tmp_path / "pg19.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_text(p, record=1)[0].strip() == "book one"
    import pyarrow as pa
    import pyarrow.parquet as pq

    q = tmp_path / "pg19.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), q)
    assert read_text(q, record=0)[0].strip() == "book zero"
    with pytest.raises(InfinictxError, match="out of range"):
        read_text(q, record=5)


def test_gutenberg_boilerplate_removed():
    raw = ("The Project Gutenberg eBook of X\nlicence blah\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n"
           "The real text.\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nmore licence\n")
    assert strip_gutenberg(raw) == "The real text.\n"


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"   \n\n", "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "binary"),
    (b"caf\xe9 au lait", "UTF-8"),
])
def test_bad_files_give_clear_errors(tmp_path, content, message):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(InfinictxError, match=message):
        read_text(p)


def test_missing_file_and_bad_jsonl(tmp_path):
    with pytest.raises(InfinictxError, match="does not exist"):
        read_text(tmp_path / "nope.txt")
    p = tmp_path / "x.jsonl"
    p.write_text('{"title": "no text field"}\n')
    with pytest.raises(InfinictxError, match="no string field 'text'"):
        read_text(p)
