"""CrossBatch fine-tuning (Focused Transformer, arXiv 2307.03170 §2.2): teach memory layers to use memory.

A batch is made of document groups: a group holds p+1 consecutive local contexts (rows of T tokens) of one
document. In a memory layer, every query attends in ONE differentiable softmax to its own causal local context
and to the keys and values of other rows: the earlier rows of its own document (positives: what a memory would
hold) and rows of other documents (negatives: distractors a memory would also hold). Keys from other rows are
rotated "as if first" (position 0), as at inference (`positionals="first"`). Other layers see only their row.

The (positives, negatives) mix per group follows LongLLaMA-3B: ¼(0,0), ¼(1,1), ¼(2,1), ¼(3,0); the number of
negatives grows during training ("start with d ≤ 8, then more": `negative_growth`).

Beyond the paper (say so when reporting): `extra_negatives` keeps the memory-layer keys and values of the last
batches (detached, as Memorizing Transformer's memory) and shows them to every row with a memory as further
negatives: thousands of distractors per query for a fraction of a step's cost, where the batch alone offers a
few hundred. And `needle_rate` of the groups with positives carry a synthetic fact —
"Remember: the secret code of NAME is NNNNNN." in their first row, and "The secret code of NAME is NNNNNN." again
in their last row — so that the loss on the repeated number can only be lowered by reading memory. Natural text
rarely repeats long numbers across contexts; a 135M model trained for an hour on a CPU needs the signal. The
wording differs from the passkey evaluation's.

What is trained: a LoRA (peft) on all linear layers but the LM head, merged into the weights when saved. The
result is saved as a LongLLaMA-format checkpoint (config fields mem_layers, last_context_length, ...) that
`load_model` reads back and the `memory` method uses with its settings."""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ...core.attention import Rope, decoder_forward, local_attention
from ...core.errors import InfinictxError, check_finite
from ...core.models import LoadedModel
from ...core.progress import progress_bar
from ...training.lora import add_lora
from ...training.mst import MSTConfig, from_switches, mst_hidden, mst_nll
from .longllama import save_longllama_checkpoint
from .session import resolve_mem_layers

NAMES = ["Adam", "Belial", "Cassio", "Desdemona", "Edmund", "Falstaff", "Gonzalo", "Horatio", "Iago", "Juliet",
         "Kent", "Lear", "Miranda", "Nerissa", "Orsino", "Portia", "Quince", "Rosalind", "Sebastian", "Titania",
         "Ursula", "Viola", "Warwick", "Yorick"]


@dataclass
class CrossBatchConfig:
    context: int = 256                       # T: tokens per local context (one batch row)
    mix: tuple = ((0, 0), (1, 1), (2, 1), (3, 0))   # (positives, negatives) per document group (LongLLaMA-3B)
    negative_growth: tuple = ((0.0, 1), (0.5, 3))   # (training fraction, multiplier of the mix's negatives)
    mem_layers: tuple | list | str | None = None   # as the memory method: indices, "auto[:N]", "spread" (default auto)
    needle_rate: float = 0.5                 # share of groups with positives that carry a synthetic fact
    extra_negatives: int = 0                 # detached K/V tokens from earlier batches, more distractors (0 = off)
    needle_weight: float = 0.0               # extra weight of the repeated codes' loss
    steps: int = 300
    time_budget_s: float | None = None       # stop early (and save) when training has used this much wall time
    stop_after: int | None = None            # stop early after this many steps (the schedule still spans `steps`):
                                             # the same steps as a time-budgeted run, on a machine of any speed
    lr: float = 3e-4
    warmup: int = 10
    weight_decay: float = 0.0
    rank: int = 32
    alpha: float = 32
    clip: float = 1.0
    seed: int = 0
    last_context_length: int = 1024          # saved in the checkpoint: the local window W inference uses
    share_tokens: int | None = None          # saved in the checkpoint: the memory gate's N inference uses (None: off)
    mst: bool = False                        # Mini-Sequence training (training.mst): long rows in less memory
    mst_save_attention: bool = False         # ... keeping attention outputs (MSTConfig.save_attention); implies mst

    def __post_init__(self):
        if self.context < 16:
            raise InfinictxError("CrossBatch context must be >= 16 tokens")
        if not self.mix or any(p < 0 or n < 0 for p, n in self.mix):
            raise InfinictxError("the (positives, negatives) mix needs non-negative pairs")
        if not 0 <= self.needle_rate <= 1:
            raise InfinictxError("needle_rate must be within [0, 1]")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise InfinictxError(f"stop_after must be within [1, steps={self.steps}], got {self.stop_after}")


