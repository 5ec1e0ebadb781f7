"""`infinictx reward-train` and `infinictx reward-score`: context-aware reward models (CARM) from the command line.

  infinictx reward-train PAIRS --out DIR [--view both|criteria|scenario|none] [--model M] [--epochs 3] [--lr 2e-4]
      [--rank 16] [--batch 8] [--max-length 384] [--checkpoint-every 50]
  infinictx reward-score PAIRS --adapter DIR [--model M] [--json OUT]
  infinictx reward-score ROWS.jsonl --adapter DIR [--out SCORED.jsonl]

PAIRS: a file in RPR's column layout (.csv / .jsonl / .parquet: prompt, response_a, response_b, criteria_x,
criteria_y, scenario_x, scenario_y), or `builtin` for the offline reversal set (`infinictx/data/preferences.py`:
its training split and relevance pairs to train, its held-out split and adversarial pairs to score). Scoring pairs
prints the accuracy under criteria and under scenarios, reversal consistency and the no-context view as JSON.
ROWS: a JSONL of {"prompt", "response", optional "context"} scored one by one (a "reward" field added). The
adapter folder is written whole or not at all (trained beside it in DIR.partial, renamed when done); a training
run that stopped resumes from its last checkpoint there when the same command is run again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..core.errors import InfinictxError


def add_parsers(sub):
    t = sub.add_parser("reward-train", help="train a context-aware reward model (LoRA + score head, Bradley-Terry)")
    t.add_argument("pairs", help="RPR-layout .csv/.jsonl/.parquet, or `builtin` (the offline reversal set)")
    t.add_argument("--out", required=True, help="folder for the adapter and score head")
    t.add_argument("--view", default="both", choices=["both", "criteria", "scenario", "none"],
                   help="which contexts to train with (none: the no-context baseline)")
    t.add_argument("--epochs", type=float, default=3.0)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--rank", type=int, default=16)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--max-length", type=int, default=384)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=50,
                   help="optimizer steps between resumable checkpoints (0: none)")
    s = sub.add_parser("reward-score", help="score preference pairs or responses with a reward model")
    s.add_argument("pairs", help="RPR-layout pairs, `builtin`, or a JSONL of {prompt, response, context?} rows")
    s.add_argument("--adapter", default=None, help="a folder from reward-train (none: an untrained score head)")
    s.add_argument("--json", default=None, help="also write the pair scores here")
    s.add_argument("--out", default=None, help="rows mode: the scored rows (default: stdout)")
    for p in (t, s):
        p.add_argument("--model", default=None)
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--debug", action="store_true")


def _pairs(spec: str, split: str):
    """(pairs, adversarial pairs, relevance pairs) from a file or the built-in set's `split`."""
    from ..data.preferences import build_reversal_set, read_rpr

    if spec == "builtin":
        data = build_reversal_set()
        return (data.train, [], data.relevance) if split == "train" else (data.test, data.adversarial, [])
    return read_rpr(spec), [], []


def _response_rows(path: Path) -> list[dict] | None:
    """The rows of a {prompt, response, context?} JSONL, or None when the file holds pairs."""
    from ..data.texts import jsonl_rows

    if path.suffix != ".jsonl":
        return None
    rows = [obj for _, obj in jsonl_rows(path)]
    if not rows or "response" not in rows[0]:
        return None
    for k, r in enumerate(rows, 1):
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("response"), str):
            raise InfinictxError(f"{path}:{k}: a row needs string fields \"prompt\" and \"response\"")
        if "context" in r and r["context"] is not None and not isinstance(r["context"], str):
            raise InfinictxError(f"{path}:{k}: \"context\" must be a string")
    return rows


def cmd_reward_train(args) -> int:
    import torch

    from ..core.models import resolve_model_path
    from ..reward.carm import RewardConfig, bt_rows, train

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise InfinictxError(f"{out} exists and is not empty: choose a new --out folder")
    cfg = RewardConfig(rank=args.rank, lr=args.lr, epochs=args.epochs, batch=args.batch, max_length=args.max_length,
                       seed=args.seed, checkpoint_every=args.checkpoint_every)
    pairs, _, relevance = _pairs(args.pairs, "train")
    rows = bt_rows(pairs, args.view, relevance)
    model_dir = resolve_model_path(args.model)[0]
    partial = out.with_name(out.name + ".partial")   # kept should training stop: the next run resumes from it
    record = train(model_dir, rows, cfg, partial)
    if out.exists():
        out.rmdir()
    partial.rename(out)
    print(json.dumps({"out": str(out), "pairs": len(pairs), "rows": len(rows), **record}))
    return 0


def cmd_reward_score(args) -> int:
    import torch

    from ..core.files import atomic_write
    from ..core.models import resolve_model_path
    from ..reward.carm import evaluate, format_text, load_reward_model, rewards

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise InfinictxError(f"{args.adapter} is not a reward-train folder (no adapter_config.json)")
    path = Path(args.pairs)
    if args.pairs != "builtin" and not path.is_file():
        raise InfinictxError(f"{path} does not exist")
    response_rows = None if args.pairs == "builtin" else _response_rows(path)
    pairs, adversarial, _ = ([], [], []) if response_rows is not None else _pairs(args.pairs, "test")
    model, tok = load_reward_model(resolve_model_path(args.model)[0], args.adapter)
    if response_rows is not None:
        scores = rewards(model, tok, [format_text(r["prompt"], r["response"], r.get("context"))
                                      for r in response_rows])
        text = "".join(json.dumps({**r, "reward": float(s)}, ensure_ascii=False) + "\n"
                       for r, s in zip(response_rows, scores))
        if args.out:
            atomic_write(args.out, text)
        else:
            sys.stdout.write(text)
        return 0
    result = evaluate(model, tok, pairs, adversarial)
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0
