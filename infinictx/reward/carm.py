"""Context-aware reward models (CARM, arXiv 2407.14916): a scalar reward on (context, prompt, response), trained with
the Bradley–Terry loss on pairs whose preference a context reverses, and the two-step view of preference.

- Input format: an explicit context slot, absent in the no-context view:
      Context: <criteria or scenario>\\nUser: <prompt>\\nAssistant: <response>
- The model: `AutoModelForSequenceClassification` (one label) on any HF causal LM, a LoRA on it plus the score
  head, trained by TRL's `RewardTrainer` (Bradley–Terry: −log σ(r_chosen − r_rejected)).
- Two steps: P(a ≻ b | x) = Σ_c P(c | x) · P(a ≻ b | x, c), with P(a ≻ b | x, c) = σ(r(a | x, c) − r(b | x, c)) and
  P(c | x) from a context-selection step (`context_posterior`: the language model's likelihood of each candidate
  criterion after the scenario). The error splits into picking the wrong context and judging wrongly under the
  right one (`evaluate` reports both)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.errors import InfinictxError


def format_text(prompt: str, response: str, context: str | None = None) -> str:
    if context is not None and not context.strip():
        raise InfinictxError("a context, when given, must not be empty")
    head = f"Context: {context.strip()}\n" if context is not None else ""
    return f"{head}User: {prompt}\nAssistant: {response}"


VIEWS = {"criteria": ("criteria",), "scenario": ("scenario",), "both": ("criteria", "scenario"), "none": (None,)}


def bt_rows(rows: list[dict], view: str, relevance: list[dict] = ()) -> list[dict]:
    """Bradley–Terry training rows {"chosen", "rejected"} from reversal pairs: each pair under its x context
    (response_a preferred) and its y context (response_b preferred). `view`: "criteria", "scenario", "both", or
    "none" (the contexts dropped: the same pairs with contradicting labels, the no-context baseline). Relevance
    pairs ({"prompt", "chosen", "rejected", "criteria", "scenario"}: the prompt decides) join under the same view."""
    if view not in VIEWS:
        raise InfinictxError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
    out = []
    for r in rows:
        for kind in VIEWS[view]:
            for side, good, bad in (("x", "response_a", "response_b"), ("y", "response_b", "response_a")):
                ctx = r[f"{kind}_{side}"] if kind else None
                out.append({"chosen": format_text(r["prompt"], r[good], ctx),
                            "rejected": format_text(r["prompt"], r[bad], ctx)})
    for r in relevance:
        for kind in VIEWS[view]:
            ctx = r[kind] if kind else None
            out.append({"chosen": format_text(r["prompt"], r["chosen"], ctx),
                        "rejected": format_text(r["prompt"], r["rejected"], ctx)})
    return out


@dataclass
class RewardConfig:
    rank: int = 16
    alpha: float = 32.0
    lr: float = 2e-4
    epochs: float = 3.0
    batch: int = 8
    max_length: int = 384
    seed: int = 0
    checkpoint_every: int = 0   # optimizer steps between resumable checkpoints (0: none)

    def __post_init__(self):
        if self.rank < 1 or self.batch < 1 or self.max_length < 16 or not self.lr > 0 or not self.epochs > 0:
            raise InfinictxError("rank, batch >= 1, max_length >= 16, lr and epochs > 0")
        if self.checkpoint_every < 0:
            raise InfinictxError("checkpoint_every must be >= 0 (0: no checkpoints)")

    def result_key(self) -> dict:
        """The settings the trained model depends on (how often it is checkpointed is not one)."""
        return {k: v for k, v in asdict(self).items() if k != "checkpoint_every"}


def load_reward_model(model_dir: str | Path, adapter: str | Path | None = None):
    """(model, tokenizer): the sequence-classification head on the causal LM in `model_dir` (the score head new
    unless an adapter folder with it is given)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)   # the new score head's initialisation
    model, info = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1,
                                                                     dtype=torch.float32, output_loading_info=True)
    emb = model.get_input_embeddings().weight
    if any(n in info["missing_keys"] for n, p in model.named_parameters() if p is emb):
        # tied embeddings saved once, as lm_head (our GGUF conversions, many small models): the classification
        # model has no lm_head to tie to and would start from random embeddings; take them from the causal LM
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        with torch.no_grad():
            emb.copy_(lm.get_input_embeddings().weight)
        del lm
    model.config.pad_token_id = tok.pad_token_id
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model, tok