def split_documents(docs: list[tuple[str, object]], held_out: list[str], excluded: list[str] = ()) -> tuple[list, list]:
    """(training, held-out) of named documents: `held_out` names go to the second list (checkpoint selection),
    `excluded` ones (test books) to neither, everything else to training. Unknown names are an error, so a typo
    cannot leak a book into training."""
    names = {n for n, _ in docs}
    unknown = sorted(set(held_out) - names) + sorted(set(excluded) - names)
    if unknown:
        raise InfinictxError(f"unknown documents {unknown}; the corpus has e.g. {sorted(names)[:3]}")
    if set(held_out) & set(excluded):
        raise InfinictxError(f"documents both held out and excluded: {sorted(set(held_out) & set(excluded))}")
    train = [(n, d) for n, d in docs if n not in held_out and n not in excluded]
    return train, [(n, d) for n, d in docs if n in held_out]


@dataclass
class Batch:
    ids: torch.Tensor            # (B, T)
    memory_rows: torch.Tensor    # (B, S) row indices each row's memory layers may attend to; -1 = none
    groups: list = field(default_factory=list)   # (document, positives, negatives) per group, for logging
    needles: list = field(default_factory=list)  # (row, start, end): the repeated code's tokens in a last row


def negatives_multiplier(cfg: CrossBatchConfig, progress: float) -> int:
    mult = 1
    for start, m in cfg.negative_growth:
        if progress >= start:
            mult = m
    return mult


