"""CrossBatch (Focused Transformer) fine-tuning of the embedded SmolLM2-135M-Instruct on the project's public-domain
corpus (37 Shakespeare plays, Milton's shorter poems, two Canterbury texts; Paradise Lost held out), on a CPU.

Saves a LongLLaMA-format checkpoint to the cache, usable as `--model smollm2-fot`, and the training log with a
before/after memory probe to out/<name>.{json,md}. The defaults are the run behind `smollm2-fot` (its log:
benchmarks/results/crossbatch_auto.md): 12 retrieval layers as memory layers, ~100 steps in 30 minutes, needle
weight 1, in-batch negatives only. (`crossbatch_train.*` there is the first run: LongLLaMA's 3 spread layers, 4096
extra negatives, no gain.) That run's time budget stopped it after 102 steps; `--time-budget 0 --stop-after 102`
trains the same steps of the same schedule on a machine of any speed (bit-identical weights only on the same kind of
CPU and dtype: the first probe already differs in the 5th decimal on another CPU).

  .venv/bin/python recipes/crossbatch_finetune.py [--time-budget 1800] [--steps 110] [--mem-layers auto] [--lr 3e-4]"""

import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infinictx import InfinictxError, load_model, setting  # noqa: E402
from infinictx.core.attention import Rope  # noqa: E402
from infinictx.core.files import atomic_write, write_json  # noqa: E402
from infinictx.core.models import FOT_NAME, trained_model_dir  # noqa: E402
from infinictx.data.texts import training_corpus  # noqa: E402
from infinictx.fronts.cli import parse_settings  # noqa: E402
from infinictx.methods.memory import parse_mem_layers, resolve_mem_layers  # noqa: E402
from infinictx.methods.memory.crossbatch import CrossBatchConfig, make_batch, memory_probe, train_crossbatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    steps: int = setting(110, "optimizer steps (the LR schedule's length)")
    time_budget: float = setting(1800, "seconds of training before it stops and saves")
    stop_after: int | None = setting(None, "steps before it stops and saves (the schedule still spans --steps): "
                                     "a time-budgeted run's steps on any machine, e.g. --stop-after 102 "
                                     "--time-budget 0")
    context: int = setting(256, "tokens per local context (one batch row)")
    lr: float = setting(3e-4, "learning rate")
    rank: int = setting(32, "LoRA rank (alpha = rank), merged into the weights when saved")
    needle_rate: float = setting(0.75, "share of groups with positives that carry a synthetic fact")
    needle_weight: float = setting(1.0, "extra loss weight on the repeated codes")
    extra_negatives: int = setting(0, "detached K/V tokens of earlier batches as negatives")
    mem_layers: str = setting("auto", "e.g. 8,15,22, 'auto[:N]' (retrieval layers) or 'spread'")
    window: int = setting(1024, "local window W saved as last_context_length")
    out: str | None = setting(None, f"checkpoint folder (default {trained_model_dir(FOT_NAME)})")
    mst: bool = setting(False, "Mini-Sequence training: the same gradients in less memory (long --context)")
    mst_save_attention: bool = setting(False, "--mst, keeping attention outputs: faster, one more hidden-size "
                                       "tensor per layer")
    threads: int | None = setting(None, "torch CPU threads")
    seed: int = setting(0, "seed of the batches and the LoRA initialisation")
    name: str = setting("crossbatch_finetune", "log file name under out/")


def main(argv=None):
    s = parse_settings(Settings, argv, description=__doc__.splitlines()[0])
    if s.threads:
        torch.set_num_threads(s.threads)
    t0 = time.time()
    cfg = CrossBatchConfig(context=s.context, steps=s.steps, time_budget_s=s.time_budget or None,
                           stop_after=s.stop_after, lr=s.lr, rank=s.rank,
                           alpha=s.rank, needle_rate=s.needle_rate, seed=s.seed, extra_negatives=s.extra_negatives,
                           needle_weight=s.needle_weight, mem_layers=parse_mem_layers(s.mem_layers),
                           last_context_length=s.window, mst=s.mst, mst_save_attention=s.mst_save_attention)
    lm = load_model(None)
    docs = [lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
            for _, text in training_corpus()]
    print(f"corpus: {len(docs)} documents, {sum(len(d) for d in docs):,} tokens")
    mem_layers = set(resolve_mem_layers(cfg.mem_layers, lm))
    print("memory layers:", sorted(mem_layers))
    probe_cfg = CrossBatchConfig(**{**asdict(cfg), "needle_rate": 1.0, "mix": ((1, 0), (1, 3), (2, 1), (3, 0))})
    probe_rng = random.Random(12345)
    probe = [make_batch(docs, probe_cfg, probe_rng, lm.tokenizer, progress=1.0) for _ in range(6)]
    rope = Rope(lm.model, lm.device, lm.dtype)
    before = memory_probe(lm.model, probe, mem_layers, rope)
    print("memory probe before:", before)
    out = Path(s.out) if s.out else trained_model_dir(FOT_NAME)
    log = train_crossbatch(lm, docs, cfg, out=out)
    after = memory_probe(lm.model, probe, mem_layers, rope)
    print("memory probe after:", after)
    result = {"recipe": "crossbatch_finetune", "settings": asdict(s), "checkpoint": str(out),
              "model": "SmolLM2-135M-Instruct", "corpus_documents": len(docs),
              "corpus_tokens": int(sum(len(d) for d in docs)), "probe_before": before, "probe_after": after,
              "wall_s": round(time.time() - t0, 1), **log}
    write_json(result, ROOT / "out" / f"{s.name}.json")
    hist = log["history"]
    mean = lambda rows: sum(r["loss"] for r in rows) / max(1, len(rows))  # noqa: E731
    md = [f"## CrossBatch fine-tuning of SmolLM2-135M-Instruct ({log['steps_done']} steps, {log['train_s']:.0f} s)", "",
          f"Memory layers {sorted(mem_layers)}, context {cfg.context} tokens per row, LoRA r={cfg.rank} merged, "
          f"lr {cfg.lr}, mix {list(cfg.mix)}, negatives ×{list(cfg.negative_growth)}, needle rate {cfg.needle_rate}, "
          f"{cfg.extra_negatives} detached extra negatives per memory layer.",
          f"Training loss: first 20 steps {mean(hist[:20]):.3f} → last 20 steps {mean(hist[-20:]):.3f}.", "",
          "Memory probe (repeated secret codes whose first mention is only reachable through memory):", "",
          "| | code NLL/token with memory | without memory | codes exact with memory | without |",
          "|---|---|---|---|---|"]
    for name, pr in (("before", before), ("after", after)):
        md.append(f"| {name} | {pr['with_memory']['code_nll_per_token']:.3f} | "
                  f"{pr['without_memory']['code_nll_per_token']:.3f} | {100 * pr['with_memory']['codes_exact']:.0f}% "
                  f"| {100 * pr['without_memory']['codes_exact']:.0f}% |")
    md += ["", "Command: `.venv/bin/python recipes/crossbatch_finetune.py " + " ".join(sys.argv[1:] if argv is None
                                                                                       else argv) + "`", ""]
    atomic_write(ROOT / "out" / f"{s.name}.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    try:
        main()
    except InfinictxError as exc:
        sys.exit(f"crossbatch_finetune: error: {exc}")
