"""A session: one model reading one long token stream, chunk by chunk.

Every method turns a loaded model into a session. The harness (perplexity, generation, retrieval, cost) only
uses this interface, so it drives any method without knowing which one is inside:

  score(chunk)              NLL of each token of `chunk`, given what the session can see of the past
  absorb(chunk)             append `chunk` to the past (an attached learner then learns from it)
  score_and_absorb(chunk)   both, in that order; a method may fuse them when that gives the same result
  generate_chunk(n, ...)    sample the next n tokens
  capabilities              what else the session offers (bytes held, fork, end of prompt, question, base variant)
  state_dict() / load_state_dict(state, history)   resume a long run

A **learner** (Temp-Lora, `infinictx.learners`) attaches to any session with `attach`: its model (the base
wrapped with an adapter) runs every forward from then on, and it learns from each absorbed chunk through one
hook (`learn`), whatever the method keeps of the past.

This base class is the plain sliding window: the model sees the last W tokens and nothing else. `StatefulSession`
is the base of the methods that keep a per-layer state of the past (a KV cache under a policy, a memory)."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cost import CostMeter, ModelShape
from .errors import InfinictxError, check_finite
from .models import LoadedModel
from .registry import settings_of


def check_window(window: int, chunk: int):
    if window < 2 or chunk < 1:
        raise InfinictxError(f"window ({window}) must be >= 2 and chunk ({chunk}) >= 1")
    if chunk >= window:
        raise InfinictxError(f"chunk Δ={chunk} must be smaller than the window W={window} "
                             "(each chunk is read with the W−Δ tokens before it)")


@dataclass(frozen=True)
class Capabilities:
    """What a session offers beyond score / absorb / generate; the harness asks here instead of probing."""

    kv_bytes: bool = False      # kv_bytes(): bytes held between steps of what was read (keys and values, a
                                # memory, a retrieval index)
    fork: bool = False          # fork(): an independent session in the same state (read a shared prefix once)
    end_prompt: bool = False    # end_prompt() changes the state (a policy compresses once the prompt is in)
    question: bool = False      # question(tokens, answer_at=None): the session reads a retrieval question itself
                                # (RAG's query; answer_at: where its given answer beginning starts);
                                # shown_spans(): the spans of the history its last prompt showed
    base_variant: bool = False  # score(chunk, base=True) differs from score(chunk): the method switched off
    snapshot: bool = False      # snapshot() / restore(state): go back to a state read earlier (a session that
                                # cannot fork, e.g. with an adapter, still reads a shared prefix once)


@dataclass
class Sampler:
    """Next-token choice for generation. Defaults follow Temp-Lora's code: greedy, repetition penalty 1.12,
    EOS banned so that every chunk has exactly Δ tokens."""

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.12
    ban_eos: bool = True
    seed: int = 0
    stop_at_eos: bool = False   # end the chunk early at an end-of-sequence token (a chat reply); else exactly n

    def done(self, token: int, eos_ids: list[int]) -> bool:
        return self.stop_at_eos and token in eos_ids

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor, recent: torch.Tensor, eos_ids: list[int]) -> int:
        logits = logits.float().cpu().clone()
        if self.repetition_penalty != 1.0 and recent.numel():
            seen = recent.unique()
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / self.repetition_penalty, picked * self.repetition_penalty)
        if self.ban_eos and eos_ids:
            logits[eos_ids] = float("-inf")
        if self.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < self.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))


class Session:
    """Plain sliding window over the stream (the `window` method, and the base every method builds on)."""

    # Scoring is one plain forward over the last W−Δ tokens and the chunk (a learner may make that forward its
    # first training step too); False for sessions that score from a state of their own.
    scores_by_forward = True

    def __init__(self, lm: LoadedModel, config, window: int, chunk: int):
        check_window(window, chunk)
        self.lm, self.model, self.device = lm, lm.model, lm.device
        self.config = config        # the settings the session was made from (reports, a run's key)
        self.method = getattr(config, "method", "window")
        self.window, self.chunk = window, chunk
        self.learner = None
        self.history = torch.empty(0, dtype=torch.long)
        self.meter = CostMeter(ModelShape.from_config(lm.model.config), lm.device)
        self._gen_cache = None       # KV cache kept between generated chunks
        self._gen_cache_len = 0      # tokens inside it
        self._gen_fed_upto = 0       # history position up to which the cache has seen the tokens
        eos = lm.tokenizer.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])

    # --- what a method declares ------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        # a learner's base variant: the same window with the adapter switched off
        return Capabilities(base_variant=self.learner is not None, snapshot=True)

    def snapshot(self) -> dict:
        """The state after what has been read (history, cost so far, the learner's adapter and optimizer)."""
        return {"history": self.history.clone(), "meter": copy.deepcopy(self.meter),
                "learner": self.learner.snapshot() if self.learner is not None else None}

    def restore(self, state: dict):
        """Back to a `snapshot`: what was read after it is forgotten, the adapter is as it was then."""
        self.history = state["history"].clone()
        self.meter = copy.deepcopy(state["meter"])
        self._gen_cache, self._gen_cache_len, self._gen_fed_upto = None, 0, 0
        if self.learner is not None:
            self.learner.restore(state["learner"])

    @property
    def min_text_tokens(self) -> int:
        """A stream must be longer than this for streaming perplexity to mean anything: the window."""
        return self.window

    @property
    def lora_rank(self) -> float:
        """Rank of any adapter active in forwards, for FLOP accounting (scaled by the share of layers adapted)."""
        return self.learner.flop_rank if self.learner is not None else 0

    @property
    def chunks_trained(self) -> int:
        return self.learner.chunks_trained if self.learner is not None else 0

    def base_model_context(self):
        """Context manager under which forwards run the unmodified base model."""
        return self.learner.base_model() if self.learner is not None else nullcontext()

    def end_prompt(self):
        """The prompt is in and answering starts (a policy that compresses after a dense prefill does it now)."""

    def details(self) -> dict:
        """What the session derived from its settings (resolved sizes, chosen heads): shown beside them."""
        return self.learner.details(self) if self.learner is not None else {}

    def describe(self) -> dict:
        """The settings (from the config: none can be left out) and what was derived from them."""
        return {**settings_of(self.config), **self.details()}

    # --- learners --------------------------------------------------------------------------------------
    def attach(self, learner):
        """Let `learner` learn from every absorbed chunk; its model (the base model wrapped with the learner's
        adapter) runs every forward from now on."""
        self.learner = learner
        self.model = learner.model

    def _learn(self, n: int):
        if self.learner is not None:
            self.learner.learn(self, n)

    # --- reading -----------------------------------------------------------------------------------------
    def absorb(self, chunk: torch.Tensor):
        """Append `chunk` to the past; an attached learner learns from it."""
        self._read(chunk)
        self._learn(len(chunk))

    def add_context(self, tokens: torch.Tensor):
        """Append tokens to the past without learning from them (e.g. a prompt that fits in the window)."""
        self._read(tokens)

    def _read(self, tokens: torch.Tensor):
        """The method's own part of absorbing: here, the window only keeps the tokens as history."""
        self.history = torch.cat([self.history, tokens.cpu()])

    # --- scoring -------------------------------------------------------------------------------------
    def chunk_nll(self, context: torch.Tensor, chunk: torch.Tensor, mst=None,
                  targets: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token NLL of `chunk` after `context`, as a graph (callers choose no_grad or not). The input is
        context + chunk[:-1]; logits are computed only where a chunk token is predicted, because the LM head
        (49K-word vocabulary) would otherwise dominate the cost. At the stream start (no context) the first
        token has no prediction and is not scored. `targets` (a boolean mask over the scored tokens) keeps only
        those tokens' NLLs, and logits only where they are predicted. With `mst` (an MSTConfig) and gradients
        on, the forward runs the Mini-Sequence way: the same NLLs and gradients, never all logits or MLP
        activations at once."""
        ids = torch.cat([context, chunk]).to(self.device)
        n_targets = len(chunk) if len(context) else len(chunk) - 1
        inputs = ids[:-1][None]
        labels = ids[-n_targets:]
        if mst is not None and torch.is_grad_enabled():
            from ..training.mst import causal_lm_nll

            self.meter.add_forward(inputs.shape[1], 0, n_targets, self.lora_rank)
            nll = causal_lm_nll(self.model, inputs, labels[None], mst)[0]
            return nll if targets is None else nll[targets.to(nll.device)]
        keep: int | torch.Tensor = n_targets
        if targets is not None:
            where = torch.nonzero(targets.to(self.device)).flatten()
            keep, labels = where + (inputs.shape[1] - n_targets), labels[where]
        self.meter.add_forward(inputs.shape[1], 0, len(labels), self.lora_rank)
        # squeeze, not [0]: the backward of a select fills a zero tensor the logits' size first
        logits = self.model(input_ids=inputs, logits_to_keep=keep, use_cache=False).logits.squeeze(0)
        return F.cross_entropy(logits.float(), labels, reduction="none")

    def score_context(self, base: bool = False) -> torch.Tensor:
        """What a scored chunk is read after: the last W − Δ tokens (`base`: the context of the method switched
        off, the same here; a method that assembles its context, such as RAG, differs)."""
        n = self.window - self.chunk
        return self.history[-n:] if n and len(self.history) else self.history[:0]

    def check_nll(self, nll: torch.Tensor):
        check_finite(nll, lambda: f"the model produced a non-finite NLL at token {len(self.history)}")

    @torch.no_grad()
    def score(self, chunk: torch.Tensor, base: bool = False) -> torch.Tensor:
        phase = "base_scoring" if base else "scoring"
        with self.meter.phase(phase), (self.base_model_context() if base else nullcontext()):
            nll = self.chunk_nll(self.score_context(base), chunk).cpu()
        self.check_nll(nll)
        return nll

    def score_and_absorb(self, chunk: torch.Tensor, compare_base: bool = False):
        """Score `chunk` (and, if asked, score it with the method switched off on identical inputs), then
        absorb it. Returns (nll, base_nll or None); without a base variant the base is the score itself."""
        base = self.score(chunk, base=True) if compare_base and self.capabilities.base_variant else None
        if self.learner is not None and self.learner.fuses_with(self, chunk):
            nll = self.learner.score_and_learn(self, chunk)
        else:
            nll = self._score_and_read(chunk)
            self._learn(len(chunk))
        if compare_base and base is None:
            base = nll.clone()
        return nll, base

    def _score_and_read(self, chunk: torch.Tensor) -> torch.Tensor:
        nll = self.score(chunk)
        self._read(chunk)
        return nll

    # --- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_chunk(self, n: int, context_len: int, sampler: Sampler, cache_reuse: bool = True) -> torch.Tensor:
        """Sample n tokens conditioned on the last `context_len` tokens of the history.

        With `cache_reuse` the KV cache of the previous chunk is kept, even though a learner may have changed
        its weights since (Temp-Lora's "cache reuse"); it is rebuilt from the last `context_len` tokens with the
        current weights only when the window would overflow. Without it every chunk re-encodes its context."""
        from transformers import DynamicCache

        if context_len + n > self.window:
            raise InfinictxError(f"context L_x={context_len} + chunk {n} exceeds the window W={self.window}")
        pending = self.history[self._gen_fed_upto:]
        reuse = (cache_reuse and self._gen_cache is not None
                 and self._gen_cache_len + len(pending) + n - 1 <= self.window)
        if not reuse:
            self._gen_cache = DynamicCache(config=self.model.config)
            self._gen_cache_len = 0
            pending = self.history[-context_len:] if context_len else self.history[:0]
        if len(pending) == 0:
            raise InfinictxError("generation needs a non-empty prompt")
        out = self._sample_loop(pending, n, sampler, self.history[-self.window:])
        self.meter.tokens["generated"] += len(out)
        # The cache now covers everything up to, not including, the last sampled token.
        self._gen_fed_upto = len(self.history) + len(out) - 1
        return out

    def _sample_loop(self, feed: torch.Tensor, n: int, sampler: Sampler, recent: torch.Tensor) -> torch.Tensor:
        """Feed `feed` after what the generation cache holds, then sample n tokens one by one (`recent`: the
        tokens the repetition penalty sees besides those sampled)."""
        out = []
        with self.meter.phase("generation"):
            for _ in range(n):
                logits = self.model(input_ids=feed.to(self.device)[None], past_key_values=self._gen_cache,
                                    use_cache=True, logits_to_keep=1).logits[0, -1]
                self.meter.add_forward(len(feed), self._gen_cache_len, 1, self.lora_rank)
                self._gen_cache_len += len(feed)
                token = sampler(logits, torch.cat([recent, torch.tensor(out, dtype=torch.long)]), self.eos_ids)
                out.append(token)
                if sampler.done(token, self.eos_ids):
                    break
                feed = torch.tensor([token], dtype=torch.long)
        return torch.tensor(out, dtype=torch.long)

    @torch.no_grad()
    def sample_after(self, prompt: torch.Tensor, n: int, sampler: Sampler, recent: torch.Tensor) -> torch.Tensor:
        """Sample n tokens after `prompt` alone, with a cache of its own (a method that assembles its prompt,
        such as RAG); the history and the generation cache of `generate_chunk` are left as they were."""
        from transformers import DynamicCache

        kept = self._gen_cache, self._gen_cache_len
        self._gen_cache, self._gen_cache_len = DynamicCache(config=self.model.config), 0
        try:
            out = self._sample_loop(prompt, n, sampler, recent)
        finally:
            self._gen_cache, self._gen_cache_len = kept
        self.meter.tokens["generated"] += len(out)
        return out

    # --- resume and clean-up -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"meter": self.meter.state_dict()}
        if self.learner is not None:
            state.update(self.learner.state_dict())
        return state

    def load_state_dict(self, state: dict, history: torch.Tensor):
        self.meter.load_state_dict(state["meter"])
        self.history = history.clone()
        if self.learner is not None:
            self.learner.load_state_dict(state)

    def close(self):
        """Free what the session holds; a learner discards its adapter and the model is back as it was."""
        self._gen_cache = None
        if self.learner is not None:
            self.learner.close()
            self.learner = None
            self.model = self.lm.model

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class StatefulSession(Session):
    """A session that keeps its own per-layer state of the past (a FoT memory, a KV cache under a policy) and
    runs every token through the model once. Subclasses implement `_process(tokens, commit, all_logits)`: run
    `tokens` after everything processed so far and return their logits (all, or the last position's); with
    commit=False the state of the past stays as it was. Scoring, absorbing and generation are built on it here.
    A subclass that keeps more state than `__dict__` shares on a shallow copy overrides `_fork_state`."""

    scores_by_forward = False

    def __init__(self, lm: LoadedModel, config, window: int, chunk: int):
        super().__init__(lm, config, window, chunk)
        self._last_logits = None   # logits after the last processed token: they predict the next one
        self._ahead = 0            # generated tokens already processed but not yet absorbed into the history

    @property
    def capabilities(self) -> Capabilities:
        # a learner's adapter state cannot be shared by two sessions, so a session with one does not fork
        return Capabilities(kv_bytes=True, fork=self.learner is None)

    def _process(self, tokens: torch.Tensor, commit: bool, all_logits: bool) -> torch.Tensor:
        raise NotImplementedError

    def kv_bytes(self) -> int:
        raise NotImplementedError

    def _scored(self, chunk: torch.Tensor, commit: bool) -> torch.Tensor:
        """Per-token NLL of `chunk` after everything processed so far (processing it, committed or not)."""
        previous = self._last_logits  # predicts chunk[0]; _process replaces it when it commits
        logits = self._process(chunk, commit=commit, all_logits=True)
        if commit:
            self._last_logits = logits[-1].float()
        chunk = chunk.to(logits.device)
        if previous is None:  # stream start: the first token has no prediction
            return F.cross_entropy(logits[:-1].float(), chunk[1:], reduction="none")
        preds = torch.cat([previous[None].to(logits.dtype), logits[:-1]])
        return F.cross_entropy(preds.float(), chunk, reduction="none")

    @torch.no_grad()
    def score(self, chunk: torch.Tensor, base: bool = False) -> torch.Tensor:
        if base and self.capabilities.base_variant:  # the plain window over the same W−Δ tokens, base model
            return super().score(chunk, base=True)
        with self.meter.phase("scoring"):
            nll = self._scored(chunk, commit=False).cpu()
        self.check_nll(nll)
        return nll

    @torch.no_grad()
    def _score_and_read(self, chunk: torch.Tensor) -> torch.Tensor:
        with self.meter.phase("scoring"):  # one forward scores the chunk and commits it to the state
            nll = self._scored(chunk, commit=True).cpu()
        self.check_nll(nll)
        self.history = torch.cat([self.history, chunk.cpu()])
        return nll

    @torch.no_grad()
    def _read(self, chunk: torch.Tensor):
        chunk = chunk.cpu()
        skip = min(self._ahead, len(chunk))  # generated tokens were processed while they were generated
        self._ahead -= skip
        self.history = torch.cat([self.history, chunk])
        rest = chunk[skip:]
        with self.meter.phase("absorbing"):
            for s in range(0, len(rest), self.chunk):
                logits = self._process(rest[s:s + self.chunk], commit=True, all_logits=False)
                self._last_logits = logits[-1].float()

    @torch.no_grad()
    def generate_chunk(self, n: int, context_len: int, sampler: Sampler, cache_reuse: bool = True) -> torch.Tensor:
        """Sample n tokens after everything absorbed so far (`context_len` and `cache_reuse` do not apply: the
        session's own state is always reused)."""
        if self._last_logits is None:
            raise InfinictxError("generation needs a non-empty prompt")
        self.end_prompt()
        out = []
        recent = self.history[-self.window:]
        with self.meter.phase("generation"):
            for _ in range(n):
                token = sampler(self._last_logits, torch.cat([recent, torch.tensor(out, dtype=torch.long)]),
                                self.eos_ids)
                out.append(token)
                self._last_logits = self._process(torch.tensor([token]), commit=True, all_logits=False)[-1].float()
                if sampler.done(token, self.eos_ids):
                    break
        self._ahead += len(out)
        self.meter.tokens["generated"] += len(out)
        return torch.tensor(out, dtype=torch.long)

    def fork(self) -> "StatefulSession":
        """An independent session in the same state: both can go on reading different continuations (the
        retrieval harness reads a shared prompt prefix once)."""
        if not self.capabilities.fork:
            raise InfinictxError("a session with Temp-Lora on top cannot be forked")
        other = copy.copy(self)   # shares the model and read-only parts; what changes is replaced below
        other.meter = copy.deepcopy(self.meter)
        other.history = self.history.clone()
        self._fork_state(other)
        return other

    def _fork_state(self, other: "StatefulSession"):
        """Give `other` its own copy of the method's state of the past."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ahead": self._ahead, "last_logits": self._last_logits}

    def load_state_dict(self, state: dict, history: torch.Tensor):
        super().load_state_dict(state, history)
        self._ahead, self._last_logits = state["ahead"], state["last_logits"]