def make_batch(docs: list[torch.Tensor], cfg: CrossBatchConfig, rng: random.Random, tokenizer,
               progress: float = 0.0) -> Batch:
    """One CrossBatch batch: a group per entry of `cfg.mix` (consecutive contexts of a random document)."""
    T = cfg.context
    rows, owner, groups, needles = [], [], [], []
    for g, (pos, neg) in enumerate(cfg.mix):
        n_rows = pos + 1
        candidates = [i for i, d in enumerate(docs) if len(d) > n_rows * T + 1]
        if not candidates:
            raise InfinictxError(f"no training document is longer than {n_rows * T} tokens")
        d = rng.choice(candidates)
        start = rng.randrange(0, len(docs[d]) - n_rows * T)
        chunks = [docs[d][start + i * T:start + (i + 1) * T].tolist() for i in range(n_rows)]
        if pos > 0 and rng.random() < cfg.needle_rate:
            name, code = rng.choice(NAMES), str(rng.randint(100000, 999999))
            first = tokenizer(f" Remember: the secret code of {name} is {code}.", add_special_tokens=False).input_ids
            again = tokenizer(f" The secret code of {name} is {code}.", add_special_tokens=False).input_ids
            at = rng.randrange(0, T - len(first))
            chunks[0] = (chunks[0][:at] + first + chunks[0][at:])[:T]
            at = rng.randrange(T // 4, T - len(again))
            chunks[-1] = (chunks[-1][:at] + again + chunks[-1][at:])[:T]
            prefix = tokenizer(f" The secret code of {name} is", add_special_tokens=False).input_ids
            if again[:len(prefix)] == prefix:  # where the code's tokens sit, for the memory probe
                needles.append((len(rows) + n_rows - 1, at + len(prefix), at + len(again) - 1))
        groups.append((d, pos, neg))
        for index, c in enumerate(chunks):
            rows.append(c)
            owner.append((g, index))
    mult = negatives_multiplier(cfg, progress)
    memory = []
    for r, (g, c) in enumerate(owner):
        positives = [i for i, (g2, c2) in enumerate(owner) if g2 == g and c2 < c]
        others = [i for i, (g2, _) in enumerate(owner) if g2 != g]
        n_neg = min(len(others), cfg.mix[g][1] * mult) if c > 0 or cfg.mix[g][0] == 0 else 0
        memory.append(positives + rng.sample(others, n_neg))
    width = max(1, max(len(m) for m in memory))
    memory_rows = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, m in enumerate(memory):
        memory_rows[r, :len(m)] = torch.tensor(m, dtype=torch.long)
    return Batch(ids=torch.tensor(rows, dtype=torch.long), memory_rows=memory_rows, groups=groups, needles=needles)


def crossbatch_attention(q, k, v, memory_rows, rope: Rope, scale: float, extra=None) -> torch.Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, T, D) before RoPE. Each row attends causally to itself (RoPE at 0..T−1)
    and, in the same softmax, to every token of the rows listed in memory_rows (keys at position 0).
    `extra` = (k, v) of shape (1, Hkv, E, D): detached entries from earlier batches, seen as further
    negatives by every row that has a memory."""
    B, Hkv, T, D = k.shape
    qr, kr = rope.rotate(q, 0), rope.rotate(k, 0)
    memory_rows = memory_rows.to(q.device)   # batches are built on the CPU
    S = memory_rows.shape[1]
    safe = memory_rows.clamp(min=0)
    keys = [k[safe].permute(0, 2, 1, 3, 4).reshape(B, Hkv, S * T, D)]   # (B, S, Hkv, T, D) -> (B, Hkv, S·T, D)
    values = [v[safe].permute(0, 2, 1, 3, 4).reshape(B, Hkv, S * T, D)]
    has_memory = memory_rows >= 0
    masks = [has_memory[:, :, None].expand(B, S, T).reshape(B, 1, 1, S * T).expand(B, 1, T, S * T)]
    if extra is not None and extra[0].shape[2]:
        E = extra[0].shape[2]
        keys.append(extra[0].expand(B, -1, -1, -1))
        values.append(extra[1].expand(B, -1, -1, -1))
        masks.append(has_memory.any(1)[:, None, None, None].expand(B, 1, T, E))
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]
    mask = torch.cat(masks + [causal.expand(B, 1, T, T)], dim=-1)
    return F.scaled_dot_product_attention(qr, torch.cat(keys + [kr], 2), torch.cat(values + [v], 2), attn_mask=mask,
                                          scale=scale, enable_gqa=q.shape[1] != Hkv)


def _crossbatch_attend(batch: Batch, mem_layers: set[int], rope: Rope, extra: dict | None, capture: dict | None):
    rows = batch.memory_rows

    def attend(i, a, q, k, v):
        if i in mem_layers:
            if capture is not None:
                B, H, T, D = k.shape
                capture[i] = tuple(x.detach().permute(1, 0, 2, 3).reshape(1, H, B * T, D) for x in (k, v))
            return crossbatch_attention(q, k, v, rows, rope, a.scaling, extra=(extra or {}).get(i))
        return local_attention(rope.rotate(q, 0), rope.rotate(k, 0), v, a.scaling)

    return attend


def crossbatch_logits(model, batch: Batch, mem_layers: set[int], rope: Rope, extra: dict | None = None,
                      capture: dict | None = None) -> torch.Tensor:
    """Logits of every row. `extra[layer]` = detached (k, v) further negatives; `capture`, if given, receives
    each memory layer's detached (k, v) of this batch (to become later batches' extra negatives)."""
    attend = _crossbatch_attend(batch, mem_layers, rope, extra, capture)
    return decoder_forward(model, _on_model(model, batch.ids), attend)


def _on_model(model, ids: torch.Tensor) -> torch.Tensor:
    """`make_batch` builds batches on the CPU; the model may sit on a GPU."""
    return ids.to(model.get_input_embeddings().weight.device)


def crossbatch_loss(model, batch: Batch, mem_layers: set[int], rope: Rope, extra: dict | None = None,
                    capture: dict | None = None, needle_weight: float = 0.0,
                    mst: MSTConfig | None = None) -> torch.Tensor:
    """Mean next-token loss over every row, with the memory layers attending across the batch; plus
    `needle_weight` × the mean loss on the repeated codes (a dozen tokens among thousands: unweighted, their
    gradient is lost in the language-modelling loss). With `mst`, the Mini-Sequence way (`infinictx.training.mst`):
    same loss and gradients, never all logits at once."""
    mst = mst or MSTConfig(head_chunks=1, mlp_chunks=1, checkpoint=False)  # off: the plain forward and loss
    attend = _crossbatch_attend(batch, mem_layers, rope, extra, capture)
    ids = _on_model(model, batch.ids)
    per_token = mst_nll(model, mst_hidden(model, ids, attend, mst)[:, :-1], ids[:, 1:], mst)
    loss = per_token.mean()
    if needle_weight and batch.needles:
        loss = loss + needle_weight * torch.cat([per_token[r, s - 1:e - 1] for r, s, e in batch.needles]).mean()
    return loss


@torch.no_grad()
def memory_probe(model, batches: list[Batch], mem_layers: set[int], rope: Rope) -> dict:
    """How much the memory carries: NLL and exact-match of the repeated secret codes (whose first mention is
    only in memory), with the memory rows and with them removed."""
    out = {}
    for name, use in (("with_memory", True), ("without_memory", False)):
        nll, hits, n = 0.0, 0, 0
        for b in batches:
            bb = b if use else Batch(ids=b.ids, memory_rows=torch.full_like(b.memory_rows, -1))
            logits = crossbatch_logits(model, bb, mem_layers, rope).float()
            for row, s, e in b.needles:
                pred = logits[row, s - 1:e - 1]
                target = b.ids[row, s:e].to(pred.device)
                nll += F.cross_entropy(pred, target, reduction="sum").item()
                hits += int(bool((pred.argmax(-1) == target).all()))
                n += 1
        out[name] = {"code_nll_per_token": nll / max(1, sum(e - s for b in batches for _, s, e in b.needles)),
                     "codes_exact": hits / max(1, n), "codes": n}
    return out


def train_crossbatch(lm: LoadedModel, docs: list[torch.Tensor], cfg: CrossBatchConfig, out: Path | None = None,
                     log=print, progress: bool = True, evaluate=None, eval_every: int = 0) -> dict:
    """Fine-tune `lm` in place (LoRA, merged at the end) with CrossBatch; save a LongLLaMA-format checkpoint to
    `out` if given. Returns the training log.

    With `evaluate` (called as evaluate(lm, mem_layers) -> dict with a "score", lower is better, on held-out data:
    the adapter is live in lm.model, in eval mode, without gradients) every `eval_every` steps and at the end, the
    adapter of the best evaluation is the one merged and saved."""
    mem_layers = sorted(set(resolve_mem_layers(cfg.mem_layers if cfg.mem_layers is not None else "auto", lm)))
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model, params = add_lora(lm.model, cfg.rank, cfg.alpha)   # A initialised from the seeded global RNG
    model.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    rope = Rope(model, lm.device, lm.dtype)
    extra = {}
    history, evals, best, t0 = [], [], None, time.perf_counter()

    def run_eval(step: int):
        nonlocal best
        model.eval()
        e0 = time.perf_counter()
        with torch.no_grad():
            result = {"step": step, **evaluate(lm, mem_layers), "s": round(time.perf_counter() - e0, 1)}
        model.train()
        evals.append(result)
        log(f"eval after {step} steps: {result}")
        if best is None or result["score"] < best[0]:
            best = (result["score"], step, [p.detach().clone() for p in params])

    with progress_bar(progress, cfg.steps, "step", "crossbatch") as bar:
        for step in range(cfg.steps):
            elapsed = time.perf_counter() - t0
            if cfg.time_budget_s and elapsed > cfg.time_budget_s:
                log(f"time budget of {cfg.time_budget_s:.0f} s reached after {step} steps")
                break
            if cfg.stop_after is not None and step >= cfg.stop_after:
                log(f"stopped after {step} steps (stop_after)")
                break
            batch = make_batch(docs, cfg, rng, lm.tokenizer, progress=step / cfg.steps)
            batch.ids = batch.ids.to(lm.device)
            capture = {} if cfg.extra_negatives else None
            loss = crossbatch_loss(model, batch, set(mem_layers), rope, extra, capture, cfg.needle_weight,
                                   from_switches(cfg.mst, cfg.mst_save_attention))
            check_finite(loss, f"CrossBatch training produced a non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            sched.step()
            if capture:  # keep the newest `extra_negatives` tokens of every memory layer
                extra = {i: tuple(torch.cat([extra[i][j], kv[j]], 2)[:, :, -cfg.extra_negatives:] if i in extra else
                                  kv[j][:, :, -cfg.extra_negatives:] for j in (0, 1)) for i, kv in capture.items()}
            history.append({"step": step, "loss": round(loss.item(), 4), "rows": int(batch.ids.shape[0]),
                            "memory_rows": int(batch.memory_rows.shape[1]),
                            "s": round(time.perf_counter() - t0, 1)})
            bar.set_postfix(loss=f"{loss.item():.3f}", mem=batch.memory_rows.shape[1])
            bar.update(1)
            if evaluate is not None and eval_every and (step + 1) % eval_every == 0:
                run_eval(step + 1)
    if evaluate is not None:
        if not evals or evals[-1]["step"] != len(history):
            run_eval(len(history))
        with torch.no_grad():   # the best evaluated adapter is the one kept
            for p, kept in zip(params, best[2]):
                p.copy_(kept)
    model.eval()
    # A bf16 base (AMX CPUs, GPUs) would round the merged update into bf16 a second time: merge and save in fp32,
    # then hand the model back in the dtype it was loaded in.
    model.float()
    merged = model.merge_and_unload()
    merged.requires_grad_(False)
    lm.model = merged
    result = {"config": asdict(cfg), "mem_layers": mem_layers, "steps_done": len(history),
              "train_s": round(time.perf_counter() - t0, 1), "history": history}
    if evaluate is not None:
        result.update(evals=evals, kept_step=best[1])
    if out is not None:
        save_longllama_checkpoint(lm, out, mem_layers, cfg.last_context_length, extra=result,
                                  share_tokens=cfg.share_tokens)
    lm.model = merged.to(lm.dtype)
    return result
