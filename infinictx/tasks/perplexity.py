"""Streaming perplexity (the PG19 protocol of Temp-Lora): walk the token stream in chunks of Δ; score each chunk
with the model seeing at most W tokens (the chunk plus the W−Δ before it), then let the session absorb it. Every
token's NLL is kept, so perplexity can be reported overall and per position bucket.

Two perplexities are reported: `ppl` = exp(mean NLL over all scored tokens), the usual definition, and
`ppl_chunk_weighted` = Σ_chunks n_c·exp(mean NLL of chunk c) / Σ n_c, the formula of Temp-Lora's released code
(slightly higher), so numbers can be compared with the paper's.

A long run writes a checkpoint every few chunks; run the same command again and it resumes from there."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import InfinictxError
from ..core.files import atomic_write
from ..core.progress import progress_bar
from ..core.registry import setting
from ..core.session import Session
from .base import Outputs, Result, Task, write_summary


@dataclass
class PerplexityResult:
    method: str
    config: dict
    nll: np.ndarray                  # nll[p-1] is the NLL of token p (token 0 is never scored)
    base_nll: np.ndarray | None
    chunk: int
    bucket_size: int
    wall_s: float
    cost: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return len(self.nll) + 1

    def buckets(self, size: int | None = None) -> list[dict]:
        size = size or self.bucket_size
        out = []
        positions = np.arange(1, len(self.nll) + 1)
        for start in range(0, self.tokens, size):
            sel = (positions >= start) & (positions < start + size)
            if not sel.any():
                continue
            row = {"start": start, "end": min(start + size, self.tokens), "tokens": int(sel.sum()),
                   "ppl": perplexity(self.nll[sel])}
            if self.base_nll is not None:
                row["base_ppl"] = perplexity(self.base_nll[sel])
            out.append(row)
        return out

    def summary(self) -> dict:
        d = {"method": self.method, **self.meta, "tokens": self.tokens, "scored_tokens": len(self.nll),
             "window": self.config.get("window"), "chunk": self.chunk, "config": self.config,
             "ppl": perplexity(self.nll), "ppl_chunk_weighted": chunk_weighted_ppl(self.nll, self.chunk)}
        if self.base_nll is not None:
            d["base_ppl"] = perplexity(self.base_nll)
            d["base_ppl_chunk_weighted"] = chunk_weighted_ppl(self.base_nll, self.chunk)
            d["ppl_ratio_vs_base"] = d["ppl"] / d["base_ppl"]
        d["bucket_size"] = self.bucket_size
        d["buckets"] = self.buckets()
        d["wall_s"] = round(self.wall_s, 3)
        d.update(self.cost)
        return d


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(np.mean(nll, dtype=np.float64)))


def chunk_weighted_ppl(nll: np.ndarray, chunk: int) -> float:
    chunk_ids = np.arange(1, len(nll) + 1) // chunk
    total, weight = 0.0, 0
    for c in np.unique(chunk_ids):
        part = nll[chunk_ids == c]
        total += len(part) * float(np.exp(part.mean(dtype=np.float64)))
        weight += len(part)
    return total / weight


def _run_key(session: Session, ids: torch.Tensor, compare_base: bool) -> str:
    # every setting (from the config, so none can be forgotten), what the session derived from them, the model
    h = hashlib.sha256(ids.numpy().tobytes())
    h.update(repr((session.method, session.lm.name, sorted(session.describe().items()), compare_base)).encode())
    return h.hexdigest()


def streaming_perplexity(session: Session, ids: torch.Tensor, compare_base: bool = False,
                         bucket_size: int = 10_000, progress: bool = True, checkpoint: str | Path | None = None,
                         checkpoint_every: int = 20) -> PerplexityResult:
    """Score the whole token stream `ids` (1-D) with `session`. See the module docstring."""
    ids = ids.to(torch.long).cpu()
    if ids.dim() != 1:
        raise InfinictxError("expected a 1-D token stream")
    if len(ids) <= session.min_text_tokens:
        raise InfinictxError(f"the text has {len(ids)} tokens, not more than the window W={session.min_text_tokens}: "
                             "streaming perplexity needs a text longer than the window")
    if bucket_size < 1:
        raise InfinictxError(f"bucket size must be >= 1 (got {bucket_size})")
    chunk = session.chunk
    nll = np.zeros(len(ids) - 1, dtype=np.float32)
    base_nll = np.zeros_like(nll) if compare_base else None
    start, elapsed = 0, 0.0
    key = _run_key(session, ids, compare_base)
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state.get("key") != key:
            raise InfinictxError(f"checkpoint {ckpt} belongs to a different run (text, model, method or settings "
                                 "differ); delete it or pass another --checkpoint")
        start, elapsed = state["next_start"], state["elapsed"]
        nll[:] = state["nll"]
        if compare_base:
            base_nll[:] = state["base_nll"]
        session.load_state_dict(state["session"], ids[:start])

    n_chunks = (len(ids) + chunk - 1) // chunk
    nll_sum = float(nll[:max(start - 1, 0)].sum(dtype=np.float64))  # covers tokens restored from a checkpoint
    base_sum = float(base_nll[:max(start - 1, 0)].sum(dtype=np.float64)) if compare_base else 0.0
    t0 = time.perf_counter()
    done_since_ckpt = 0
    with progress_bar(progress, n_chunks, "chunk", f"{session.method} ppl", initial=start // chunk) as bar:
        try:
            while start < len(ids):
                end = min(start + chunk, len(ids))
                piece = ids[start:end]
                chunk_nll, chunk_base = session.score_and_absorb(piece, compare_base=compare_base)
                lo = max(start, 1) - 1
                nll[lo:end - 1] = chunk_nll.numpy()
                if compare_base:
                    base_nll[lo:end - 1] = chunk_base.numpy()
                start = end
                done_since_ckpt += 1
                # running sums: recomputing over all past tokens each chunk is O(N²/Δ)
                nll_sum += float(chunk_nll.double().sum())
                post = {"ppl": f"{np.exp(nll_sum / (end - 1)):.2f}"}
                if compare_base:
                    base_sum += float(chunk_base.double().sum())
                    post["base"] = f"{np.exp(base_sum / (end - 1)):.2f}"
                bar.set_postfix(post)
                bar.update(1)
                if ckpt and done_since_ckpt >= checkpoint_every and start < len(ids):
                    _save_checkpoint(ckpt, key, start, elapsed + time.perf_counter() - t0, nll, base_nll, session)
                    done_since_ckpt = 0
        except KeyboardInterrupt:
            if ckpt:
                _save_checkpoint(ckpt, key, start, elapsed + time.perf_counter() - t0, nll, base_nll, session)
            raise
    wall = elapsed + time.perf_counter() - t0
    if ckpt and ckpt.exists():
        ckpt.unlink()  # the run is complete; a checkpoint is only for interrupted runs
    return PerplexityResult(method=session.method, config=session.describe(), nll=nll, base_nll=base_nll,
                            chunk=chunk, bucket_size=bucket_size, wall_s=wall, cost=session.meter.summary())


def _save_checkpoint(path: Path, key, next_start, elapsed, nll, base_nll, session: Session):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": key, "next_start": next_start, "elapsed": elapsed, "nll": nll[:].copy(),
                "base_nll": None if base_nll is None else base_nll.copy(), "session": session.state_dict()}, tmp)
    os.replace(tmp, path)


@dataclass
class PerplexityTask(Task):
    """streaming perplexity of a long text"""

    file: str | None = setting(None, ".txt, folder of .txt, .jsonl or .parquet (default: the default book, "
                               "Paradise Lost)", positional=True)
    record: int = setting(0, "row of a .jsonl/.parquet file")
    max_tokens: int | None = setting(None, "only the first N tokens of the text")
    compare_base: bool = setting(False, "also score every chunk with the method off")
    bucket_size: int = setting(10_000, "position bucket width in tokens")
    checkpoint: str | None = setting(None, "checkpoint file: a rerun resumes from it (with --books: a folder, one "
                                     "checkpoint per book and the finished books' results)")
    books: str | None = setting(None, "score every book of a dataset (a .jsonl/.parquet, or a folder of .txt files) "
                                "on its own: all, N (the first N) or A-B; per-book rows and position buckets over "
                                "all books (--ray spreads the books over workers)")

    name = "ppl"
    default_method = "temp-lora"
    split_hint = "splits into books: give a dataset and --books all"

    @property
    def splits(self) -> bool:
        return self.books is not None

    def _dataset(self) -> list[tuple[str, str]]:
        if getattr(self, "_books_read", None) is None:   # a worker reads the dataset itself, once
            from ..data.texts import read_books

            self._books_read = read_books(self.file, self.books)
        return self._books_read

    def __getstate__(self):   # the task travels to Ray workers without the books it read
        return {k: v for k, v in self.__dict__.items() if k != "_books_read"}

    def run_unit(self, lm, config, unit: int) -> dict:
        """Book `unit` of the dataset, scored by a fresh session (checkpointed under the --checkpoint folder)."""
        name, text = self._dataset()[unit]
        ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        if self.max_tokens:
            ids = ids[:self.max_tokens]
        ckpt = Path(self.checkpoint) / f"book-{unit}.ckpt" if self.checkpoint else None
        with config.make_session(lm) as session:
            try:
                r = streaming_perplexity(session, ids, compare_base=self.compare_base, bucket_size=self.bucket_size,
                                         progress=False, checkpoint=ckpt)
            except InfinictxError as exc:
                raise InfinictxError(f"book {name}: {exc}")
            return {"index": unit, "name": name, "nll": r.nll, "base_nll": r.base_nll, "chunk": r.chunk,
                    "wall_s": r.wall_s, "cost": r.cost, "method": session.method, "config": session.describe()}

    def check(self, config):
        window = getattr(config, "window", None)
        if self.max_tokens is not None and window and self.max_tokens <= window:
            raise InfinictxError(f"--max-tokens {self.max_tokens} must be larger than the window W={window}")
        if self.bucket_size < 1:
            raise InfinictxError(f"bucket size must be >= 1 (got {self.bucket_size})")

    def prepare(self):
        from ..data.texts import read_text

        if self.books is not None:
            if self.file is None:
                raise InfinictxError("--books needs a dataset: a .jsonl/.parquet file or a folder of .txt files")
            return self._dataset()
        return read_text(self.file, record=self.record)

    def run(self, lm, config, inputs, outputs: Outputs, progress: bool, executor=None) -> Result:
        from .report import ppl_markdown

        if self.books is not None:
            return self._run_books(lm, config, inputs, progress, executor)

        text, text_name = inputs
        ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        if self.max_tokens:
            ids = ids[:self.max_tokens]
        with config.make_session(lm) as session:
            result = streaming_perplexity(session, ids, compare_base=self.compare_base, bucket_size=self.bucket_size,
                                          progress=progress, checkpoint=self.checkpoint)
        result.meta = {"model": lm.name, "text": text_name}
        summary = result.summary()
        return Result(summary=summary, stdout=ppl_markdown(summary), data=result)

    def _run_books(self, lm, config, books, progress: bool, executor) -> Result:
        """Every book a unit (here, or on the executor's workers); finished books are kept under the checkpoint
        folder, so a rerun skips them; the summary merges them in book order, whatever order they finished in."""
        from .report import books_markdown

        parts = Path(self.checkpoint) if self.checkpoint else None
        done = {}
        if parts and parts.is_dir():
            for i in range(len(books)):
                if (parts / f"book-{i}.npz").exists():
                    done[i] = _load_book(parts, i)
        pending = [i for i in range(len(books)) if i not in done]
        units = executor.map(pending) if executor is not None else (self.run_unit(lm, config, i) for i in pending)
        with progress_bar(progress, len(books), "book", f"{config.method} ppl", initial=len(done)) as bar:
            for out in units:
                done[out["index"]] = out
                if parts:
                    _save_book(parts, out)
                bar.update(1)
        summary = merge_books([done[i] for i in range(len(books))], self.bucket_size)
        summary.update(model=lm.name, dataset=str(self.file))
        if parts and parts.is_dir():
            for f in parts.glob("book-*"):
                f.unlink()
            if not any(parts.iterdir()):   # a folder the user keeps other files in stays
                parts.rmdir()
        return Result(summary=summary, stdout=books_markdown(summary))

    def write(self, result: Result, outputs: Outputs):
        from .report import plot_ppl

        write_summary(result, outputs)
        if outputs.plot:   # a dataset's plot has only the pooled buckets, a book's its token NLLs too
            data = result.data
            plot_ppl(result.summary, outputs.plot, nll=getattr(data, "nll", None),
                     base_nll=getattr(data, "base_nll", None))


def _save_book(folder: Path, out: dict):
    """A finished book's result, kept so that a rerun skips it: NLLs as .npz, the rest as JSON."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"nll": out["nll"]} | ({"base_nll": out["base_nll"]} if out["base_nll"] is not None else {})
    tmp = folder / f".book-{out['index']}.npz"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    atomic_write(folder / f"book-{out['index']}.json",
                 json.dumps({k: v for k, v in out.items() if k not in ("nll", "base_nll")}, default=str))
    os.replace(tmp, folder / f"book-{out['index']}.npz")   # last: its presence marks the book done


def _load_book(folder: Path, i: int) -> dict:
    import json

    out = json.loads((folder / f"book-{i}.json").read_text())
    arrays = np.load(folder / f"book-{i}.npz")
    out["nll"] = arrays["nll"]
    out["base_nll"] = arrays["base_nll"] if "base_nll" in arrays else None
    return out


def merge_books(books: list[dict], bucket_size: int) -> dict:
    """One summary over a dataset (the PG19 protocol): a row per book, the perplexity over every scored token, and
    position buckets pooled over the books (bucket k holds the tokens at positions k·size .. (k+1)·size − 1 of
    every book long enough to have them)."""
    has_base = books[0]["base_nll"] is not None
    rows, sums = [], {}
    for b in books:
        res = PerplexityResult(method=b["method"], config=b["config"], nll=np.asarray(b["nll"]),
                               base_nll=None if b["base_nll"] is None else np.asarray(b["base_nll"]),
                               chunk=b["chunk"], bucket_size=bucket_size, wall_s=b["wall_s"])
        row = {"name": b["name"], "tokens": res.tokens, "ppl": perplexity(res.nll),
               "ppl_chunk_weighted": chunk_weighted_ppl(res.nll, res.chunk), "wall_s": round(b["wall_s"], 3)}
        if has_base:
            row["base_ppl"] = perplexity(res.base_nll)
        rows.append(row)
        positions = np.arange(1, len(res.nll) + 1) // bucket_size
        for k in np.unique(positions):
            sel = positions == k
            acc = sums.setdefault(int(k), [0.0, 0, 0.0])
            acc[0] += float(res.nll[sel].sum(dtype=np.float64))
            acc[1] += int(sel.sum())
            if has_base:
                acc[2] += float(res.base_nll[sel].sum(dtype=np.float64))
    all_nll = np.concatenate([np.asarray(b["nll"]) for b in books])
    buckets = []
    for k in sorted(sums):
        total, n, base = sums[k]
        row = {"start": k * bucket_size, "end": (k + 1) * bucket_size, "tokens": n, "ppl": float(np.exp(total / n))}
        if has_base:
            row["base_ppl"] = float(np.exp(base / n))
        buckets.append(row)
    summary = {"method": books[0]["method"], "books": rows, "tokens": int(sum(r["tokens"] for r in rows)),
               "scored_tokens": len(all_nll), "window": books[0]["config"].get("window"), "chunk": books[0]["chunk"],
               "config": books[0]["config"], "ppl": perplexity(all_nll), "bucket_size": bucket_size,
               "buckets": buckets, "wall_s": round(sum(b["wall_s"] for b in books), 3)}
    if has_base:
        base = np.concatenate([np.asarray(b["base_nll"]) for b in books])
        summary["base_ppl"] = perplexity(base)
        summary["ppl_ratio_vs_base"] = summary["ppl"] / summary["base_ppl"]
    return summary
