"""A LoRA on every linear layer but the LM head, with peft: the one set-up Temp-Lora's temporary adapter and
CrossBatch fine-tuning share."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def add_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float = 0.0, seed: int | None = None,
             task_type: str | None = None, layers: list[int] | None = None):
    """Wrap `model` in place with a peft LoRA (r=`rank`, alpha, dropout; A initialised under `seed` without
    touching the global RNG, or from the global RNG when seed is None; on the decoder layers `layers` only, or all
    of them). Returns (peft model, trainable params). peft's "all-linear" leaves the LM head out."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear"
    if layers is not None:   # peft takes a layer list only with module names: every linear's but the LM head's
        head = model.get_output_embeddings()
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and m is not head})
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type=task_type, layers_to_transform=layers)
    with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return peft_model, params
