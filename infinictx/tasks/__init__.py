"""Tasks: what a run does with a session, whatever the method inside (`base.py` has the protocol).

  ppl       streaming perplexity of a long text (`perplexity.py`: the PG19 protocol, resumable)
  generate  long generation chunk by chunk (`generation.py`)
  passkey   retrieval accuracy against prompt length: passkey or key-value lookup (`retrieval.py`)
  translate long-document translation, chunk by chunk (`translation.py`)

`report.py` turns their summaries into Markdown tables and plots."""

from .base import Outputs, Result, Task
from .generation import GenerationResult, GenerationTask, generate_long
from .perplexity import PerplexityResult, PerplexityTask, streaming_perplexity
from .retrieval import RetrievalResult, RetrievalTask, run_retrieval
from .translation import TranslationTask

TASKS: dict[str, type] = {t.name: t for t in (PerplexityTask, GenerationTask, RetrievalTask, TranslationTask)}

__all__ = ["GenerationResult", "GenerationTask", "Outputs", "PerplexityResult", "PerplexityTask", "Result",
           "RetrievalResult", "RetrievalTask", "TASKS", "Task", "TranslationTask", "generate_long", "run_retrieval",
           "streaming_perplexity"]
