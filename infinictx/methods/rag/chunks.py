"""Cutting a token stream into retrievable chunks, and putting the retrieved ones back into a prompt.

Chunks are token spans of C tokens, each starting C − O after the one before (O tokens of overlap), the last one
ending at the stream's end: together they cover every token. A prompt takes the best-ranked chunks that fit a
token budget (at most K of them), in document order (default) or by score; in document order, chunks that
overlap or touch are joined into one passage without repeating the shared tokens, and passages are separated by
a blank line."""

from __future__ import annotations

from ...core.errors import InfinictxError


def chunk_spans(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[(start, end)] of the chunks of a stream of `n_tokens` tokens (none for an empty stream)."""
    if size < 1 or not 0 <= overlap < size:
        raise InfinictxError(f"chunk size C={size} must be >= 1 and overlap O={overlap} in [0, C)")
    spans, start = [], 0
    while start < n_tokens:
        end = min(start + size, n_tokens)
        spans.append((start, end))
        if end == n_tokens:
            break
        start += size - overlap
    return spans


def passages(spans: list[tuple[int, int]], order: str) -> list[tuple[int, int]]:
    """The token ranges a prompt shows for the chosen `spans` (given best first): by score, each span as it is,
    best first (`score`) or best last, next to the question (`best-last`); in document order, sorted and with
    overlapping or touching spans joined."""
    if order == "score":
        return list(spans)
    if order == "best-last":
        return list(reversed(spans))
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def prompt_tokens(chosen: list[tuple[int, int]], order: str, separator: int) -> int:
    """Tokens the retrieved part of a prompt takes: its passages and a separator after each."""
    return sum(b - a + separator for a, b in passages(chosen, order))


def choose(ranked: list[int], spans: list[tuple[int, int]], budget: int, top_k: int | None, order: str,
           separator: int) -> list[tuple[int, int]]:
    """The spans a prompt shows: the best-ranked chunks (`ranked`: chunk numbers, best first), at most `top_k`
    of them, while the retrieved part stays within `budget` tokens (a chunk that would not fit is skipped and the
    next one tried). Returns the passages, in the prompt's order."""
    chosen: list[tuple[int, int]] = []
    for c in ranked:
        if top_k is not None and len(chosen) >= top_k:
            break
        trial = chosen + [spans[c]]
        if prompt_tokens(trial, order, separator) <= budget:
            chosen = trial
    return passages(chosen, order)
