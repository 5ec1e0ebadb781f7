"""A session: one model reading one long token stream, chunk by chunk.

Every method turns a loaded model into a session. The harness (perplexity, generation, cost) only uses this
interface, so it drives any method without knowing which one is inside:

  score(chunk)              NLL of each token of `chunk`, given what the session can see of the past
  absorb(chunk)             append `chunk` to the past (a method may also learn from it here)
  score_and_absorb(chunk)   both, in that order; a method may fuse them when that gives the same result
  generate_chunk(n, ...)    sample the next n tokens
  state_dict() / load_state_dict(state, history)   resume a long run

This base class is the plain sliding window: the model sees the last W tokens and nothing else."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cost import CostMeter, ModelShape
from .errors import InfinictxError
from .models import LoadedModel


def check_window(window: int, chunk: int):
    if window < 2 or chunk < 1:
        raise InfinictxError(f"window ({window}) must be >= 2 and chunk ({chunk}) >= 1")
    if chunk >= window:
        raise InfinictxError(f"chunk Δ={chunk} must be smaller than the window W={window} "
                             "(each chunk is read with the W−Δ tokens before it)")


@dataclass
class Sampler:
    """Next-token choice for generation. Defaults follow Temp-Lora's code: greedy, repetition penalty 1.12,
    EOS banned so that every chunk has exactly Δ tokens."""

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.12
    ban_eos: bool = True
    seed: int = 0

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

    method = "window"
    lora_rank = 0  # rank of any adapter active in forwards, for FLOP accounting
    mst = None     # an MSTConfig: training forwards (with gradients) run the Mini-Sequence way

    def __init__(self, lm: LoadedModel, window: int, chunk: int):
        check_window(window, chunk)
        self.lm, self.model, self.device = lm, lm.model, lm.device
        self.window, self.chunk = window, chunk
        self.history = torch.empty(0, dtype=torch.long)
        self.meter = CostMeter(ModelShape.from_config(lm.model.config), lm.device)
        self._gen_cache = None       # KV cache kept between generated chunks
        self._gen_cache_len = 0      # tokens inside it
        self._gen_fed_upto = 0       # history position up to which the cache has seen the tokens
        eos = lm.tokenizer.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])

    # --- what a method changes -------------------------------------------------------------------------
    has_base_variant = False  # True when `score(..., base=True)` differs from `score(...)`

    @property
    def min_text_tokens(self) -> int:
        """A stream must be longer than this for streaming perplexity to mean anything: the window."""
        return self.window

    def base_model_context(self):
        """Context manager under which forwards run the unmodified base model."""
        return nullcontext()

    def absorb(self, chunk: torch.Tensor):
        """Append `chunk` to the past; a method may also learn from it."""
        self.add_context(chunk)

    def end_prompt(self):
        """The prompt is in and answering starts (a policy that compresses after a dense prefill does it now)."""

    def add_context(self, tokens: torch.Tensor):
        """Append tokens to the past without learning from them (e.g. a prompt that fits in the window)."""
        self.history = torch.cat([self.history, tokens.cpu()])

    # --- scoring -------------------------------------------------------------------------------------
    def chunk_nll(self, context: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """Per-token NLL of `chunk` after `context`, as a graph (callers choose no_grad or not). The input is
        context + chunk[:-1]; logits are computed only where a chunk token is predicted, because the LM head
        (49K-word vocabulary) would otherwise dominate the cost. At the stream start (no context) the first
        token has no prediction and is not scored."""
        ids = torch.cat([context, chunk]).to(self.device)
        n_targets = len(chunk) if len(context) else len(chunk) - 1
        inputs = ids[:-1][None]
        self.meter.add_forward(inputs.shape[1], 0, n_targets, self.lora_rank)
        if self.mst is not None and torch.is_grad_enabled():
            from .mst import causal_lm_nll  # same NLLs and gradients, never all logits or MLP activations at once

            return causal_lm_nll(self.model, inputs, ids[-n_targets:][None], self.mst)[0]
        logits = self.model(input_ids=inputs, logits_to_keep=n_targets, use_cache=False).logits[0]
        return F.cross_entropy(logits.float(), ids[-n_targets:], reduction="none")

    def score_context(self) -> torch.Tensor:
        n = self.window - self.chunk
        return self.history[-n:] if n and len(self.history) else self.history[:0]

    @torch.no_grad()
    def score(self, chunk: torch.Tensor, base: bool = False) -> torch.Tensor:
        phase = "base_scoring" if base else "scoring"
        with self.meter.phase(phase), (self.base_model_context() if base else nullcontext()):
            nll = self.chunk_nll(self.score_context(), chunk).cpu()
        if not torch.isfinite(nll).all():
            raise InfinictxError(f"the model produced a non-finite NLL at token {len(self.history)}")
        return nll

    def score_and_absorb(self, chunk: torch.Tensor, compare_base: bool = False):
        """Score `chunk` (and, if asked, score it with the method switched off on identical inputs), then
        absorb it. Returns (nll, base_nll or None)."""
        nll = self.score(chunk)
        base = None
        if compare_base:
            base = self.score(chunk, base=True) if self.has_base_variant else nll.clone()
        self.absorb(chunk)
        return nll, base

    # --- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_chunk(self, n: int, context_len: int, sampler: Sampler, cache_reuse: bool = True) -> torch.Tensor:
        """Sample n tokens conditioned on the last `context_len` tokens of the history.

        With `cache_reuse` the KV cache of the previous chunk is kept, even though a method may have changed
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
        out = []
        recent = self.history[-self.window:]
        with self.meter.phase("generation"):
            feed = pending
            for _ in range(n):
                logits = self.model(input_ids=feed.to(self.device)[None], past_key_values=self._gen_cache,
                                    use_cache=True, logits_to_keep=1).logits[0, -1]
                self.meter.add_forward(len(feed), self._gen_cache_len, 1, self.lora_rank)
                self._gen_cache_len += len(feed)
                token = sampler(logits, torch.cat([recent, torch.tensor(out, dtype=torch.long)]), self.eos_ids)
                out.append(token)
                feed = torch.tensor([token], dtype=torch.long)
        self.meter.tokens["generated"] += n
        # The cache now covers everything up to, not including, the last sampled token.
        self._gen_fed_upto = len(self.history) + n - 1
        return torch.tensor(out, dtype=torch.long)

    # --- resume and clean-up -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"meter": self.meter.state_dict()}

    def load_state_dict(self, state: dict, history: torch.Tensor):
        self.meter.load_state_dict(state["meter"])
        self.history = history.clone()

    def describe(self) -> dict:
        return {"window": self.window, "chunk": self.chunk}

    def close(self):
        self._gen_cache = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class StatefulSession(Session):
    """A session that keeps its own per-layer state of the past (a FoT memory, a KV cache under a policy) and
    runs every token through the model once. Subclasses implement `_process(tokens, commit, all_logits)`: run
    `tokens` after everything processed so far and return their logits (all, or the last position's); with
    commit=False the state of the past stays as it was. Scoring, absorbing and generation are built on it here."""

    def __init__(self, lm: LoadedModel, window: int, chunk: int):
        super().__init__(lm, window, chunk)
        self._last_logits = None   # logits after the last processed token: they predict the next one
        self._ahead = 0            # generated tokens already processed but not yet absorbed into the history

    def _process(self, tokens: torch.Tensor, commit: bool, all_logits: bool) -> torch.Tensor:
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

    def _check(self, nll: torch.Tensor):
        if not torch.isfinite(nll).all():
            raise InfinictxError(f"the model produced a non-finite NLL at token {len(self.history)}")

    @torch.no_grad()
    def score(self, chunk: torch.Tensor, base: bool = False) -> torch.Tensor:
        if base:
            return super().score(chunk, base=True)
        with self.meter.phase("scoring"):
            nll = self._scored(chunk, commit=False).cpu()
        self._check(nll)
        return nll

    @torch.no_grad()
    def score_and_absorb(self, chunk: torch.Tensor, compare_base: bool = False):
        base = super().score(chunk, base=True) if compare_base and self.has_base_variant else None
        with self.meter.phase("scoring"):
            nll = self._scored(chunk, commit=True).cpu()
        self._check(nll)
        self.history = torch.cat([self.history, chunk.cpu()])
        if compare_base and base is None:
            base = nll.clone()
        return nll, base

    @torch.no_grad()
    def absorb(self, chunk: torch.Tensor):
        chunk = chunk.cpu()
        skip = min(self._ahead, len(chunk))  # generated tokens were processed while they were generated
        self._ahead -= skip
        self.history = torch.cat([self.history, chunk])
        rest = chunk[skip:]
        with self.meter.phase("absorbing"):
            for s in range(0, len(rest), self.chunk):
                logits = self._process(rest[s:s + self.chunk], commit=True, all_logits=False)
                self._last_logits = logits[-1].float()

    def add_context(self, tokens: torch.Tensor):
        self.absorb(tokens)  # the state has to see everything it is to remember

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
        self._ahead += n
        self.meter.tokens["generated"] += n
        return torch.tensor(out, dtype=torch.long)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ahead": self._ahead, "last_logits": self._last_logits}

    def load_state_dict(self, state: dict, history: torch.Tensor):
        super().load_state_dict(state, history)
        self._ahead, self._last_logits = state["ahead"], state["last_logits"]
