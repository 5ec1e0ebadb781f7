"""Trace a task: for every task-related n-gram pair, the task-gram probability from the corpus, the ∞-gram
probability of the y-gram, and the model's own probability of the y-gram; then how they correlate.

The model side is −log P_LLM(y-gram | template(x), the output before the y-gram): one teacher-forced forward per
example over template(x) + y, the y-gram's log-probability the sum over the tokens that cover its characters. The
∞-gram side scores the same tokens with the corpus's ∞-gram estimate (longest matching suffix of everything before
each token). Distributional memorization (the paper's term) is a positive rank correlation between the task-gram
probability and the model's; Spearman ρ, Kendall τ with p-values, and the Kendall distance (1 − τ)/2."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ...core.errors import InfinictxError
from .taskgram import GramPair, PairMiner, TaskGramModel


def correlation(a, b) -> dict:
    """Spearman and Kendall between two equally long sequences (NaNs dropped pairwise; −inf, a log-probability of
    zero as the ∞-gram often gives, is kept as the lowest rank)."""
    from scipy.stats import kendalltau, spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = ~np.isnan(a) & ~np.isnan(b)
    a, b = a[keep], b[keep]
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return {"n": int(len(a)), "spearman": None, "spearman_p": None, "kendall_tau": None, "kendall_p": None,
                "kendall_distance": None}
    rho, rho_p = spearmanr(a, b)
    tau, tau_p = kendalltau(a, b)
    return {"n": int(len(a)), "spearman": float(rho), "spearman_p": float(rho_p), "kendall_tau": float(tau),
            "kendall_p": float(tau_p), "kendall_distance": float((1 - tau) / 2)}


@torch.no_grad()
def output_token_logprobs(lm, context: str, output: str):
    """(token ids of context + output, their char spans in output (−1 for context tokens), log P of each token given
    the ones before it (the first: nan))."""
    tok = lm.tokenizer
    enc = tok(context + output, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc.input_ids
    if len(ids) < 2:
        raise InfinictxError("an example needs at least two tokens")
    spans = [(s - len(context), e - len(context)) if e > len(context) else (-1, -1) for s, e in enc.offset_mapping]
    logits = lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:], device=lm.device)[:, None])[:, 0]
    return ids, spans, [math.nan] + logp.cpu().tolist()


def covering(spans, start: int, end: int) -> list[int]:
    """Positions of the tokens whose characters overlap [start, end) of the output."""
    return [i for i, (s, e) in enumerate(spans) if s >= 0 and s < end and e > start]


@dataclass
class PairRow:
    example: int
    n: int
    x_gram: str
    y_gram: str
    similarity: float | None
    c_x: int
    c_xy: int
    p_taskgram: float | None
    llm_logprob: float
    infgram_logprob: float | None


def trace(lm, index, examples: list[tuple[str, str]], miner: PairMiner, window: int, template: str = "{input}",
          infgram: bool = True, progress=None) -> dict:
    """Every task-related pair of `examples` [(input, output)] with its three probabilities, and the correlations."""
    if not examples:
        raise InfinictxError("the task has no examples")
    if "{input}" not in template:
        raise InfinictxError("the template must contain {input}")
    model = TaskGramModel(index, lm.tokenizer, window)
    pairs: list[GramPair] = miner.mine(examples)
    by_example: dict[int, list[GramPair]] = {}
    for p in pairs:
        by_example.setdefault(p.example, []).append(p)
    rows: list[PairRow] = []
    for k, group in by_example.items():
        x, y = examples[k]
        ids, spans, logp = output_token_logprobs(lm, template.format(input=x), y)
        y_scores: dict = {}
        for p in group:
            if p.y.words not in y_scores:
                pos = [i for i in covering(spans, p.y.start, p.y.end) if i > 0]
                llm = sum(logp[i] for i in pos) if pos else math.nan
                inf = None
                if infgram and pos:
                    probs = [index.infgram(ids[:i], ids[i])["prob"] for i in pos]
                    inf = sum(math.log(q) if q > 0 else -math.inf for q in probs)
                y_scores[p.y.words] = (llm, inf)
            prob, c_x, c_xy = model.prob(p.x.words, p.y.words)
            llm, inf = y_scores[p.y.words]
            rows.append(PairRow(k, p.n, p.x.text, p.y.text, p.similarity, c_x, c_xy, prob, llm, inf))
        if progress:
            progress(1)
    return {"pairs": [asdict(r) for r in rows], "summary": summarize(rows)}


def summarize(rows: list[PairRow]) -> dict:
    """Correlations of the model's y-gram log-probability with the task-gram probability (all pairs whose x-gram
    occurs; and those that also co-occur) and with the ∞-gram log-probability, overall and per n."""
    def block(sel: list[PairRow]) -> dict:
        seen = [r for r in sel if r.p_taskgram is not None]
        cooc = [r for r in seen if r.c_xy > 0]
        out = {"pairs": len(sel), "x_seen": len(seen), "cooccurring": len(cooc),
               "taskgram_vs_llm": correlation([r.p_taskgram for r in seen], [r.llm_logprob for r in seen]),
               "taskgram_vs_llm_cooccurring": correlation([math.log(r.p_taskgram) for r in cooc],
                                                          [r.llm_logprob for r in cooc])}
        inf = [r for r in sel if r.infgram_logprob is not None]
        if inf:
            out["infgram_vs_llm"] = correlation([r.infgram_logprob for r in inf], [r.llm_logprob for r in inf])
        return out

    out = {"all": block(rows)}
    for n in sorted({r.n for r in rows}):
        out[f"n={n}"] = block([r for r in rows if r.n == n])
    return out
