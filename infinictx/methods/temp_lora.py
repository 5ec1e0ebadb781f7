"""Temp-Lora (Wang et al., arXiv 2401.11504): the past lives in a temporary LoRA, not in a KV cache.

After each chunk of Δ tokens has been scored (or generated), a LoRA is trained on one sample: the L_T tokens
before the chunk as unlabelled context plus the chunk as target (loss on the chunk only), for a few steps. The
next chunk is then read with the updated adapter. The adapter belongs to the session: it is created when the
session starts and removed when it closes (the base weights are never written; `weights_fingerprint` checks it).

Defaults follow the official code (r=64, alpha=64, 2 steps per chunk, AdamW eps 1e-7, clip 1.0, LoRA on every
linear layer but the LM head) except: learning rate 3e-4, tuned for the embedded 135M model on the default book
(the paper's 5e-5 was for 7B models; see benchmarks/results/lr_sweep.md); no LR warm-up (the official warm-up
wastes the first chunk); LoRA dropout 0 (it must be 0 for the fused first step below, and 2 steps on one sample
leave little to regularise).

Beyond the paper: when L_T = W − Δ the scoring forward and the first training step see the same tokens and the
same weights, so one forward with gradients serves both (`fuse_first_step`). The NLLs and the adapter updates
equal those of the unfused order (tests check it to float tolerance). With `mst` the training forwards run the
Mini-Sequence way (`infinictx.mst`): the same NLLs and updates, without all logits and MLP activations at once
(what a long window W needs)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import InfinictxError
from ..models import LoadedModel
from ..session import Session, check_window


@dataclass
class TempLoraConfig:
    window: int = 512                 # W: tokens the model sees at once
    chunk: int = 256                  # Δ: tokens scored, then trained on, per step
    train_context: int | None = None  # L_T: unlabelled tokens before the chunk in each training sample (W−Δ)
    lr: float = 3e-4
    steps: int = 2                    # optimizer steps per chunk
    rank: int = 64
    alpha: float = 64
    dropout: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    fuse_first_step: bool = True      # used when L_T = W − Δ and dropout = 0
    seed: int = 0                     # LoRA A initialisation
    save_adapter: str | None = None   # directory to save the final adapter to (optional)
    mst: bool = False                 # Mini-Sequence training steps (infinictx.mst): same updates, less memory
    mst_save_attention: bool = False  # ... keeping attention outputs (MSTConfig.save_attention); implies mst

    def __post_init__(self):
        check_window(self.window, self.chunk)
        if self.train_context is None:
            self.train_context = self.window - self.chunk
        if self.train_context < 0 or self.train_context + self.chunk > self.window:
            raise InfinictxError(f"training context L_T={self.train_context} + chunk Δ={self.chunk} must not "
                                 f"exceed the window W={self.window}")
        if self.steps < 1:
            raise InfinictxError(f"--steps must be >= 1 (got {self.steps})")
        if not self.lr > 0:
            raise InfinictxError(f"--lr must be positive (got {self.lr})")
        if self.rank < 1:
            raise InfinictxError(f"LoRA rank must be >= 1 (got {self.rank})")
        if not 0 <= self.dropout < 1:
            raise InfinictxError(f"LoRA dropout must be in [0, 1) (got {self.dropout})")

    def mst_config(self):
        from ..mst import from_switches

        return from_switches(self.mst, self.mst_save_attention)

    def make_session(self, lm: LoadedModel) -> "TempLoraSession":
        return TempLoraSession(lm, self)


class TempLora:
    """The temporary adapter and its optimizer: what Temp-Lora adds to a session. `TempLoraSession` is a sliding
    window with it; a KV-policy session can carry it too (Temp-Lora on top of LongCache or RazorAttention).
    peft wraps the linear layers of lm.model in place; `close` takes them out again without merging."""

    def __init__(self, lm: LoadedModel, config: TempLoraConfig):
        from peft import LoraConfig, get_peft_model

        self.config = config
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")  # all-linear skips the LM head
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = get_peft_model(lm.model, lora)
        self.params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, eps=1e-7, betas=(0.9, 0.999),
                                           weight_decay=config.weight_decay)
        self.chunks_trained = 0

    @contextmanager
    def train_mode(self):
        # Only LoRA dropout depends on the mode (Llama itself has none); keep eval mode otherwise.
        if self.config.dropout:
            self.model.train()
        try:
            yield
        finally:
            self.model.eval()

    def backward_and_step(self, nll: torch.Tensor, where: int):
        """One optimizer step on the mean of `nll` (a graph); `where` (a token index) is named in the error."""
        loss = nll.mean()
        if not torch.isfinite(loss):
            raise InfinictxError(f"Temp-Lora training loss became {loss.item()} at token {where} "
                                 f"(chunk {self.chunks_trained}); try a lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        from peft import get_peft_model_state_dict

        return {"adapter": {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()},
                "optimizer": self.optimizer.state_dict(), "chunks_trained": self.chunks_trained}

    def load_state_dict(self, state: dict):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.chunks_trained = state["chunks_trained"]

    def close(self):
        """Discard the adapter (saving it first if asked): the base model is back as it was."""
        if self.config.save_adapter:
            Path(self.config.save_adapter).mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(self.config.save_adapter)
        self.model.unload()  # removes the LoRA layers without merging them into the base weights
        self.optimizer = None
        self.params = []


class TempLoraSession(Session):
    method = "temp-lora"
    has_base_variant = True

    def __init__(self, lm: LoadedModel, config: TempLoraConfig):
        super().__init__(lm, config.window, config.chunk)
        self.config = config
        self.lora_rank = config.rank
        self.lora = TempLora(lm, config)
        self.model = self.lora.model
        self.mst = config.mst_config()
        self.fused = (config.fuse_first_step and config.train_context == config.window - config.chunk
                      and config.dropout == 0)

    @property
    def params(self) -> list:
        return self.lora.params

    @property
    def chunks_trained(self) -> int:
        return self.lora.chunks_trained

    def base_model_context(self):
        return self.model.disable_adapter()

    def _backward_and_step(self, nll: torch.Tensor, n_inputs: int):
        self.lora.backward_and_step(nll, len(self.history))
        self.meter.add_backward(n_inputs, 0, len(nll), self.lora_rank)

    def _train(self, context: torch.Tensor, chunk: torch.Tensor, steps: int):
        n_inputs = len(context) + len(chunk) - 1
        with self.meter.phase("training"), self.lora.train_mode():
            for _ in range(steps):
                self._backward_and_step(self.chunk_nll(context, chunk), n_inputs)

    def _train_context(self) -> torch.Tensor:
        n = self.config.train_context
        return self.history[-n:] if n and len(self.history) else self.history[:0]

    def absorb(self, chunk: torch.Tensor):
        context = self._train_context()
        self.add_context(chunk)
        if len(context) + len(chunk) >= 2:  # a lone first token has nothing to predict
            self._train(context, chunk.cpu(), self.config.steps)
        self.lora.chunks_trained += 1

    def score_and_absorb(self, chunk: torch.Tensor, compare_base: bool = False):
        if not self.fused or len(self.history) + len(chunk) < 2:
            return super().score_and_absorb(chunk, compare_base)
        base = self.score(chunk, base=True) if compare_base else None
        context = self._train_context()  # equals score_context() since L_T = W − Δ
        with self.meter.phase("scoring"):
            nll = self.chunk_nll(context, chunk)  # with gradients: this forward is also training step 1
        scored = nll.detach().cpu()
        if not torch.isfinite(scored).all():
            raise InfinictxError(f"the model produced a non-finite NLL at token {len(self.history)}")
        with self.meter.phase("training"):
            self._backward_and_step(nll, len(context) + len(chunk) - 1)
        self.add_context(chunk)
        if self.config.steps > 1:
            self._train(context, chunk.cpu(), self.config.steps - 1)
        self.lora.chunks_trained += 1
        return scored, base

    def state_dict(self) -> dict:
        return {**super().state_dict(), **self.lora.state_dict()}

    def load_state_dict(self, state: dict, history: torch.Tensor):
        super().load_state_dict(state, history)
        self.lora.load_state_dict(state)

    def describe(self) -> dict:
        d = asdict(self.config)
        d.pop("save_adapter")
        d["fused_first_step"] = self.fused
        d["trainable_params"] = sum(p.numel() for p in self.params)
        return d

    def close(self):
        """Discard the adapter (saving it first if asked) and give the model back in its original form."""
        super().close()
        if getattr(self, "model", None) is None or self.model is self.lm.model:
            return
        self.lora.close()
        self.model = self.lm.model
