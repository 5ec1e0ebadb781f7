"""Per-example gradient features of the LoRA parameters (LESS / TAGCOS): each example's loss gradient with respect
to the trainable (LoRA) weights, as one of

- `sgd`:  g
- `sign`: sign(g)
- `adam`: the update Adam would make from the checkpoint's optimizer state, m' / √(v' + ε) with
          m' = β1·m + (1−β1)·g and v' = β2·v + (1−β2)·g² (the formula of the released code)

then projected to D dimensions (projection.py) and L2-normalised. Several checkpoints' features are averaged with
their learning rates as weights and normalised again."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import InfinictxError

KINDS = ("adam", "sgd", "sign")


def trainable(model) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InfinictxError("the model has no trainable parameters (add a LoRA adapter first)")
    return params


def adam_moments(model, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The optimizer's first and second moments, flat, in the order of `trainable(model)` (zeros for a parameter
    the optimizer has not stepped yet)."""
    m, v = [], []
    for p in trainable(model):
        state = optimizer.state.get(p, {})
        m.append(state["exp_avg"].flatten() if "exp_avg" in state else torch.zeros(p.numel()))
        v.append(state["exp_avg_sq"].flatten() if "exp_avg_sq" in state else torch.zeros(p.numel()))
    return torch.cat(m).float(), torch.cat(v).float()


def example_gradient(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The flat gradient of one example's mean token loss (labels −100 are not scored)."""
    params = trainable(model)
    device = params[0].device
    loss = model(input_ids=input_ids[None].to(device), labels=labels[None].to(device), use_cache=False).loss
    if not torch.isfinite(loss):
        raise InfinictxError(f"an example's loss is {loss.item()}")
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float().cpu()
                      for g, p in zip(grads, params)])


def transform(g: torch.Tensor, kind: str, moments=None, betas=(0.9, 0.999), eps: float = 1e-8) -> torch.Tensor:
    if kind == "sgd":
        return g
    if kind == "sign":
        return torch.sign(g)
    if kind == "adam":
        if moments is None:
            raise InfinictxError("adam features need the checkpoint's optimizer state")
        m, v = moments
        m2 = betas[0] * m + (1 - betas[0]) * g
        v2 = betas[1] * v + (1 - betas[1]) * g * g
        return m2 / torch.sqrt(v2 + eps)
    raise InfinictxError(f"unknown gradient feature {kind!r}; choose one of {', '.join(KINDS)}")


def gradient_features(model, examples, projector, kind: str = "adam", moments=None, batch: int = 16,
                      progress=None) -> torch.Tensor:
    """(n, D) L2-normalised projected features of `examples` [(input_ids, labels)]."""
    out, pending = [], []
    for k, (ids, labels) in enumerate(examples):
        pending.append(transform(example_gradient(model, ids, labels), kind, moments))
        if len(pending) == batch or k == len(examples) - 1:
            out.append(projector.project(torch.stack(pending)))
            pending = []
        if progress:
            progress(1)
    return F.normalize(torch.cat(out), dim=1)


def average_checkpoints(features: list[torch.Tensor], lrs: list[float]) -> torch.Tensor:
    """Checkpoint features averaged with their learning rates as weights, normalised again."""
    if len(features) != len(lrs) or not features:
        raise InfinictxError("one learning rate per checkpoint's features")
    total = sum(lr * f for lr, f in zip(lrs, features)) / sum(lrs)
    return F.normalize(total, dim=1)
