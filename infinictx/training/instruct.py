"""Instruction tuning with a LoRA, and its evaluation: the one recipe every data subset is trained with (the full
pool, a random 5%, a TAGCOS 5% ...), so subsets are compared on equal terms.

An example is `format_prompt(prompt) + answer + <eos>` with the loss on the answer and <eos> only. Training: AdamW,
linear warm-up then linear decay, batches of examples padded on the right, a fixed number of epochs; optional
checkpoints (adapter weights, optimizer state, learning rate) at chosen steps — TAGCOS's warm-up needs them.
Evaluation: greedy answers to each test prompt, exact match after stripping, and the answer's mean NLL."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import InfinictxError
from ..data.instructions import format_prompt


@dataclass
class InstructConfig:
    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-4
    epochs: float = 4.0
    batch: int = 8
    warmup_ratio: float = 0.03
    max_len: int = 192
    modules: tuple[str, ...] | None = None   # LoRA on these linear layers only (None: every one)
    seed: int = 0

    def __post_init__(self):
        if self.rank < 1 or self.batch < 1 or self.max_len < 8:
            raise InfinictxError("rank and batch must be >= 1, max_len >= 8")
        if not (self.lr > 0 and self.epochs > 0 and 0 <= self.warmup_ratio < 1):
            raise InfinictxError("lr and epochs must be > 0, warmup_ratio in [0, 1)")


def encode(tokenizer, row: dict, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels): the prompt's labels are −100; cut to max_len from the left of the prompt."""
    prompt = tokenizer(format_prompt(row["prompt"]), add_special_tokens=False).input_ids
    answer = tokenizer(row["answer"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = (prompt + answer)[-max_len:]
    n_answer = min(len(answer), len(ids))
    labels = [-100] * (len(ids) - n_answer) + ids[len(ids) - n_answer:]
    return torch.tensor(ids), torch.tensor(labels)


def pad(examples):
    T = max(len(x) for x, _ in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    for k, (x, y) in enumerate(examples):
        ids[k, :len(x)], labels[k, :len(y)], mask[k, :len(x)] = x, y, 1
    return ids, labels, mask


def finetune(model, tokenizer, rows: list[dict], cfg: InstructConfig, checkpoints: tuple[int, ...] = (),
             progress=None):
    """Train a fresh LoRA on `rows`; returns (peft model, record, [checkpoint dicts]). The model's base weights
    are untouched (call `.unload()` on the result to take the LoRA out)."""
    from ..training.lora import add_lora

    if not rows:
        raise InfinictxError("no examples to train on")
    peft_model, params = add_lora(model, rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed, modules=cfg.modules)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    data = [encode(tokenizer, r, cfg.max_len) for r in rows]
    per_epoch = math.ceil(len(data) / cfg.batch)
    total = max(1, round(per_epoch * cfg.epochs))
    warm = max(1, round(cfg.warmup_ratio * total))
    rng = random.Random(cfg.seed)
    order: list[int] = []
    losses, saved = [], []
    device = params[0].device
    peft_model.train()
    for step in range(total):
        if len(order) < cfg.batch:
            more = list(range(len(data)))
            rng.shuffle(more)
            order += more
        idx, order = order[:cfg.batch], order[cfg.batch:]
        ids, labels, mask = pad([data[i] for i in idx])
        lr = cfg.lr * min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = peft_model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device),
                          use_cache=False).loss
        if not torch.isfinite(loss):
            raise InfinictxError(f"the training loss became {loss.item()} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 4))
        if step + 1 in checkpoints:
            from peft import get_peft_model_state_dict

            saved.append({"step": step + 1, "lr": lr, "adapter": {k: v.clone() for k, v in
                                                                  get_peft_model_state_dict(peft_model).items()},
                          "optimizer": {k: v.clone() if torch.is_tensor(v) else v for k, v in
                                        _flat_state(opt, params).items()}})
        if progress:
            progress(step + 1, total, loss.item())
    peft_model.eval()
    return peft_model, {"steps": total, "examples": len(rows), "loss_first": losses[0],
                        "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4)}, saved


def _flat_state(opt, params) -> dict:
    """Adam's moments flattened in parameter order (what the gradient features read)."""
    m = [opt.state[p]["exp_avg"].flatten() for p in params]
    v = [opt.state[p]["exp_avg_sq"].flatten() for p in params]
    return {"exp_avg": torch.cat(m), "exp_avg_sq": torch.cat(v)}


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch,) each example's mean next-token NLL over its scored tokens (labels −100 are not scored)."""
    labels = labels.to(logits.device)
    token_nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                reduction="none")
    return token_nll.sum(1) / (labels[:, 1:] != -100).sum(1).clamp(min=1)


@torch.no_grad()
def evaluate(model, tokenizer, tests: dict[str, list[dict]], max_new_tokens: int = 24, max_len: int = 192,
             batch: int = 32) -> dict:
    """Per family: exact match of the greedy answer (each example's `answers` and `correct` too), and the reference
    answer's mean NLL (each example's in `nlls`). Prompts of similar length are decoded together (`batch` at a
    time, padded on the left, so every prompt ends where its answer begins); `batch=1` decodes one at a time."""
    out = {}
    device = next(model.parameters()).device
    model.eval()
    for fam, rows in tests.items():
        prompts = [tokenizer(format_prompt(r["prompt"]), add_special_tokens=False).input_ids for r in rows]
        answers: list[str] = [""] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))   # less padding
        for s in range(0, len(order), batch):
            part = order[s:s + batch]
            T = max(len(prompts[i]) for i in part)
            ids = torch.full((len(part), T), tokenizer.eos_token_id, dtype=torch.long)
            mask = torch.zeros(len(part), T, dtype=torch.long)
            for k, i in enumerate(part):
                ids[k, T - len(prompts[i]):], mask[k, T - len(prompts[i]):] = torch.tensor(prompts[i]), 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
            for k, i in enumerate(part):
                answers[i] = tokenizer.decode(gen[k, T:], skip_special_tokens=True).strip()
        nll = []
        for s in range(0, len(rows), batch):
            ids, labels, mask = pad([encode(tokenizer, r, max_len) for r in rows[s:s + batch]])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            nll += per_example_nll(logits, labels).tolist()
        correct = [a == r["answer"].strip() for a, r in zip(answers, rows)]
        out[fam] = {"exact": sum(correct) / len(rows), "right": sum(correct), "n": len(rows),
                    "nll": sum(nll) / len(nll), "correct": correct, "answers": answers, "nlls": nll}
    fams = list(out)
    out["average"] = {"exact": sum(out[f]["exact"] for f in fams) / len(fams),
                      "nll": sum(out[f]["nll"] for f in fams) / len(fams)}
    return out
