"""Long-document translation (Temp-Lora's second experiment, arXiv 2401.11504 §GuoFeng): translate a document
sentence by sentence, chunk by chunk; after each chunk the temporary adapter trains on it, so the names and style
of the document so far live in the adapter when the next chunk is translated.

The prompt, for a base model, is a parallel text: a header line, then one pair per sentence,

    Chinese: 起初，神创造天地。
    English: In the beginning God created the heaven and the earth.

with the previous chunk's pairs (`context_chunks`, the paper's k1) and the current chunk's pairs so far as context.
A sentence is translated greedily after "English:" (repetition penalty as in the paper's code, over the prompt
and the output), up to the line end. Teacher-forced (the paper's protocol): the target history is the reference,
and the reference's NLL is read in the same pass. Free-running (what a user without references has): the history,
and the adapter's training targets, are the model's own translations; where a reference exists its NLL is still
read after the model's own history. After a chunk, Temp-Lora trains on one sample: the context pairs, unlabelled,
then the chunk's pairs with the loss on the target lines only (`TempLora.train_on`). The window W caps the
prompt: when it would overflow, it is rebuilt from the newest pairs that fill W/2.

The prompt grows by one pair at a time, so it is kept as a KV cache: each sentence costs its own tokens, not a
re-read of the context (the generated tokens are cropped off before the reference or the output is appended).
The cache is rebuilt at each chunk start, with the weights the adapter has then.

Reported: reference perplexity (token-weighted, and the paper's mean of per-sentence PPLs weighted by tokens),
BLEU and chrF (sacrebleu; BLEU's tokenizer chosen for the target language), the same per position bucket along
the document, and the cost. A run writes a checkpoint after every chunk; rerun the same command to resume."""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import InfinictxError
from ..core.files import atomic_write
from ..core.progress import progress_bar
from ..core.registry import setting
from ..core.session import Sampler, Session
from ..data.parallel import LANGUAGES, ParallelDoc
from .base import Outputs, Result, Task, write_summary

TRANSLATE_METHODS = ("window", "temp-lora")


@dataclass
class SentenceResult:
    key: str
    chunk: int
    src: str
    ref: str | None
    hyp: str
    ref_nll: float | None = None    # summed NLL of the reference's tokens
    ref_tokens: int = 0
    confidence: float | None = None   # the output's mean token log-probability (decoded one sentence at a time)


@dataclass
class TranslationSettings:
    free_running: bool = False
    context_chunks: int = 1
    max_new_tokens: int = 256
    repetition_penalty: float = 1.12
    decode: str = "batched"     # teacher-forced: all sentences of a chunk decoded at once ("sequential": one by one)
    train_on_repeats: bool = False   # Temp-Lora on the model's own outputs: train on one that repeats another too
    loss_on: str = "target"     # which lines of Temp-Lora's sample carry the loss: "target" or "source"
    min_confidence: float = 0.0   # free-running: train on an output whose mean token probability is at least this