SETUP_FILE = "train-setup.json"   # beside the checkpoints: which rows and settings they train, seconds spent


def _resume_point(out_dir: Path, setup: str) -> str | None:
    """The newest complete checkpoint in `out_dir` of a run with the same `setup`, or None; checkpoints of another
    setup are deleted (they would resume the wrong run). The trainer writes trainer_state.json last: a checkpoint
    without it was cut short."""
    stamp = out_dir / SETUP_FILE
    checkpoints = sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rpartition("-")[2] or 0))
    if stamp.exists() and json.loads(stamp.read_text()).get("setup") == setup:
        complete = [c for c in checkpoints if (c / "trainer_state.json").exists()]
        return str(complete[-1]) if complete else None
    for c in checkpoints:
        shutil.rmtree(c)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"setup": setup}))
    return None


def train(model_dir: str | Path, rows: list[dict], cfg: RewardConfig, out_dir: str | Path, callbacks=()) -> dict:
    """Train a LoRA reward model on Bradley–Terry rows with TRL; the adapter (and score head) saved in `out_dir`.
    With `cfg.checkpoint_every`, a run that stopped (killed, interrupted) resumes from its last checkpoint in
    `out_dir` when called again with the same rows and config; the checkpoints are removed once it ends. Called
    again after it ended, it returns the finished run's record without training. `callbacks`: transformers
    TrainerCallbacks (progress, early stops)."""
    try:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import TrainerCallback
        from trl import RewardConfig as TrlConfig
        from trl import RewardTrainer
    except ImportError:
        raise InfinictxError("reward-model training needs TRL: pip install 'infinictx[reward]'")
    if not rows:
        raise InfinictxError("no training pairs")
    out_dir = Path(out_dir)
    setup = hashlib.sha256(json.dumps([rows, cfg.result_key()]).encode()).hexdigest()[:16]
    stamp = out_dir / SETUP_FILE
    done = json.loads(stamp.read_text()) if stamp.exists() else {}
    if done.get("setup") == setup and "record" in done and (out_dir / "adapter_config.json").exists():
        print(f"{out_dir} already holds this training run's adapter", flush=True)   # rescoring needs no retraining
        return done["record"]
    resume = _resume_point(out_dir, setup)
    if resume:
        print(f"resuming from {resume}", flush=True)
    model, tok = load_reward_model(model_dir)
    args = TrlConfig(output_dir=str(out_dir), per_device_train_batch_size=cfg.batch, num_train_epochs=cfg.epochs,
                     learning_rate=cfg.lr, max_length=cfg.max_length, seed=cfg.seed, logging_steps=10,
                     save_strategy="steps" if cfg.checkpoint_every else "no", save_steps=cfg.checkpoint_every or 500,
                     save_total_limit=2,   # the one before the newest, should the newest be cut short
                     report_to=[], use_cpu=not torch.cuda.is_available(),
                     dataset_num_proc=None, disable_tqdm=True,
                     # TRL defaults to bf16 autocast and activation checkpointing; on an AVX2-only CPU bf16 autocast
                     # made a step > 90 s against 12 s in fp32 (on an AVX512-BF16 EPYC: 3.5 vs 5.2 s, not adopted:
                     # fp32 keeps the recorded runs comparable), and a 135M model needs no checkpointing
                     bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), gradient_checkpointing=False)
    peft = LoraConfig(task_type="SEQ_CLS", r=cfg.rank, lora_alpha=cfg.alpha, target_modules="all-linear")
    spent = done.get("seconds", 0.0) if resume else 0.0   # by the segments before (a resume keeps the stamp)
    start = time.perf_counter()

    class KeepTime(TrainerCallback):   # the training time up to each checkpoint, for the record of a resumed run
        def on_save(self, args, state, control, **kwargs):
            stamp.write_text(json.dumps({"setup": setup, "seconds": spent + time.perf_counter() - start}))

    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            peft_config=peft, callbacks=[KeepTime(), *callbacks])
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    history = [h for h in trainer.state.log_history if "loss" in h]
    record = {"steps": result.global_step, "train_loss": result.training_loss,
              "seconds": round(spent + time.perf_counter() - start, 1),
              "resumed_from": Path(resume).name if resume else None,
              "accuracy_last": history[-1].get("accuracy") if history else None}
    # the finished run on record before its checkpoints go: a call cut short here returns it, not a retraining
    stamp.write_text(json.dumps({"setup": setup, "seconds": record["seconds"], "record": record}))
    for c in out_dir.glob("checkpoint-*"):
        shutil.rmtree(c)
    return record


