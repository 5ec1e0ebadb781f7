"""Temp-Lora (Wang et al., arXiv 2401.11504): the past lives in a temporary LoRA, not in a KV cache.

After each chunk of Δ tokens has been read (scored, or generated), a LoRA is trained on one sample: the L_T tokens
before the chunk as unlabelled context plus the chunk as target (loss on the chunk only), for a few steps. The
next chunk is then read with the updated adapter. The adapter belongs to the session: it is created when the
session starts and removed when it closes (the base weights are never written; `weights_fingerprint` checks it).

`TempLora` is a **learner**: it attaches to any session (`Session.attach`) and learns through one hook,
`learn(session, n)`, after the session has absorbed n tokens, whatever the session keeps of the past (nothing but
a window, a KV cache under a policy, a memory). Its training forwards are plain forwards over L_T + Δ tokens of the
history. The `temp-lora` method is the plain window with this learner; `temp_lora=` (`--temp-lora`) puts it on top
of any other method, with its own window W (the method's, else 1024) and Δ = min(the method's Δ or 256, W/2).

Defaults follow the official code (r=64, alpha=64, 2 steps per chunk, AdamW eps 1e-7, clip 1.0, LoRA on every
linear layer but the LM head) except: learning rate 3e-4, tuned for the embedded 135M model on the default book
(the paper's 5e-5 was for 7B models; see benchmarks/results/lr_sweep.md); no LR warm-up (the official warm-up
wastes the first chunk); LoRA dropout 0 (it must be 0 for the fused first step below, and 2 steps on one sample
leave little to regularise).

Beyond the paper: when the session scores a chunk with a plain forward over exactly the sample the learner trains
on (the window, L_T = W − Δ), the scoring forward and the first training step see the same tokens and the same
weights, so one forward with gradients serves both (`fuse_first_step`). The NLLs and the adapter updates equal
those of the unfused order (tests check it to float tolerance). With `mst` the training forwards run the
Mini-Sequence way (`infinictx.training.mst`): the same NLLs and updates, without all logits and MLP activations at
once (what a long window W needs)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import InfinictxError, check_finite
from ..core.models import LoadedModel
from ..core.registry import register_method, setting
from ..core.session import Session, check_window
from ..training.lora import AdapterHost


@register_method("temp-lora")
@dataclass
class TempLoraConfig:
    """Temp-Lora's settings: as a method, the plain window W/Δ with the learner; on top of another method, the
    learner's own training window (W, Δ, L_T) and optimiser."""

    window: int = setting(512, "W: tokens the model sees at once", short="-W")
    chunk: int | None = setting(None, "Δ: tokens per step: scored (or generated), then trained on "
                                "(default min(256, W/2))", short="-D")
    train_context: int | None = setting(None, "L_T: context tokens before the chunk in each training sample "
                                        "(default W−Δ)")
    lr: float = setting(3e-4, "Temp-Lora learning rate")
    steps: int = setting(2, "Temp-Lora optimizer steps per chunk")
    rank: int = setting(64, "LoRA rank")
    alpha: float = setting(64, "LoRA alpha")
    dropout: float = setting(0.0, "LoRA dropout", flag="--lora-dropout")
    weight_decay: float = setting(0.0, "AdamW weight decay of the adapter")
    max_grad_norm: float = setting(1.0, "gradient clipping norm of each step")
    fuse_first_step: bool = setting(True, "do not fuse scoring with the first training step (used when L_T = W − Δ "
                                    "and dropout = 0)", flag="--no-fuse")
    seed: int = setting(0, "seed of the LoRA A initialisation", flag="--lora-seed")
    save_adapter: str | None = setting(None, "directory to save the final adapter to", identity=False)
    lora_layers: str | None = setting(None, "adapt only these decoder layers: top:K (the K highest; the backward "
                                      "stops below them) or a list such as 20,21,22 (default: all)")
    train_every: int = setting(1, "train after every m-th chunk, on the last m chunks at once after the L_T tokens "
                               "before them (fewer, larger steps)")
    mst: bool = setting(False, "Mini-Sequence training for Temp-Lora steps: the same updates in a fraction of the "
                        "memory (long W)")
    mst_save_attention: bool = setting(False, "--mst, keeping each layer's attention output instead of recomputing "
                                       "it in backward: faster, one more hidden-size tensor per layer")

    def __post_init__(self):
        self.mst = self.mst or self.mst_save_attention   # keeping attention outputs is a kind of MST step
        if self.chunk is None:
            self.chunk = min(256, self.window // 2)
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
        if self.train_every < 1:
            raise InfinictxError(f"--train-every must be >= 1 (got {self.train_every})")
        if self.lora_layers is not None:
            parse_layers(self.lora_layers, None)

    def adapted_layers(self, n_layers: int) -> list[int] | None:
        """The decoder layers that get an adapter (None: all of them)."""
        return None if self.lora_layers is None else parse_layers(self.lora_layers, n_layers)

    def mst_config(self):
        from ..training.mst import from_switches

        return from_switches(self.mst, self.mst_save_attention)

    def make_session(self, lm: LoadedModel) -> Session:
        """The `temp-lora` method: the plain window W/Δ with this learner."""
        session = Session(lm, self, self.window, self.chunk)
        session.attach(TempLora(lm, self))
        return session


def parse_layers(spec: str, n_layers: int | None) -> list[int]:
    """'top:K' or '20,21,22' -> sorted layer indices, checked against n_layers when it is known."""
    text = str(spec).strip()
    try:
        if text.startswith("top:"):
            k = int(text[4:])
            if k < 1:
                raise ValueError
            layers = list(range(n_layers - k, n_layers)) if n_layers is not None else [0]
            if n_layers is not None and k > n_layers:
                raise InfinictxError(f"--lora-layers {text}: the model has {n_layers} layers")
        else:
            layers = sorted({int(x) for x in text.split(",") if x.strip()})
            if not layers or layers[0] < 0:
                raise ValueError
    except ValueError:
        raise InfinictxError(f"--lora-layers must be top:K (K >= 1) or a list of layer indices such as 20,21,22 "
                             f"(got {spec!r})")
    if n_layers is not None and layers[-1] >= n_layers:
        raise InfinictxError(f"--lora-layers {text}: layer {layers[-1]} is out of range (the model has {n_layers} "
                             f"layers, 0..{n_layers - 1})")
    return layers


class TempLora:
    """The temporary adapter, its optimizer and its training: the learner. peft wraps the linear layers of
    lm.model in place; `close` takes them out again without merging."""

    def __init__(self, lm: LoadedModel, config: TempLoraConfig):
        from ..core.attention import base_causal_lm

        self.config = config
        self.mst = config.mst_config()
        n_layers = base_causal_lm(lm.model).config.num_hidden_layers
        self.layers = config.adapted_layers(n_layers)
        self.rank = config.rank
        # for FLOP counts: LoRA work scales with the adapted layers; the backward runs down to the lowest of them
        self.flop_rank = config.rank * (1 if self.layers is None else len(self.layers) / n_layers)
        self.backward_depth = None if self.layers is None else n_layers - self.layers[0]
        # an adapter of its own on the model's adapter host: other sessions on the same model keep theirs
        self.host = AdapterHost.of(lm.model)
        self.name, self.params = self.host.add(config.rank, config.alpha, config.dropout, seed=config.seed,
                                               task_type="CAUSAL_LM", layers=self.layers)
        self.model = self.host.peft_model
        self._pending = 0   # tokens absorbed since the last training (train_every > 1)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, eps=1e-7, betas=(0.9, 0.999),
                                           weight_decay=config.weight_decay)
        self.chunks_trained = 0

    def activate(self):
        """Make this adapter the one forwards use (several sessions with adapters on one model: a server)."""
        self.host.activate(self.name)

    def base_model(self):
        """Context manager: forwards inside run the base model, the adapter switched off."""
        return self.model.disable_adapter()

    @contextmanager
    def train_mode(self):
        # Only LoRA dropout depends on the mode (Llama itself has none); keep eval mode otherwise.
        if self.config.dropout:
            self.model.train()
        try:
            yield
        finally:
            self.model.eval()

    # --- the hook: learn from what the session just absorbed ---------------------------------------------
    def learn(self, session: Session, n: int):
        """Train on the last n tokens of the session's history, in pieces of Δ, each after the L_T tokens before
        it (a plain forward inside the learner's window), `steps` steps per piece."""
        cfg = self.config
        history, end = session.history, len(session.history)
        if cfg.train_every > 1:   # wait for m chunks, then train on them at once
            self._pending += n
            span = cfg.train_every * cfg.chunk
            while self._pending >= span:
                s = end - self._pending
                self._train_piece(session, history[max(0, s - cfg.train_context):s], history[s:s + span])
                self._pending -= span
            return
        for s in range(end - n, end, cfg.chunk):
            piece = history[s:min(end, s + cfg.chunk)]
            self._train_piece(session, history[max(0, s - cfg.train_context):s], piece)

    def _train_piece(self, session: Session, context: torch.Tensor, piece: torch.Tensor):
        if len(context) + len(piece) < 2:  # a lone first token has nothing to predict
            return
        self._train(session, context, piece, self.config.steps)
        self.chunks_trained += 1

    def fuses(self, session: Session) -> bool:
        """Whether the session scores a chunk with a plain forward over exactly the sample this learner trains on
        first (L_T = W − Δ, no dropout): then that forward is also training step 1."""
        cfg = self.config
        return (cfg.fuse_first_step and cfg.dropout == 0 and session.scores_by_forward and cfg.train_every == 1
                and cfg.train_context == session.window - session.chunk and cfg.chunk >= session.chunk)

    def fuses_with(self, session: Session, chunk: torch.Tensor) -> bool:
        """`fuses`, for this chunk: one training piece, and something to predict."""
        return len(chunk) <= self.config.chunk and len(session.history) + len(chunk) >= 2 and self.fuses(session)

    def score_and_learn(self, session: Session, chunk: torch.Tensor) -> torch.Tensor:
        """Score `chunk` with a forward that is also the first training step, absorb it, train the other steps."""
        context = session.score_context()  # equals the training context, since L_T = W − Δ
        with torch.enable_grad(), session.meter.phase("scoring"):
            nll = session.chunk_nll(context, chunk, self.mst)  # with gradients: also training step 1
        scored = nll.detach().cpu()
        session.check_nll(scored)
        with torch.enable_grad(), session.meter.phase("training"):
            self._step(session, nll, len(context) + len(chunk) - 1)
        session.add_context(chunk)   # the past grows by the chunk; the learning is done here
        if self.config.steps > 1:
            self._train(session, context, chunk.cpu(), self.config.steps - 1)
        self.chunks_trained += 1
        return scored

    def train_on(self, session: Session, context: torch.Tensor, piece: torch.Tensor,
                 loss_mask: torch.Tensor | None = None):
        """`steps` optimizer steps on one sample a task built itself: `context` unlabelled, the loss on the tokens
        of `piece` where `loss_mask` is True (every token by default). Translation trains this way, with the loss
        on the target sentences only."""
        if loss_mask is not None:
            if loss_mask.shape != piece.shape:
                raise ValueError("loss_mask must have one entry per token of the piece")
            if not len(context):   # the stream's first token has no prediction
                loss_mask = loss_mask[1:]
            if not bool(loss_mask.any()):
                return
        self._train(session, context, piece, self.config.steps, loss_mask)
        self.chunks_trained += 1

    def _train(self, session: Session, context: torch.Tensor, piece: torch.Tensor, steps: int,
               loss_mask: torch.Tensor | None = None):
        with torch.enable_grad(), session.meter.phase("training"), self.train_mode():
            for _ in range(steps):
                nll = session.chunk_nll(context, piece, self.mst, targets=loss_mask)
                self._step(session, nll, len(context) + len(piece) - 1)

    def _step(self, session: Session, nll: torch.Tensor, n_inputs: int):
        """One optimizer step on the mean of `nll` (a graph over n_inputs input tokens)."""
        loss = nll.mean()
        check_finite(loss, lambda: f"Temp-Lora training loss became {loss.item()} at token {len(session.history)} "
                                   f"(chunk {self.chunks_trained}); try a lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        session.meter.add_backward(n_inputs, 0, len(nll), self.flop_rank, self.backward_depth)

    # --- reports, resume, clean-up ------------------------------------------------------------------------
    def details(self, session: Session) -> dict:
        return {"fused_first_step": self.fuses(session),
                "trainable_params": sum(p.numel() for p in self.params),
                **({"adapted_layers": self.layers} if self.layers is not None else {})}

    def state_dict(self) -> dict:
        from peft import get_peft_model_state_dict

        adapter = get_peft_model_state_dict(self.model, adapter_name=self.name)
        return {"adapter": {k: v.detach().cpu().clone() for k, v in adapter.items()},
                "optimizer": self.optimizer.state_dict(), "chunks_trained": self.chunks_trained,
                "pending": self._pending}

    def snapshot(self) -> dict:
        """A copy of the adapter and optimizer state (to go back to: a shared prompt prefix read once)."""
        import copy

        return copy.deepcopy(self.state_dict())

    def restore(self, state: dict):
        import copy

        self.load_state_dict(copy.deepcopy(state))

    def load_state_dict(self, state: dict):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state["adapter"], adapter_name=self.name)
        self.optimizer.load_state_dict(state["optimizer"])
        self.chunks_trained = state["chunks_trained"]
        self._pending = state.get("pending", 0)

    def close(self):
        """Discard the adapter (saving it first if asked): the base model is back as it was."""
        if self.config.save_adapter:
            Path(self.config.save_adapter).mkdir(parents=True, exist_ok=True)
            # a lone session's adapter is "default": saved at the folder's root, as peft does
            self.model.save_pretrained(self.config.save_adapter, selected_adapters=[self.name])
        self.host.release(self.name)   # the last adapter out takes the LoRA layers out, unmerged
        self.optimizer = None
        self.params = []
