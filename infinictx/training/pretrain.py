"""Pretraining a small Llama from scratch on a given corpus (the controlled Gen-vs-Mem experiment needs models
whose whole pretraining data we can index). A plain recipe in the nanoGPT manner:

- a byte-level BPE tokenizer trained on the corpus (`train_tokenizer`), documents joined with <eos>;
- the token stream cut into blocks of `context` tokens, shuffled (seeded), `batch` blocks per step;
- AdamW, linear warm-up then cosine decay, gradient clipping; bf16 autocast when asked (fp32 weights);
- a checkpoint every `save_every` steps (model, optimizer, step, RNG): rerun the same call to resume;
- the result a normal HF folder (`save_pretrained` + tokenizer) that `load_model` reads."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.errors import InfinictxError


@dataclass
class PretrainConfig:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 688
    context: int = 256
    batch: int = 16
    epochs: float = 1.0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    clip: float = 1.0
    dtype: str = "float32"          # or bfloat16 (autocast; weights and optimizer state stay fp32)
    seed: int = 0
    save_every: int = 200

    def __post_init__(self):
        for name in ("hidden", "layers", "heads", "intermediate", "context", "batch", "save_every"):
            if getattr(self, name) < 1:
                raise InfinictxError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.hidden % self.heads:
            raise InfinictxError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if not (self.epochs > 0 and self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.warmup >= 0):
            raise InfinictxError("epochs and lr must be > 0, min_lr_ratio in [0, 1], warmup >= 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise InfinictxError(f"dtype must be float32 or bfloat16 (got {self.dtype!r})")


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) trained on `texts`, with <eos>."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise InfinictxError(f"vocab_size must be >= 300 (got {vocab_size})")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<eos>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


def make_model(cfg: PretrainConfig, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=cfg.context, eos_token_id=eos_id, bos_token_id=None,
                         pad_token_id=None, tie_word_embeddings=True, initializer_range=0.02)
    return LlamaForCausalLM(config)


def blocks(texts: list[str], tokenizer, context: int) -> torch.Tensor:
    """The corpus as (n, context) blocks of one token stream (documents joined by <eos>; the tail shorter than a
    block dropped)."""
    ids = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    n = len(ids) // context
    if n < 1:
        raise InfinictxError(f"the corpus has {len(ids)} tokens, fewer than one block of {context}")
    return torch.tensor(ids[:n * context], dtype=torch.long).view(n, context)


def lr_at(step: int, total: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def pretrain(texts: list[str], tokenizer, cfg: PretrainConfig, out_dir: str | Path, progress=None) -> dict:
    """Train a model on `texts` and save it (with `tokenizer`) under `out_dir`; resumes from `out_dir/train.ckpt`.
    Returns the run's record (parameters, tokens, seconds, loss curve)."""
    out = Path(out_dir)
    if (out / "pretrain.json").exists():
        return json.loads((out / "pretrain.json").read_text())   # done earlier
    data = blocks(texts, tokenizer, cfg.context)
    model = make_model(cfg, len(tokenizer), tokenizer.eos_token_id)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    per_epoch = math.ceil(len(data) / cfg.batch)
    total = max(1, round(per_epoch * cfg.epochs))
    gen = torch.Generator().manual_seed(cfg.seed)
    orders = [torch.randperm(len(data), generator=gen) for _ in range(math.ceil(cfg.epochs))]
    step, losses, elapsed = 0, [], 0.0
    ckpt = out / "train.ckpt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] != asdict(cfg) or state["blocks"] != len(data):
            raise InfinictxError(f"{ckpt} belongs to another run; delete it or choose another folder")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, losses, elapsed = state["step"], state["losses"], state["elapsed"]
    out.mkdir(parents=True, exist_ok=True)
    model.train()
    t0 = time.perf_counter()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    while step < total:
        epoch, k = divmod(step, per_epoch)
        rows = orders[epoch][k * cfg.batch:(k + 1) * cfg.batch]
        batch = data[rows]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg)
        with autocast:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss   # transformers shifts the labels
        if not torch.isfinite(loss):
            raise InfinictxError(f"the training loss became {loss.item()} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        losses.append(round(loss.item(), 4))
        step += 1
        if progress:
            progress(step, total, loss.item())
        if step % cfg.save_every == 0 and step < total:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"config": asdict(cfg), "blocks": len(data), "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "step": step, "losses": losses,
                        "elapsed": elapsed + time.perf_counter() - t0}, tmp)
            tmp.replace(ckpt)
    elapsed += time.perf_counter() - t0
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    record = {"config": asdict(cfg), "parameters": params,
              "non_embedding_parameters": params - model.get_input_embeddings().weight.numel(),
              "vocab_size": len(tokenizer), "tokens_seen": total * cfg.batch * cfg.context, "blocks": len(data),
              "steps": total, "seconds": round(elapsed, 1), "loss_first": losses[0], "loss_last_50": round(
                  sum(losses[-50:]) / len(losses[-50:]), 4), "losses": losses}
    (out / "pretrain.json").write_text(json.dumps(record) + "\n")
    ckpt.unlink(missing_ok=True)
    return record