@torch.no_grad()
def rewards(model, tok, texts: list[str], batch: int = 16) -> torch.Tensor:
    """The reward of each text, in the order given, read as training reads it: TRL appends <eos>, tokenizes with the
    tokenizer's special tokens (Gemma's <bos>) and pads on the right. Gemma's tokenizer pads on the left, which
    without position ids shifts the positions of a short text; read without its <bos> and on the left, Gemma-3's CARM
    scored 64 of its own training pairs at 0.62 under criteria (0.93 read as trained). Texts are batched by length
    (less padding: evaluation sets mix short and long contexts)."""
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts))
    eos = tok.eos_token
    for s in range(0, len(texts), batch):
        idx = order[s:s + batch]
        enc = tok([texts[i] if texts[i].endswith(eos) else texts[i] + eos for i in idx], return_tensors="pt",
                  padding=True, padding_side="right")
        out[idx] = model(**{k: v.to(device) for k, v in enc.items()}).logits[:, 0].float().cpu()
    return out


def two_step(context_probs, preference_probs) -> float:
    """P(a ≻ b | x) = Σ_c P(c | x) · P(a ≻ b | x, c)."""
    p = torch.as_tensor(context_probs, dtype=torch.float64)
    q = torch.as_tensor(preference_probs, dtype=torch.float64)
    if p.shape != q.shape or (p < 0).any() or abs(float(p.sum()) - 1) > 1e-6:
        raise InfinictxError("context probabilities must be non-negative, sum to 1, one per preference")
    return float((p * q).sum())


NEUTRAL_SITUATION = "Nothing is known about the user."


@torch.no_grad()
def context_posterior(lm, scenario: str, candidates: list[str], cache: dict | None = None) -> torch.Tensor:
    """P(c | scenario) over candidate criteria: softmax of how much more likely the language model finds each
    criterion (mean log-probability per token) after the scenario than after a neutral one. Without that
    calibration the criterion likelier a priori can win under every scenario (uncalibrated, the first benchmark
    run's context error on reversal pairs was exactly 0.500). `cache`: a dict kept across calls for the
    log-likelihoods already computed (an evaluation asks about the same scenarios and criteria many times)."""
    device = lm.device

    cache = {} if cache is None else cache

    def loglik(situation: str, criterion: str) -> torch.Tensor:
        if (situation, criterion) in cache:
            return cache[situation, criterion]
        # the prefix with the tokenizer's special tokens: Gemma reads text without its <bos> badly
        prefix = lm.tokenizer(f"Situation: {situation}\nSo what the user wants is:").input_ids
        ids = lm.tokenizer(" " + criterion, add_special_tokens=False).input_ids
        x = torch.tensor([prefix + ids], device=device)
        logp = torch.log_softmax(lm.model(input_ids=x).logits[0, len(prefix) - 1:-1].float(), dim=-1)
        cache[situation, criterion] = logp.gather(1, torch.tensor(ids, device=device)[:, None]).mean()
        return cache[situation, criterion]

    scores = [loglik(scenario, c) - loglik(NEUTRAL_SITUATION, c) for c in candidates]
    return torch.softmax(torch.stack(scores), dim=0).cpu()