class PromptCache:
    """The translation prompt as a growing KV cache: feed tokens, read logits, crop back to a length."""

    def __init__(self, session: Session):
        self.session = session
        self.cache = None
        self.tokens: list[int] = []

    def reset(self):
        from transformers import DynamicCache

        # A plain (non-sliding) cache for every layer: the model's masks apply any sliding window, and a plain
        # layer can be cropped back after a generated line.
        self.cache = DynamicCache()
        self.tokens = []
        self._branch_pos: list[int] = []   # positions of the branch tokens cached after the stream

    def rebuild(self, tokens: list[int]) -> torch.Tensor:
        """Start again from `tokens`; the logits of the last one."""
        self.reset()
        return self.feed(tokens, keep=1)

    def feed(self, tokens: list[int], keep: int | list[int] = 1) -> torch.Tensor:
        """Append `tokens`; return the logits (float32, on the CPU) of their last `keep` positions, or of the
        positions listed in `keep` (indices into `tokens`)."""
        s = self.session
        ids = torch.tensor(tokens, dtype=torch.long, device=s.device)[None]
        to_keep = keep if isinstance(keep, int) else torch.tensor(keep, dtype=torch.long, device=s.device)
        logits = s.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=to_keep).logits[0]
        s.meter.add_forward(len(tokens), len(self.tokens), keep if isinstance(keep, int) else len(keep), s.lora_rank)
        self.tokens += tokens
        return logits.float().cpu()

    def feed_branches(self, tokens: list[int], positions: list[int], mask: torch.Tensor) -> torch.Tensor:
        """Append one token per branch at once, each at its own position, each seeing the cached slots `mask`
        allows (rows: the new tokens; columns: every slot, the new ones included); return their logits. The
        tokens go into the cache, but not into `tokens` (the shared stream): crop them off when done."""
        s = self.session
        config = s.model.config
        masks = _additive(mask, s.lm.dtype, s.device)
        layer_types = getattr(config, "layer_types", None) or []
        if "sliding_attention" in layer_types:   # Gemma-3: local layers see the last `sliding_window` positions
            pos = torch.tensor(positions)
            cached = self.cache.get_seq_length()
            key_pos = torch.cat([torch.arange(len(self.tokens)), torch.tensor(self._branch_pos + positions)])
            assert len(key_pos) == cached + len(tokens)
            near = (pos[:, None] - key_pos[None, :]) < config.sliding_window
            masks = {"full_attention": masks, "sliding_attention": _additive(mask & near, s.lm.dtype, s.device)}
        ids = torch.tensor(tokens, dtype=torch.long, device=s.device)[None]
        position_ids = torch.tensor(positions, dtype=torch.long, device=s.device)[None]
        logits = s.model(input_ids=ids, position_ids=position_ids, attention_mask=masks, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=len(tokens)).logits[0]
        s.meter.add_forward(len(tokens), self.cache.get_seq_length() - len(tokens), len(tokens), s.lora_rank)
        self._branch_pos += positions
        return logits.float().cpu()

    def crop(self, length: int):
        """Drop every token after the first `length` (and every branch token)."""
        assert length <= len(self.tokens)
        cached = len(self.tokens) + len(self._branch_pos)
        if length < cached:
            self.cache.crop(length - cached)   # transformers 5: a negative count of tokens to remove
            del self.tokens[length:]
            self._branch_pos = []

    def __len__(self):
        return len(self.tokens)


