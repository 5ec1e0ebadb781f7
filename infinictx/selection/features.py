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
    the optimizer has not stepped yet), on the CPU, where the per-example gradients are gathered."""
    m, v = [], []
    for p in trainable(model):
        state = optimizer.state.get(p, {})
        m.append(state["exp_avg"].flatten() if "exp_avg" in state else torch.zeros(p.numel()))
        v.append(state["exp_avg_sq"].flatten() if "exp_avg_sq" in state else torch.zeros(p.numel()))
    return torch.cat([t.cpu() for t in m]).float(), torch.cat([t.cpu() for t in v]).float()


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


def batch_gradients(model, examples) -> torch.Tensor:
    """(n, P) per-example gradients of `examples` [(input_ids, labels)] from one padded forward and backward: every
    trainable parameter is the weight of a linear layer (LoRA's A and B), whose per-example gradient is
    Σ_t grad_out[t] ⊗ input[t] over that example's tokens (Opacus's method). The loss is the sum of the examples'
    mean token losses, so each example's share is exactly its own gradient; right padding changes nothing before
    it (causal attention) and carries no loss."""
    params = trainable(model)
    owner = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
            if module.bias is not None and module.bias.requires_grad:
                raise InfinictxError("batched gradients cover linear weights only (a trainable bias found)")
            owner[id(module.weight)] = module
    if any(id(p) not in owner for p in params):
        raise InfinictxError("batched gradients need every trainable parameter to be a linear layer's weight")
    from ..training.instruct import pad, per_example_nll

    device = params[0].device
    n = len(examples)
    ids, labels, mask = pad(examples)
    inputs, grads, handles = {}, {}, []

    def keep(module, inp, out):
        inputs[module] = inp[0].detach()
        out.register_hook(lambda g, m=module: grads.__setitem__(m, g.detach()))

    for module in set(owner.values()):
        handles.append(module.register_forward_hook(keep))
    try:
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        per_example = per_example_nll(logits, labels)
        if not torch.isfinite(per_example).all():
            raise InfinictxError("an example's loss is not finite")
        per_example.sum().backward()
    finally:
        for h in handles:
            h.remove()
    out = [torch.einsum("bto,bti->boi", grads[owner[id(p)]].float(), inputs[owner[id(p)]].float()).reshape(n, -1)
           for p in params]
    for p in params:
        p.grad = None
    return torch.cat(out, dim=1).cpu()


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
                      progress=None, max_bytes: int = 4 << 30) -> torch.Tensor:
    """(n, D) L2-normalised projected features of `examples` [(input_ids, labels)]. The transformed gradients are
    gathered (in bfloat16, up to `max_bytes` at a time) and projected together: generating the projection costs
    P × D per pass whatever the number of rows, so the fewer passes the better."""
    return feature_sets(model, examples, [(kind, projector)], moments, batch, progress, max_bytes)[0]


def feature_sets(model, examples, outputs: list[tuple[str, object]], moments=None, batch: int = 16,
                 progress=None, max_bytes: int = 4 << 30) -> list[torch.Tensor]:
    """`gradient_features` for several (kind, projector) outputs from one backward pass per example: the gradients
    are the costly part, and ablations (SGD against Adam features, D=512 against 8192) differ only after them. One
    bfloat16 buffer per kind; `max_bytes` covers them all."""
    if not outputs:
        raise InfinictxError("no feature outputs asked for")
    grad_dim = outputs[0][1].grad_dim
    if any(proj.grad_dim != grad_dim for _, proj in outputs):
        raise InfinictxError("every projector must take the same gradient size")
    kinds = list(dict.fromkeys(kind for kind, _ in outputs))
    per_pass = max(1, max_bytes // (2 * grad_dim * len(kinds)))
    if moments is not None:   # where the per-example gradients are gathered (an optimizer on CUDA keeps them there)
        moments = tuple(m.cpu() for m in moments)
    # shortest first: a batch is padded to its longest example, and lengths differ several-fold across families
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    by_length = [examples[i] for i in order]
    out: list[list[torch.Tensor]] = [[] for _ in outputs]
    for s in range(0, len(by_length), per_pass):
        part = by_length[s:s + per_pass]
        bufs = {kind: torch.empty(len(part), grad_dim, dtype=torch.bfloat16) for kind in kinds}
        for b in range(0, len(part), batch):
            g = batch_gradients(model, part[b:b + batch])
            for kind, buf in bufs.items():
                buf[b:b + len(g)] = transform(g, kind, moments)
            if progress:
                progress(len(g))
        for k, (kind, proj) in enumerate(outputs):
            out[k].append(proj.project(bufs[kind]))
        del bufs
    results = []
    for o in out:
        got = torch.cat(o)
        results.append(F.normalize(torch.empty_like(got).index_copy_(0, torch.tensor(order), got), dim=1))
    return results


def average_checkpoints(features: list[torch.Tensor], lrs: list[float]) -> torch.Tensor:
    """Checkpoint features averaged with their learning rates as weights, normalised again."""
    if len(features) != len(lrs) or not features:
        raise InfinictxError("one learning rate per checkpoint's features")
    total = sum(lr * f for lr, f in zip(lrs, features)) / sum(lrs)
    return F.normalize(total, dim=1)