def evaluate(model, tok, rows: list[dict], adversarial: list[dict] | None = None, lm=None,
             group_by: tuple[str, ...] = ("dimension",)) -> dict:
    """Accuracy with criteria and with scenarios (each pair judged under its x and its y context; split by each
    column of `group_by` the rows have, as "by_<column>"), reversal consistency (both right), the no-context
    view's P(a ≻ b) and its agreement with the x label, adversarial accuracy (irrelevant context) against no context,
    and with `lm`, the two-step decomposition on scenarios."""
    position, index = {}, {}   # each distinct text scored once: rows that share a prompt, responses and a context
    # (the no-context view of a held-out dimension's rows, a scenario shared by several criteria) share its reward

    def add(key, text):
        index[key] = position.setdefault(text, len(position))

    for k, r in enumerate(rows):
        for resp in ("response_a", "response_b"):
            add((k, resp, None), format_text(r["prompt"], r[resp]))
            for kind in ("criteria", "scenario"):
                for side in ("x", "y"):
                    add((k, resp, f"{kind}_{side}"), format_text(r["prompt"], r[resp], r[f"{kind}_{side}"]))
    for k, r in enumerate(adversarial or []):
        for resp in ("response_a", "response_b"):
            add(("adv", k, resp, None), format_text(r["prompt"], r[resp]))
            add(("adv", k, resp, "ctx"), format_text(r["prompt"], r[resp], r["context"]))
    rw = rewards(model, tok, list(position))

    def margin(k, ctx):   # r(a) − r(b)
        return float(rw[index[(k, "response_a", ctx)]] - rw[index[(k, "response_b", ctx)]])

    out = {"pairs": len(rows)}
    for kind in ("criteria", "scenario"):
        right_x = [margin(k, f"{kind}_x") > 0 for k in range(len(rows))]
        right_y = [margin(k, f"{kind}_y") < 0 for k in range(len(rows))]
        out[kind] = {"accuracy": (sum(right_x) + sum(right_y)) / (2 * len(rows)) if rows else None,
                     "reversal_consistency": sum(a and b for a, b in zip(right_x, right_y)) / len(rows) if rows
                     else None}
        for column in group_by:   # rows that have the column (the built-in set's name their dimension)
            groups = {}
            for r, a, b in zip(rows, right_x, right_y):
                if column in r:
                    g = groups.setdefault(r[column], {"pairs": 0, "right": 0})
                    g["pairs"] += 1
                    g["right"] += a + b
            if groups:
                out[kind][f"by_{column}"] = {k: {"pairs": g["pairs"], "accuracy": g["right"] / (2 * g["pairs"])}
                                             for k, g in groups.items()}
    none = [1 / (1 + math.exp(-margin(k, None))) for k in range(len(rows))]
    out["no_context"] = {"mean_p_a": sum(none) / len(none) if none else None,
                         "agrees_with_x": sum(p > 0.5 for p in none) / len(none) if none else None}
    if adversarial:
        def adv_right(k, ctx):
            m = float(rw[index[("adv", k, "response_a", ctx)]] - rw[index[("adv", k, "response_b", ctx)]])
            return (m > 0) == (adversarial[k]["label"] == "a")

        n = len(adversarial)
        out["adversarial"] = {"no_context": sum(adv_right(k, None) for k in range(n)) / n,
                              "irrelevant_context": sum(adv_right(k, "ctx") for k in range(n)) / n,
                              "flipped": sum(adv_right(k, None) != adv_right(k, "ctx") for k in range(n)) / n}
    if lm is not None and rows:
        ctx_wrong = pref_wrong = two_step_wrong = 0
        cache = {}   # the same scenarios and criteria recur across topics
        for k, r in enumerate(rows):
            for side, other in (("x", "y"), ("y", "x")):
                post = context_posterior(lm, r[f"scenario_{side}"], [r[f"criteria_{side}"], r[f"criteria_{other}"]],
                                         cache)
                ctx_wrong += float(post[0]) < 0.5
                q_true = 1 / (1 + math.exp(-margin(k, f"criteria_{side}")))
                q_other = 1 / (1 + math.exp(-margin(k, f"criteria_{other}")))
                want_a = side == "x"
                pref_wrong += (q_true > 0.5) != want_a
                two_step_wrong += (two_step([float(post[0]), float(post[1])], [q_true, q_other]) > 0.5) != want_a
        n = 2 * len(rows)
        out["two_step"] = {"context_error": ctx_wrong / n, "preference_error_given_context": pref_wrong / n,
                           "two_step_error": two_step_wrong / n}
    return out
