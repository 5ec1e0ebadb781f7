"""A LoRA on every linear layer but the LM head, with peft: the one set-up Temp-Lora's temporary adapter and
CrossBatch fine-tuning share."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F


def lora_targets(model: torch.nn.Module, layers: list[int] | None):
    """peft's target modules: "all-linear" (every linear layer but the LM head), spelled out as module names when
    only some layers are adapted (peft takes a layer list only with names)."""
    if layers is None:
        return "all-linear"
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in name})


def add_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float = 0.0, seed: int | None = None,
             task_type: str | None = None, layers: list[int] | None = None, modules: list[str] | None = None):
    """Wrap `model` in place with a peft LoRA (r=`rank`, alpha, dropout; A initialised under `seed` without
    touching the global RNG, or from the global RNG when seed is None; on the decoder layers `layers` only, or all
    of them; on the linear layers named `modules` only, e.g. ["q_proj", "v_proj"], or every one). Returns (peft
    model, trainable params). peft's "all-linear" leaves the LM head out."""
    from peft import LoraConfig, get_peft_model

    targets = list(modules) if modules else lora_targets(model, layers)
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


class _InputDtypeLinear(torch.nn.Linear):
    """A LoRA factor that computes in its input's dtype: the fp32 weight is cast (differentiably: its gradient
    comes back in fp32) for each product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def compute_in_base_dtype(model: torch.nn.Module):
    """Make the LoRA products of a bf16 base run in bf16, the factors staying fp32 master weights for the optimizer
    (mixed precision, as autocast would do). peft otherwise casts each layer's input up to fp32 and multiplies in
    fp32: on an AMX CPU, rank-64 products on every linear layer took about as long as the base's own products in a
    Temp-Lora step of 1K tokens (the step: 1.2x faster with this, NLLs within 0.2%). fp32 and fp16 bases are left as
    they are (fp16 gradients would need loss scaling)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer().weight
        if base.dtype != torch.bfloat16:
            continue
        module.cast_input_dtype_enabled = False   # peft's switch: the input stays in the base dtype
        for factors in (module.lora_A, module.lora_B):
            for linear in factors.values():
                if type(linear) is torch.nn.Linear:
                    linear.__class__ = _InputDtypeLinear


class AdapterHost:
    """One peft wrapper on a base model holding any number of named LoRA adapters, one per owner (a Temp-Lora
    session): a server keeps many sessions, each with its own adapter, on one model in memory. `activate(name)`
    picks the adapter forwards use; the base weights are shared and never written. When the last adapter is
    released the LoRA layers are taken out (not merged) and the model is back as it was."""

    _hosts: dict[int, "AdapterHost"] = {}   # id(base model) -> its host

    def __init__(self, model: torch.nn.Module):
        self.base = model
        self.peft_model = None
        self.names: list[str] = []
        self._count = 0

    @classmethod
    def of(cls, model: torch.nn.Module) -> "AdapterHost":
        host = cls._hosts.get(id(model))
        return host if host is not None and host.base is model else cls(model)   # registered by its first `add`

    def add(self, rank: int, alpha: float, dropout: float = 0.0, seed: int | None = None,
            task_type: str | None = None, layers: list[int] | None = None) -> tuple[str, list]:
        """A new adapter (A initialised under `seed`, as `add_lora`), made active. Returns (its name, its
        trainable parameters)."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                            target_modules=lora_targets(self.base, layers), task_type=task_type,
                            layers_to_transform=layers)
        self._count += 1
        name = "default" if "default" not in self.names else f"a{self._count}"   # alone: peft's usual name
        with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            if self.peft_model is None:
                self.peft_model = get_peft_model(self.base, config, adapter_name=name)
            else:
                self.peft_model.add_adapter(name, config)
        compute_in_base_dtype(self.peft_model)
        self.names.append(name)
        AdapterHost._hosts[id(self.base)] = self
        self.activate(name)
        params = [p for n, p in self.peft_model.named_parameters() if "lora_" in n and n.endswith(f".{name}.weight")]
        for p in params:
            p.requires_grad_(True)
        return name, params

    def activate(self, name: str):
        if self.peft_model.active_adapter != name:
            self.peft_model.set_adapter(name)

    def release(self, name: str):
        """Remove adapter `name`; the last one out takes the LoRA layers out of the model."""
        self.names.remove(name)
        if not self.names:
            self.peft_model.unload()   # removes the LoRA layers without merging them into the base weights
            self.peft_model = None
            AdapterHost._hosts.pop(id(self.base), None)
        else:
            if self.peft_model.active_adapter == name:
                self.peft_model.set_adapter(self.names[-1])
            self.peft_model.delete_adapter(name)
