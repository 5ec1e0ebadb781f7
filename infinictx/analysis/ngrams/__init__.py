"""Tracing a model's answers back to its training corpus with n-gram statistics (Gen-vs-Mem, arXiv 2407.14985):
`index.py` counts n-grams and their co-occurrences in a tokenized corpus (infini-gram, or a numpy fallback)."""

from .index import InfiniGramIndex, NgramIndex, SuffixArrayIndex, open_index, suffix_array, write_corpus

__all__ = ["InfiniGramIndex", "NgramIndex", "SuffixArrayIndex", "open_index", "suffix_array", "write_corpus"]
