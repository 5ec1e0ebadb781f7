"""Retrieval-augmented reading (ChatQA 2, arXiv 2407.14482): the text read so far is cut into chunks of C tokens
(O of overlap) and indexed; a question retrieves the chunks that best match it and the model answers with them,
and the question, in its window.

  question answering   the harness hands the question over (`question` capability): it is the query; the prompt
                       is the retrieved chunks (top K, at most `budget` tokens, W − question − format − answer by
                       default), in document order or by score, then the question, in ChatQA's format for a chat
                       model or plain for a base model.
  scoring, generation  without a question (streaming perplexity, continuing a text) the query is the last
                       `query_tokens` tokens, as in In-Context RALM (Ram et al. 2023): the window is the retrieved
                       chunks (at most half of it) and the most recent tokens; only chunks that have left the
                       recent part complete are retrieved. The base variant is the plain window.

The index grows as chunks complete while the text is absorbed (so a forked session shares it) and is saved with
the session's state for a resumed run."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ...core.errors import InfinictxError
from ...core.models import LoadedModel
from ...core.registry import register_method, setting
from ...core.session import Capabilities, Sampler, Session, check_window
from ..base import MethodConfig
from .chunks import choose, chunk_spans
from .retrievers import RETRIEVERS, make_retriever

FORMATS = ("auto", "chatqa", "plain")
ORDERS = ("document", "score", "best-last")
# ChatQA's system turn and roles (Liu et al. 2024, ChatQA / ChatQA 2 prompt format)
CHATQA_SYSTEM = ("System: This is a chat between a user and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the user's questions based on the context. The "
                 "assistant should also indicate when the answer cannot be found in the context.\n\n")
CHATQA_USER, CHATQA_ASSISTANT = "User:", "\n\nAssistant:"
SEPARATOR = "\n\n"
INDEX_BATCH = 32   # complete chunks indexed together while reading


@register_method("rag")
@dataclass
class RagConfig(MethodConfig):
    window: int = setting(1024, "W: the model's window; the retrieved chunks, the question and the answer fit in it",
                          short="-W")
    chunk: int | None = setting(None, "Δ: tokens scored (or generated) per step (default min(256, W/2))", short="-D")
    chunk_tokens: int = setting(128, "C: tokens per retrieved chunk")
    overlap: int | None = setting(None, "O: tokens each chunk shares with the one before it (default C/4: a fact "
                                  "that straddles two chunks still lies whole in one)")
    top_k: int | None = setting(None, "K: chunks retrieved (default: as many as the budget holds, budget / C)")
    budget: int | None = setting(None, "tokens of retrieved text in a prompt (default: what the window leaves "
                                 "beside the question, the format and the answer)")
    retriever: str = setting("dense", "dense (sentence embeddings), bm25, or hybrid (reciprocal-rank fusion)",
                             choices=RETRIEVERS)
    embedder: str | None = setting(None, "sentence-transformers model directory (default: all-MiniLM-L6-v2)")
    order: str = setting("document", "retrieved chunks in document order, best first (score) or best last, "
                         "next to the question (best-last)", choices=ORDERS)
    prompt_format: str = setting("auto", "ChatQA's format or plain text (auto: ChatQA for a model with a chat "
                                 "template)", choices=FORMATS)
    query_tokens: int = setting(64, "without a question (scoring, generation): the last tokens that are the query")
    ann_min: int = setting(50_000, "embedded pieces above which the dense search is approximate (HNSW)")

    def validate(self):
        if self.chunk is None:
            self.chunk = min(256, self.window // 2)
        check_window(self.window, self.chunk)
        if self.overlap is None:
            self.overlap = max(0, self.chunk_tokens) // 4
        if self.chunk_tokens < 1 or not 0 <= self.overlap < self.chunk_tokens:
            raise InfinictxError(f"chunk size C={self.chunk_tokens} must be >= 1 and overlap O={self.overlap} "
                                 "in [0, C)")
        if self.chunk_tokens >= self.window:
            raise InfinictxError(f"a chunk of C={self.chunk_tokens} tokens does not fit the window W={self.window} "
                                 "beside a question")
        if self.top_k is not None and self.top_k < 1:
            raise InfinictxError(f"top-k must be >= 1 (got {self.top_k})")
        if self.budget is not None and not 1 <= self.budget < self.window:
            raise InfinictxError(f"the retrieval budget ({self.budget}) must be in [1, W={self.window})")
        if self.query_tokens < 1:
            raise InfinictxError(f"query_tokens must be >= 1 (got {self.query_tokens})")
        if self.retriever not in RETRIEVERS:
            raise InfinictxError(f"unknown retriever {self.retriever!r}; choose one of {', '.join(RETRIEVERS)}")

    def learner_defaults(self) -> dict:
        return {"window": self.window, "chunk": self.chunk}

    def new_session(self, lm: LoadedModel) -> "RagSession":
        return RagSession(lm, self)


class RagSession(Session):
    scores_by_forward = False   # a score's forward reads retrieved chunks, not the plain window

    def __init__(self, lm: LoadedModel, config: RagConfig):
        super().__init__(lm, config, config.window, config.chunk)
        self.retriever = make_retriever(config.retriever, config.embedder, str(lm.device), config.ann_min)
        chat = bool(getattr(lm.tokenizer, "chat_template", None))
        self.format = ("chatqa" if chat else "plain") if config.prompt_format == "auto" else config.prompt_format
        self.separator = self._tokens(SEPARATOR)
        self._texts: dict[tuple[int, int], str] = {}   # decoded chunks
        self._question: torch.Tensor | None = None       # the question (and any answer so far)
        self._answer_at: int | None = None               # where the answer's given beginning starts in it
        self.last_retrieval: dict | None = None           # what the last prompt showed (benchmarks measure recall)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(kv_bytes=True, question=True, fork=self.learner is None, base_variant=True)

    def details(self) -> dict:
        return {**super().details(), "prompt_format_used": self.format}

    def _tokens(self, text: str) -> torch.Tensor:
        return torch.tensor(self.lm.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)

    # --- the index ---------------------------------------------------------------------------------------
    def _spans(self, complete_only: bool) -> list[tuple[int, int]]:
        """The chunks of the history; with `complete_only`, the last one only if it has all C tokens (a chunk
        still growing is indexed only when a question needs it)."""
        spans = chunk_spans(len(self.history), self.config.chunk_tokens, self.config.overlap)
        if complete_only and spans and spans[-1][1] - spans[-1][0] < self.config.chunk_tokens:
            spans = spans[:-1]
        return spans

    def _sync(self, spans: list[tuple[int, int]]):
        texts = []
        for a, b in spans:
            if (a, b) not in self._texts:
                self._texts[(a, b)] = self.lm.tokenizer.decode(self.history[a:b].tolist())
            texts.append(self._texts[(a, b)])
        self.retriever.sync(texts)

    def _read(self, tokens: torch.Tensor):
        super()._read(tokens)
        # index complete chunks as the text comes in (a forked session inherits them), in batches: the embedder
        # is several times faster on 32 chunks at once than on two
        spans = self._spans(complete_only=True)
        if len(spans) - len(self.retriever.texts) >= INDEX_BATCH:
            self._sync(spans)

    def _retrieve(self, query: str, spans: list[tuple[int, int]], limit: int, budget: int) -> torch.Tensor:
        """The retrieved part of a prompt: the best chunks among the first `limit` for `query`, within
        `budget` tokens (separators included), each passage followed by a blank line."""
        sep = len(self.separator)
        k = self.config.top_k or max(1, budget // (self.config.chunk_tokens + sep))
        ranked = self.retriever.rank(query, min(limit, 4 * k + 16), limit) if limit else []
        shown = choose(ranked, spans, budget, k, self.config.order, sep)
        self.last_retrieval = {"query": query, "ranked": ranked[:k], "passages": shown, "budget": budget}
        parts = [t for a, b in shown for t in (self.history[a:b], self.separator)]
        return torch.cat(parts) if parts else self.history[:0]

    # --- scoring and generation without a question ---------------------------------------------------
    def _context(self, room: int, local: int) -> torch.Tensor:
        """A context of at most `room` tokens: everything if it fits, else retrieved chunks (at most half the
        room, and the budget) and the last tokens; at most `local` of the last tokens when given."""
        if len(self.history) <= min(room, local):
            return self.history
        budget = min(room // 2, self.config.budget or room)
        n_local = min(local, room - budget)
        cut = len(self.history) - n_local
        spans = self._spans(complete_only=True)
        self._sync(spans)
        limit = sum(1 for _, b in spans if b <= cut)
        query = self.lm.tokenizer.decode(self.history[-self.config.query_tokens:].tolist())
        return torch.cat([self._retrieve(query, spans, limit, budget), self.history[cut:]])

    def score_context(self, base: bool = False) -> torch.Tensor:
        room = self.window - self.chunk
        return super().score_context() if base else self._context(room, room)

    # --- questions -------------------------------------------------------------------------------------
    def question(self, tokens: torch.Tensor, answer_at: int | None = None):
        """The question a retrieval task asks: the query, and the end of the prompt. `answer_at`: where the
        answer's given beginning ("The pass key is") starts in `tokens`; in ChatQA's format it opens the assistant's
        turn (asked inside the user's turn, a chat model restates the question instead of answering), and it is
        left out of the query."""
        if answer_at is not None and not 0 < answer_at < len(tokens):
            raise InfinictxError(f"the answer's beginning ({answer_at}) must lie inside the question "
                                 f"({len(tokens)} tokens)")
        self._question, self._answer_at = tokens.cpu(), answer_at

    def _question_prompt(self, n_answer: int) -> torch.Tensor:
        q = self._question
        if len(self.history) == 0:
            raise InfinictxError("there is no document to retrieve from: absorb the text before the question")
        if self.format == "chatqa":
            head, mid, tail = self._tokens(CHATQA_SYSTEM), self._tokens(CHATQA_USER), self._tokens(CHATQA_ASSISTANT)
        else:
            head = mid = tail = self.history[:0]
        room = self.window - len(head) - len(mid) - len(q) - len(tail) - n_answer
        if room < 1:
            raise InfinictxError(f"the question ({len(q)} tokens) and the answer ({n_answer}) leave no room for "
                                 f"retrieved text in the window W={self.window}")
        if self.config.budget is not None and self.config.budget > room:
            raise InfinictxError(f"the retrieval budget ({self.config.budget} tokens) does not fit: the window "
                                 f"W={self.window} leaves {room} beside the question ({len(q)} tokens), the prompt "
                                 f"format and the answer ({n_answer})")
        spans = self._spans(complete_only=False)
        self._sync(spans)
        cut = len(q) if self._answer_at is None else self._answer_at
        query = self.lm.tokenizer.decode(q[:cut].tolist()).strip()
        retrieved = self._retrieve(query, spans, len(spans), self.config.budget or room)
        return torch.cat([head, retrieved, mid, q[:cut], tail, q[cut:]])

    @torch.no_grad()
    def generate_chunk(self, n: int, context_len: int, sampler: Sampler, cache_reuse: bool = True) -> torch.Tensor:
        """Sample n tokens: the answer to the question handed over (the next call continues it), or, without a
        question, the continuation of the history with retrieved chunks and the last `context_len` tokens in
        view. The context is assembled anew for every call (`cache_reuse` does not apply)."""
        if context_len + n > self.window:
            raise InfinictxError(f"context L_x={context_len} + chunk {n} exceeds the window W={self.window}")
        if self._question is not None:
            prompt = self._question_prompt(n)
        else:
            prompt = self._context(self.window - n, context_len)
        if len(prompt) == 0:
            raise InfinictxError("generation needs a non-empty prompt")
        recent = self.history[-self.window:] if self._question is None else prompt
        out = self.sample_after(prompt, n, sampler, recent)
        if self._question is not None:
            self._question = torch.cat([self._question, out])
        return out

    # --- fork, resume, clean-up ----------------------------------------------------------------------
    def fork(self) -> "RagSession":
        """An independent session in the same state (the retrieval harness reads a shared prefix once)."""
        if not self.capabilities.fork:
            raise InfinictxError("a session with Temp-Lora on top cannot be forked")
        other = copy.copy(self)
        other.meter = copy.deepcopy(self.meter)
        other.history = self.history.clone()
        other.retriever = self.retriever.copy()
        other._texts = dict(self._texts)
        return other

    def state_dict(self) -> dict:
        return {**super().state_dict(), "retriever": self.retriever.state(), "question": self._question,
                "answer_at": self._answer_at}

    def load_state_dict(self, state: dict, history: torch.Tensor):
        super().load_state_dict(state, history)
        self.retriever.load(state["retriever"])
        self._question = state.get("question")
        self._answer_at = state.get("answer_at")

    def kv_bytes(self) -> int:
        """Bytes RAG holds of what it read: its index (embeddings, BM25 matrix) of every complete chunk (indexed
        now if a batch was pending); no keys and values."""
        self._sync(self._spans(complete_only=True))
        return self.retriever.nbytes()

    def shown_spans(self) -> list[tuple[int, int]]:
        """The spans of the history the last prompt showed (benchmarks measure whether the evidence was among
        them)."""
        return list(self.last_retrieval["passages"]) if self.last_retrieval else []