def _additive(allowed: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """A boolean (queries × keys) mask as the additive 4-D mask attention layers take."""
    out = torch.zeros(allowed.shape, dtype=dtype)
    out.masked_fill_(~allowed, torch.finfo(dtype).min)
    return out[None, None].to(device)


class DocumentTranslator:
    """Translates one `ParallelDoc` with one session (a plain window, Temp-Lora attached or not)."""

    def __init__(self, session: Session, doc: ParallelDoc, settings: TranslationSettings):
        self.session, self.doc, self.settings = session, doc, settings
        tok = session.lm.tokenizer
        self.encode = lambda text: tok(text, add_special_tokens=False).input_ids
        self.decode = tok.decode
        src_name, tgt_name = LANGUAGES[doc.src_lang][0], LANGUAGES[doc.tgt_lang][0]
        self.src_name, self.tgt_name = src_name, tgt_name
        # the special tokens the tokenizer puts at a text's start (Gemma's <bos>; none for SmolLM2)
        self.header = tok("", add_special_tokens=True).input_ids + self.encode(
            f"The following text in {src_name} is translated into {tgt_name}, line by line.\n\n")
        self.window = session.window
        self.sampler = Sampler(temperature=0.0, repetition_penalty=settings.repetition_penalty, ban_eos=False)
        self.prompt = PromptCache(session)
        self.prompt.reset()
        self.history: list[list[tuple[list[int], list[int]]]] = []   # per chunk: (source ids, target ids) pairs
        self.repeats_not_trained = 0
        self.unsure_not_trained = 0

    # --- prompt pieces --------------------------------------------------------------------------------
    def source_ids(self, text: str) -> list[int]:
        return self.encode(f"{self.src_name}: {text}\n{self.tgt_name}:")

    def target_ids(self, text: str) -> list[int]:
        return self.encode(f" {text}\n")

    def fitted(self, pairs: list[tuple[list[int], list[int]]], budget: int) -> list[tuple[list[int], list[int]]]:
        """The newest pairs whose tokens fit in `budget`."""
        kept, used = [], 0
        for s, t in reversed(pairs):
            if used + len(s) + len(t) > budget:
                break
            kept.append((s, t))
            used += len(s) + len(t)
        return kept[::-1]

    def context_pairs(self) -> list[tuple[list[int], list[int]]]:
        k = self.settings.context_chunks
        return [p for chunk in (self.history[-k:] if k else []) for p in chunk]

    @staticmethod
    def flat(pairs) -> list[int]:
        return [t for s, tt in pairs for t in s + tt]

    # --- one chunk ----------------------------------------------------------------------------------
    def limit(self, src: list[int]) -> int:
        return min(self.settings.max_new_tokens, 2 * len(src) + 32)

    def need(self, pair, src: list[int], ref: list[int] | None) -> int:
        """Tokens a sentence needs after the prompt so far: its source line and room for its translation (or its
        reference, if longer)."""
        need = len(src) + max(self.limit(src), len(ref) if ref else 0) + 1
        if len(self.header) + need > self.window:
            raise InfinictxError(f"{pair.key}: the sentence and its translation room ({need} tokens) do not fit in "
                                 f"the window W={self.window}; raise -W")
        return need

    @torch.no_grad()
    def translate_chunk(self, index: int, chunk, learn: bool = True) -> list[SentenceResult]:
        """Translate one chunk, then (`learn`: not after a document's last chunk, where nothing would use it)
        let Temp-Lora train on it."""
        context = self.context_pairs()
        teacher_forced = not self.settings.free_running and all(p.ref is not None for p in chunk)
        with self.session.meter.phase("translation"):
            if teacher_forced and self.settings.decode == "batched":
                out, current = self._chunk_batched(index, chunk, context)
            else:
                out, current = self._chunk_sequential(index, chunk, context)
        if learn:
            self.learn(context, current, own_targets=not teacher_forced, confidence=[r.confidence for r in out])
        self.history.append(current)
        return out

    def _chunk_sequential(self, index: int, chunk, context):
        """One sentence after the other: feed its source line, decode, crop, append the reference or the output."""
        budget = self.window // 2
        current: list[tuple[list[int], list[int]]] = []
        self.prompt.rebuild(self.header + self.flat(self.fitted(context, budget)))
        out = []
        for pair in chunk:
            src = self.source_ids(pair.src)
            ref = self.target_ids(pair.ref) if pair.ref is not None else None
            if len(self.prompt) + self.need(pair, src, ref) > self.window:
                self.prompt.rebuild(self.header + self.flat(self.fitted(context + current, budget)))
            last = self.prompt.feed(src)[-1]
            start = len(self.prompt)
            hyp_ids, logprob = self.greedy(last, self.limit(src))
            self.prompt.crop(start)
            result = SentenceResult(pair.key, index, pair.src, pair.ref, self.line(hyp_ids), confidence=logprob)
            if ref is not None:
                logits = self.prompt.feed(ref, keep=len(ref))
                result.ref_nll, result.ref_tokens = self.nll(pair, torch.cat([last[None], logits[:-1]]), ref), len(ref)
            if self.settings.free_running or ref is None:
                target = self.target_ids(result.hyp)
                self.prompt.crop(start)
                self.prompt.feed(target)
            else:
                target = ref
            current.append((src, target))
            out.append(result)
        return out, current

    def _chunk_batched(self, index: int, chunk, context):
        """Teacher-forced, the same translations as `_chunk_sequential`, faster: the outputs do not enter the
        prompt, so each group of sentences that shares one prompt is read in one pass (which also scores every
        reference) and all its sentences are then decoded at once, one branch per sentence, each branch seeing the
        prompt up to its own source line. The LM head's weights are read once per step for every branch, not once
        per token of each."""
        budget = self.window // 2
        pieces = [(p, self.source_ids(p.src), self.target_ids(p.ref)) for p in chunk]
        current: list[tuple[list[int], list[int]]] = []
        out = []
        i = 0
        while i < len(pieces):
            # a group: the sentences the sequential path reads without rebuilding its prompt
            prefix = self.header + self.flat(self.fitted(context + current, budget) if current
                                             else self.fitted(context, budget))
            group, length = [], len(prefix)
            while i + len(group) < len(pieces):
                pair, src, ref = pieces[i + len(group)]
                if group and length + self.need(pair, src, ref) > self.window:
                    break
                self.need(pair, src, ref)
                group.append((pair, src, ref))
                length += len(src) + len(ref)
            stream, starts, keep = list(prefix), [], []
            for pair, src, ref in group:
                stream += src
                starts.append(len(stream))
                keep += range(len(stream) - 1, len(stream) + len(ref) - 1)   # positions predicting ref's tokens
                stream += ref
            logits = self._read(stream, keep)
            firsts, o = [], 0
            for (pair, src, ref), start in zip(group, starts):
                preds = logits[o:o + len(ref)]
                o += len(ref)
                firsts.append(preds[0])
                out.append(SentenceResult(pair.key, index, pair.src, pair.ref, "", self.nll(pair, preds, ref),
                                          len(ref)))
            hyps = self.greedy_branches(firsts, starts, [self.limit(src) for _, src, _ in group])
            for result, hyp_ids in zip(out[len(out) - len(group):], hyps):
                result.hyp = self.line(hyp_ids)
            current += [(src, ref) for _, src, ref in group]
            i += len(group)
        return out, current

    def _read(self, stream: list[int], keep: list[int], piece: int = 1024) -> torch.Tensor:
        """Rebuild the prompt from `stream`, read in pieces (bounded attention memory); the logits at `keep`."""
        parts = []
        self.prompt.reset()
        keep_t = torch.tensor(keep, dtype=torch.long)
        for s in range(0, len(stream), piece):
            e = min(len(stream), s + piece)
            here = keep_t[(keep_t >= s) & (keep_t < e)] - s
            logits = self.prompt.feed(stream[s:e], keep=here.tolist()) if len(here) else self.prompt.feed(stream[s:e])
            if len(here):
                parts.append(logits)
        return torch.cat(parts)

    def nll(self, pair, preds: torch.Tensor, ref: list[int]) -> float:
        nll = F.cross_entropy(preds, torch.tensor(ref), reduction="sum")
        if not torch.isfinite(nll):
            raise InfinictxError(f"{pair.key}: the model produced a non-finite NLL")
        return float(nll)

    def line(self, ids: list[int]) -> str:
        return self.decode(ids, skip_special_tokens=True).split("\n")[0].strip()

    def greedy(self, logits: torch.Tensor, limit: int) -> tuple[list[int], float]:
        """Greedy tokens after the prompt, up to the first line end (or EOS, or `limit` tokens), and their mean
        log-probability under the model (before the repetition penalty, which may pick a token the model doubts)."""
        out: list[int] = []
        logprob = 0.0
        recent = torch.tensor(self.prompt.tokens, dtype=torch.long)
        while len(out) < limit:
            token = self.sampler(logits, torch.cat([recent, torch.tensor(out, dtype=torch.long)]), [])
            if token in self.session.eos_ids:
                break
            out.append(token)
            logprob += float(torch.log_softmax(logits.float(), -1)[token])
            if "\n" in self.decode([token]):
                break
            logits = self.prompt.feed([token])[-1]
        self.session.meter.tokens["generated"] += len(out)
        return out, logprob / max(1, len(out))

    def greedy_branches(self, firsts: list[torch.Tensor], starts: list[int], limits: list[int]) -> list[list[int]]:
        """`greedy` for several prompts at once: branch b continues the cached stream's first starts[b] tokens
        (`firsts[b]`: the logits there). Each step feeds the last token of every unfinished branch in one forward,
        at the branch's own position, attending to its prompt and its own tokens only."""
        stream = torch.tensor(self.prompt.tokens, dtype=torch.long)
        base = len(stream)
        outs: list[list[int]] = [[] for _ in starts]
        logits = dict(enumerate(firsts))
        owner: list[int] = []          # branch of each cached branch token
        while logits:
            feed, positions = [], []
            for b, lg in logits.items():
                out = outs[b]
                if len(out) >= limits[b]:
                    continue
                token = self.sampler(lg, torch.cat([stream[:starts[b]], torch.tensor(out, dtype=torch.long)]), [])
                if token in self.session.eos_ids:
                    continue
                out.append(token)
                if "\n" in self.decode([token]) or len(out) >= limits[b]:
                    continue
                feed.append((b, token))
                positions.append(starts[b] + len(out) - 1)
            if not feed:
                break
            owner += [b for b, _ in feed]
            own = torch.tensor(owner)
            rows = torch.tensor([b for b, _ in feed])
            prompt_part = torch.arange(base)[None, :] < torch.tensor([starts[b] for b, _ in feed])[:, None]
            branch_part = own[None, :] == rows[:, None]
            # a branch token sees its earlier tokens and itself, not its later ones (none exist yet in this step,
            # but the new tokens of this step are one per branch, so "same branch" is exactly causal)
            step = self.prompt.feed_branches([t for _, t in feed], positions,
                                             torch.cat([prompt_part, branch_part], dim=1))
            logits = {b: step[k] for k, (b, _) in enumerate(feed)}
        self.prompt.crop(base)
        self.session.meter.tokens["generated"] += sum(len(o) for o in outs)
        return outs

    def learn(self, context, current, own_targets: bool = False, confidence: list[float | None] | None = None):
        """Temp-Lora's step after a chunk: the context pairs unlabelled, then the chunk's pairs with the loss on
        the target lines only (`loss_on="source"`: the source lines). Own targets: not on repeats (unless
        `train_on_repeats`), nor on outputs less confident than `min_confidence` (`confidence`: each output's mean
        token log-probability)."""
        if self.session.learner is None or not current:
            return
        if self.settings.loss_on == "source":
            # the source lines are the only text of a free-running document that is surely right
            mask = [m for s, t in current for m in [True] * len(s) + [False] * len(t)]
            return self._train(context, current, mask)
        labelled = [True] * len(current)
        if own_targets and not self.settings.train_on_repeats:
            # A small model falls into loops (the same line for verse after verse). Trained on, a loop becomes the
            # adapter's answer to every sentence (Judges, Gemma-3-270M: one line for all of chapters 2-10), so an
            # output that repeats another in the chunk or its context stays in the sample without a loss.
            counts = Counter(tuple(t) for _, t in context + current)
            labelled = [counts[tuple(t)] == 1 for _, t in current]
            self.repeats_not_trained += labelled.count(False)
        if own_targets and self.settings.min_confidence > 0:
            # Self-training's usual filter: an output the model doubts (the repetition penalty forced it off its
            # choice, or the adapter has drifted) would teach the next adapter that doubt as a certainty.
            floor = math.log(self.settings.min_confidence)
            unsure = [c is None or c < floor for c in confidence or [None] * len(current)]
            self.unsure_not_trained += sum(u and keep for u, keep in zip(unsure, labelled))
            labelled = [keep and not u for keep, u in zip(labelled, unsure)]
        if not any(labelled):
            return
        self._train(context, current, [m for (s, t), keep in zip(current, labelled)
                                       for m in [False] * len(s) + [keep] * len(t)])

    def _train(self, context, current, mask: list[bool]):
        """A chunk longer than the window trains in pieces, each after the tokens before it."""
        learner = self.session.learner
        piece = self.flat(current)
        before = self.header + self.flat(self.fitted(context, max(0, self.window - len(self.header) - len(piece))))
        step = max(1, self.window // 2)
        for s in range(0, len(piece), step):
            part = piece[s:s + step]
            prior = (before + piece[:s])[-(self.window - len(part)):] if self.window > len(part) else []
            learner.train_on(self.session, torch.tensor(prior, dtype=torch.long),
                             torch.tensor(part, dtype=torch.long), torch.tensor(mask[s:s + step]))

    # --- resume ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"history": self.history, "session": self.session.state_dict(),
                "repeats_not_trained": self.repeats_not_trained, "unsure_not_trained": self.unsure_not_trained}

    def load_state_dict(self, state: dict):
        self.history = state["history"]
        self.repeats_not_trained = state["repeats_not_trained"]
        self.unsure_not_trained = state.get("unsure_not_trained", 0)   # absent in checkpoints that predate it
        self.session.load_state_dict(state["session"], torch.empty(0, dtype=torch.long))


# --- metrics --------------------------------------------------------------------------------------------
def ref_ppl(sentences: list[SentenceResult]) -> dict:
    """Token-weighted perplexity exp(ΣNLL / Σn), and the paper's formula: per-sentence PPLs averaged with token
    weights, Σ n_i·exp(NLL_i / n_i) / Σ n_i."""
    scored = [s for s in sentences if s.ref_tokens]
    if not scored:
        return {}
    n = sum(s.ref_tokens for s in scored)
    return {"ref_ppl": math.exp(sum(s.ref_nll for s in scored) / n),
            "ref_ppl_sentence_weighted": sum(s.ref_tokens * math.exp(s.ref_nll / s.ref_tokens) for s in scored) / n,
            "ref_tokens": n}


def scorers(tgt_lang: str) -> dict:
    """sacrebleu's metrics for a target language: BLEU with its tokenizer (`zh` for Chinese, 13a otherwise), chrF."""
    import sacrebleu

    return {"bleu": sacrebleu.BLEU(tokenize=LANGUAGES[tgt_lang][1]), "chrf": sacrebleu.CHRF()}


def as_scored(hyps: list[str], tgt_lang: str) -> list[str]:
    """Hypotheses as they are scored: a Chinese output in simplified script, as the references are (a
    traditional-script output is not wrong)."""
    if tgt_lang != "zh":
        return hyps
    from ..data.parallel import to_simplified

    return to_simplified(hyps)


def quality(sentences: list[SentenceResult], tgt_lang: str) -> dict:
    """BLEU and chrF of the hypotheses against the references (corpus level, `scorers`), and reference PPL."""
    d = {"sentences": len(sentences), **ref_ppl(sentences)}
    with_ref = [s for s in sentences if s.ref is not None]
    if with_ref:
        hyps, refs = as_scored([s.hyp for s in with_ref], tgt_lang), [[s.ref for s in with_ref]]
        d.update({name: metric.corpus_score(hyps, refs).score for name, metric in scorers(tgt_lang).items()})
    return d


def buckets(sentences: list[SentenceResult], n_chunks: int, count: int, tgt_lang: str) -> list[dict]:
    """Quality per stretch of the document: chunks split into `count` equal runs."""
    rows = []
    count = min(count, n_chunks)
    for b in range(count):
        lo, hi = b * n_chunks // count, (b + 1) * n_chunks // count
        part = [s for s in sentences if lo <= s.chunk < hi]
        if part:
            rows.append({"chunks": [lo, hi], **quality(part, tgt_lang)})
    return rows


# --- the task ---------------------------------------------------------------------------------------------
@dataclass
class TranslationTask(Task):
    """translate a long document chunk by chunk (Temp-Lora learns each translated chunk)"""

    source: str = setting(None, "bible:BOOK (CUV↔KJV, e.g. bible:Genesis), a .jsonl of {src, ref[, doc]}, or a text "
                          "file of source sentences, one per line", positional=True)
    ref: str | None = setting(None, "reference file aligned with SOURCE, one sentence per line")
    src_lang: str = setting("zh", "source language code")
    tgt_lang: str = setting("en", "target language code")
    free_running: bool = setting(False, "the history and Temp-Lora's targets are the model's own translations "
                                 "(default: teacher-forced with the reference)")
    context_chunks: int = setting(1, "previous chunks in the prompt (the paper's k1 = 1)")
    chunk_sentences: int = setting(20, "sentences per chunk for a user's files (the Bible: a chapter)")
    max_chunks: int | None = setting(None, "translate only the first N chunks of each document")
    max_new_tokens: int = setting(256, "most tokens per translated sentence (also at most 2×source + 32)")
    repetition_penalty: float = setting(1.12, "greedy decoding's repetition penalty (Temp-Lora's code: 1.12)")
    decode: str = setting("batched", "teacher-forced decoding: every sentence of a chunk at once (batched) or one "
                          "by one (sequential; the same translations; free-running is always sequential)",
                          choices=("batched", "sequential"))
    train_on_repeats: bool = setting(False, "free-running: Temp-Lora also trains on an output that repeats another "
                                     "in the chunk or its context (default: such loops carry no loss)")
    loss_on: str = setting("target", "the lines of Temp-Lora's training sample that carry the loss: the chunk's "
                           "target lines (the references, or free-running the model's own translations) or its "
                           "source lines", choices=("target", "source"))
    min_confidence: float = setting(0.0, "free-running: Temp-Lora trains on an output only if the geometric mean "
                                    "of its tokens' probabilities is at least this (0: every output)")
    buckets: int = setting(5, "position buckets along the document in the report")
    checkpoint: str | None = setting(None, "checkpoint file: a rerun resumes from it")

    name = "translate"
    default_method = "temp-lora"
    method_defaults = {"window": {"window": 4096}, "temp-lora": {"window": 4096}}

    def check(self, config):
        if self.source is None:
            raise InfinictxError("give the document to translate: bible:BOOK, a .jsonl file or a text file")
        if config.method not in TRANSLATE_METHODS:
            raise InfinictxError(f"translate runs --method window or temp-lora (got {config.method}): the prompt is "
                                 "re-read at each chunk, which a method keeping its own state of the past does not do")
        from ..data.parallel import check_language

        check_language(self.src_lang)
        check_language(self.tgt_lang)
        if self.context_chunks < 0:
            raise InfinictxError(f"--context-chunks must be >= 0 (got {self.context_chunks})")
        if self.max_new_tokens < 1:
            raise InfinictxError(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise InfinictxError(f"--max-chunks must be >= 1 (got {self.max_chunks})")
        if self.buckets < 1:
            raise InfinictxError(f"--buckets must be >= 1 (got {self.buckets})")
        if not 0 <= self.min_confidence < 1:
            raise InfinictxError(f"--min-confidence must be in [0, 1) (got {self.min_confidence})")
        if not self.repetition_penalty > 0:
            raise InfinictxError(f"--repetition-penalty must be positive (got {self.repetition_penalty})")

    def prepare(self):
        from ..data.parallel import read_parallel

        docs = read_parallel(self.source, self.ref, self.src_lang, self.tgt_lang, self.chunk_sentences)
        if self.max_chunks:
            for d in docs:
                d.chunks = d.chunks[:self.max_chunks]
        return docs

    def settings(self) -> TranslationSettings:
        return TranslationSettings(self.free_running, self.context_chunks, self.max_new_tokens,
                                   self.repetition_penalty, self.decode, self.train_on_repeats, self.loss_on,
                                   self.min_confidence)

    def run(self, lm, config, inputs, outputs: Outputs, progress: bool) -> Result:
        from .report import translation_markdown

        docs: list[ParallelDoc] = inputs
        settings = self.settings()
        key = _run_key(docs, settings, config, lm)
        ckpt = Path(self.checkpoint) if self.checkpoint else None
        state = torch.load(ckpt, weights_only=False) if ckpt and ckpt.exists() else None
        if state is not None and state["key"] != key:
            raise InfinictxError(f"checkpoint {ckpt} belongs to a different run (documents, model, method or "
                                 "settings differ); delete it or pass another --checkpoint")
        done: list[dict] = state["done"] if state else []   # finished documents
        total = sum(len(d.chunks) for d in docs)
        initial = sum(len(docs[i].chunks) for i in range(len(done))) + (state["chunk"] if state else 0)
        with progress_bar(progress, total, "chunk", f"{config.method} translate", initial=initial) as bar:
            for i in range(len(done), len(docs)):
                done.append(self._document(lm, config, docs[i], settings, key, done, state, ckpt, bar))
                state = None
        if ckpt and ckpt.exists():
            ckpt.unlink()
        summary = self._summary(docs, done, config, lm, settings)
        return Result(summary=summary, stdout=translation_markdown(summary), data=done)

    def _document(self, lm, config, doc: ParallelDoc, settings, key, done, state, ckpt, bar) -> dict:
        with config.make_session(lm) as session:
            translator = DocumentTranslator(session, doc, settings)
            sentences, start, elapsed = [], 0, 0.0
            if state is not None:
                translator.load_state_dict(state["translator"])
                sentences = [SentenceResult(**s) for s in state["sentences"]]
                start, elapsed = state["chunk"], state["elapsed"]
            t0 = time.perf_counter()
            for c in range(start, len(doc.chunks)):
                sentences += translator.translate_chunk(c, doc.chunks[c], learn=c + 1 < len(doc.chunks))
                bar.update(1)
                q = ref_ppl(sentences)
                if q:
                    bar.set_postfix({"ref_ppl": f"{q['ref_ppl']:.2f}"})
                if ckpt and c + 1 < len(doc.chunks):
                    _save(ckpt, {"key": key, "done": done, "chunk": c + 1,
                                 "elapsed": elapsed + time.perf_counter() - t0,
                                 "sentences": [asdict(s) for s in sentences], "translator": translator.state_dict()})
            wall = elapsed + time.perf_counter() - t0
            return {"name": doc.name, "chunks": len(doc.chunks), "dropped": doc.dropped, "wall_s": round(wall, 3),
                    "repeats_not_trained": translator.repeats_not_trained,
                    "unsure_not_trained": translator.unsure_not_trained,
                    "config": session.describe(), "method": session.method,
                    "sentences": [asdict(s) for s in sentences], "cost": session.meter.summary()}

    def _summary(self, docs, done, config, lm, settings) -> dict:
        tgt = self.tgt_lang
        all_sentences = []
        per_doc = []
        for doc in done:
            sents = [SentenceResult(**s) for s in doc["sentences"]]
            all_sentences += sents
            per_doc.append({k: v for k, v in doc.items() if k != "sentences"}
                           | quality(sents, tgt) | {"buckets": buckets(sents, doc["chunks"], self.buckets, tgt)})
        return {"task": "translate", "method": done[0]["method"] if done else config.method, "model": lm.name,
                "source": self.source, "src_lang": self.src_lang, "tgt_lang": tgt, **asdict(settings),
                "config": done[0]["config"] if done else {}, **quality(all_sentences, tgt),
                "wall_s": round(sum(d["wall_s"] for d in done), 3), "documents": per_doc,
                "translations": [{"key": s.key, "chunk": s.chunk, "hyp": s.hyp}
                                 | ({"ref_nll": s.ref_nll, "ref_tokens": s.ref_tokens} if s.ref_tokens else {})
                                 | ({"confidence": round(s.confidence, 4)} if s.confidence is not None else {})
                                 for s in all_sentences]}

    def write(self, result: Result, outputs: Outputs):
        write_summary(result, outputs)
        if outputs.text:
            atomic_write(outputs.text, "".join(t["hyp"] + "\n" for t in result.summary["translations"]))


def _run_key(docs, settings, config, lm) -> str:
    from ..core.registry import settings_of

    h = hashlib.sha256(repr([(d.name, d.src_lang, d.tgt_lang, [[(p.src, p.ref) for p in c] for c in d.chunks])
                             for d in docs]).encode())
    fields, defaults = asdict(settings), asdict(TranslationSettings())
    for name in ("loss_on", "min_confidence"):   # added later: they key only when changed, so older checkpoints resume
        if fields[name] == defaults[name]:
            del fields[name]
    h.update(repr((fields, config.method, sorted(settings_of(config).items()), lm.name,
                   lm.fingerprint)).encode())
    return h.hexdigest()


def _save(path: Path, state: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


