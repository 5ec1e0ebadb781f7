"""Building an n-gram index from text: documents tokenized with the analysed model's own tokenizer, written by us
(index.py's layout), then the engine's suffix array built; into a temporary folder renamed into place, so an
interrupted build leaves nothing that looks like an index."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ...core.errors import InfinictxError
from .index import check_index_dir, open_index, write_corpus


def tokenizer_name(tokenizer) -> str:
    """What identifies a tokenizer: its size and a hash of its vocabulary (the same files loaded two ways match)."""
    import hashlib
    import json

    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return f"{len(tokenizer)} ids, vocabulary {hashlib.sha256(vocab).hexdigest()[:16]}"


def build_index(texts, tokenizer, folder: str | Path, engine: str = "auto", progress=None) -> dict:
    """Index `texts` (an iterable of (name, text)) under `folder`; returns what was built and how fast."""
    folder = Path(folder)
    check_index_dir(folder)
    if folder.exists() and any(folder.iterdir()):
        raise InfinictxError(f"{folder} exists and is not empty; choose a new folder for the index")
    tmp = folder.with_name(f".{folder.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()

    def documents():
        for _, text in texts:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if progress:
                progress(len(ids))
            if ids:
                yield ids

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    info = write_corpus(documents(), tmp, tokenizer=tokenizer_name(tokenizer), vocab_size=len(tokenizer), eos_id=eos)
    t_tok = time.perf_counter() - t0
    index = open_index(tmp, engine)   # builds the engine's suffix array
    t_index = time.perf_counter() - t0 - t_tok
    kind = type(index).__name__
    del index
    if folder.exists():
        folder.rmdir()
    tmp.rename(folder)
    return {"documents": info.documents, "tokens": info.tokens, "engine": kind, "tokenize_s": round(t_tok, 2),
            "index_s": round(t_index, 2), "tokens_per_s_index": round(info.tokens / max(t_index, 1e-9)),
            "bytes": sum(f.stat().st_size for f in folder.iterdir())}
