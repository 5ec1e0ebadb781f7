"""Retrieval-augmented reading: chunk and index the text, retrieve for the question, answer in the window."""

from .session import RagConfig, RagSession

__all__ = ["RagConfig", "RagSession"]
