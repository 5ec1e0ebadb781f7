"""`infinictx` command line: a thin front over the run layer (`infinictx.runs`).

  infinictx ppl [FILE] --method M ...          streaming perplexity
  infinictx generate --prompt TEXT --tokens N  long generation
  infinictx passkey --method M --lengths 1k,4k --trials N   retrieval accuracy
  infinictx translate bible:Genesis --src-lang zh --tgt-lang en --model gemma3-270m   long-document translation
  infinictx fetch                              cache the embedded model, the default book and RAG's embedder
  infinictx serve                              long-context sessions over HTTP
  infinictx ngram-index CORPUS --out DIR       index a corpus's n-grams; `infinictx trace TASK.jsonl --index DIR`
  infinictx select POOL.jsonl --out SUB.jsonl  choose 5% of an instruction pool (TAGCOS)

The flags are built from the settings of every registered method and task (`core.registry.setting`): a flag
several methods share (-W, -D, --sinks) is one flag, and each default lives in its dataclass. A flag of another
method is an error, as is a Temp-Lora flag without Temp-Lora; -W and -D are common to every method (full and
razor keep no window and ignore -W)."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import fields

from ..core.errors import InfinictxError
from ..core.registry import METHODS, build, setting_type
from ..learners.temp_lora import TempLoraConfig
from ..runs import make_spec, run
from ..tasks import TASKS

COMMON = ("window", "chunk")   # every method reads them where it has them
OUTPUTS = {  # output flags per task: (Outputs field, flag, metavar, help)
    "ppl": [("json", "--json", "OUT.json", "write the results as JSON"),
            ("report", "--report", "OUT.md", "Markdown report (default: next to --json)"),
            ("plot", "--plot", "OUT.png", "plot PPL against position")],
    "generate": [("json", "--json", "OUT.json", "write the results as JSON"),
                 ("text", "--out", "OUT.txt", "write the generated text to this file")],
    "passkey": [("json", "--json", "OUT.json", "write the results as JSON (and the report next to it, .md)"),
                ("plot", "--plot", "OUT.png", "plot accuracy against length")],
    "translate": [("json", "--json", "OUT.json", "write the results as JSON"),
                  ("report", "--report", "OUT.md", "Markdown report (default: next to --json)"),
                  ("text", "--out", "OUT.txt", "write the translation, one sentence per line")],
}


def _flags(f) -> list[str]:
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return [f.metadata["short"], flag] if f.metadata.get("short") else [flag]


def _dest(f) -> str:
    return _flags(f)[-1].lstrip("-").replace("-", "_")


def _cli_fields(cls):
    return [f for f in fields(cls) if f.metadata.get("cli", True) and f.init]


def _default_text(f, default) -> str:
    """A setting's default for the help: its value, or what its help says it is resolved to."""
    if default is not None:
        return str(default)
    m = re.search(r"\(default:? (.*)\)\s*$", f.metadata.get("help", ""))
    return m.group(1) if m else "automatic"


def _add_setting(group, f, help_text: str):
    kind = setting_type(f)
    kw = {"dest": _dest(f), "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
    if kind is bool:
        kw["action"] = "store_false" if f.default else "store_true"
    else:
        kw["type"] = kind if kind in (int, float, str) else str   # parsers run when the config is built
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
    if f.metadata.get("positional"):
        kw.pop("dest")
        group.add_argument(f.name, nargs="?", **kw)
    else:
        group.add_argument(*_flags(f), **kw)


def _help(f, default) -> str:
    """A setting's help with its default: its value, or what its help says it resolves to."""
    text = f.metadata.get("help", "")
    if isinstance(default, bool) or (default is None and "(default" in text):
        return text
    return f"{text} ({'none' if default is None else default})"


def _add_method_settings(parser, task_cls):
    """The learner's flags in one group; then one flag per distinct setting of the methods, its help listing the
    methods that take it with their defaults (this task's, where it has its own)."""
    learner = parser.add_argument_group("Temp-Lora (--method temp-lora, or --temp-lora with any other method)")
    for f in _cli_fields(TempLoraConfig):
        if f.name not in COMMON:
            _add_setting(learner, f, _help(f, f.default))
    by_dest: dict[str, list] = {}
    for name, cls in METHODS.items():
        defaults = task_cls.method_defaults.get(name, {})
        for f in _cli_fields(cls):
            if cls is not TempLoraConfig or f.name in COMMON:
                by_dest.setdefault(_dest(f), []).append((name, f, defaults.get(f.name, f.default)))
    group = parser.add_argument_group("method settings (each names the methods that take it, with their defaults)")
    for owners in by_dest.values():
        f = owners[0][1]
        base = re.sub(r"\s*\(default:? .*\)\s*$", "", f.metadata.get("help", ""))
        where = "; ".join(f"{m}: {_default_text(g, d)}" for m, g, d in owners)
        _add_setting(group, f, f"{base} [{where}]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinictx", description="Long texts through a short context window.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, task_cls in TASKS.items():
        p = sub.add_parser(name, help=(task_cls.__doc__ or "").strip())
        p.add_argument("--method", choices=list(METHODS), default=task_cls.default_method,
                       help=f"the method ({task_cls.default_method})")
        p.add_argument("--temp-lora", action="store_true", help="train Temp-Lora on top of the method (its flags: "
                       "--train-context, --lr, --steps, --rank, ...; its window: the method's, else 1024)")
        for f in _cli_fields(task_cls):
            _add_setting(p, f, _help(f, f.default) if f.default is not None else f.metadata.get("help", ""))
        _add_method_settings(p, task_cls)
        out = p.add_argument_group("outputs")
        for field_name, flag, metavar, help_text in OUTPUTS[name]:
            out.add_argument(flag, dest=f"out_{field_name}", metavar=metavar, default=None, help=help_text)
        run_group = p.add_argument_group("model and machine")
        run_group.add_argument("--model", default=None, help="HF model directory, .gguf file, gemma3-270m, "
                               "smollm2-fot or smollm2-fot-books (default: embedded SmolLM2)")
        run_group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
        run_group.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
        run_group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        run_group.add_argument("--no-progress", action="store_true", help="no progress bar")
        if task_cls.splits:
            ray = p.add_argument_group("Ray (the units of work spread over workers, each loading the model once)")
            ray.add_argument("--ray", action="store_true", help="run on Ray: a local one, or --address's cluster")
            ray.add_argument("--address", default=None, help="an existing Ray cluster (e.g. ray://host:10001)")
            ray.add_argument("--workers", type=int, default=None, help="Ray workers (default: CPUs ÷ threads)")
            ray.add_argument("--threads-per-worker", type=int, default=1, help="torch threads per worker (1)")
        run_group.add_argument("--debug", action="store_true", help="show tracebacks")
    srv = sub.add_parser("serve", help="long-context sessions over HTTP on one loaded model")
    srv.add_argument("--model", default=None, help="HF model directory, .gguf file or a named model")
    srv.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", action="append", default=[], help="a bearer key clients must send (repeatable)")
    srv.add_argument("--max-sessions", type=int, default=16)
    srv.add_argument("--max-request-tokens", type=int, default=32768)
    srv.add_argument("--queue-size", type=int, default=64, help="model jobs waiting at most (beyond: 503)")
    srv.add_argument("--state-dir", default=None,
                     help="checkpoint every session here after each change; a restart continues them")
    srv.add_argument("--idle-expiry", type=float, default=3600.0,
                     help="seconds a session may stay idle before it and its state are deleted (0: never)")
    srv.add_argument("--device", default="auto")
    srv.add_argument("--dtype", default="auto")
    srv.add_argument("--threads", type=int, default=None)
    srv.add_argument("--debug", action="store_true")
    fetch = sub.add_parser("fetch", help="download and cache the embedded model, the default book and RAG's embedder")
    fetch.add_argument("--translation", action="store_true", help="also Gemma-3-270M and the Bible (CUV, KJV)")
    fetch.add_argument("--debug", action="store_true")
    from .ngram_cli import add_parsers
    from .reward_cli import add_parsers as add_reward
    from .select_cli import add_parser as add_select

    add_parsers(sub)
    add_select(sub)
    add_reward(sub)
    return parser


def parse_settings(cls, argv=None, description: str | None = None):
    """A settings dataclass (e.g. a recipe's) filled from command-line flags made from its fields; errors are
    one line and exit code 2."""
    parser = argparse.ArgumentParser(description=description)
    for f in _cli_fields(cls):
        _add_setting(parser, f, _help(f, f.default))
    given = vars(parser.parse_args(argv))
    try:
        return build(cls, {f.name: given[_dest(f)] for f in _cli_fields(cls) if _dest(f) in given})
    except InfinictxError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def _flag_fields(cls) -> dict[str, str]:
    """dest -> field name, for the settings of a method or task class that have flags."""
    return {_dest(f): f.name for f in _cli_fields(cls)}


def spec_from_args(args):
    """The run spec the parsed flags describe (every setting validated; no model loaded)."""
    given = vars(args)
    method = args.method
    own = _flag_fields(METHODS[method])
    learner = {d: n for d, n in _flag_fields(TempLoraConfig).items() if n not in COMMON}
    owners = {}   # dest -> the methods with that setting
    for name, cls in METHODS.items():
        for dest in _flag_fields(cls):
            owners.setdefault(dest, []).append(name)
    task_flags = _flag_fields(TASKS[args.command])
    settings, learner_settings = {}, {}
    for dest, value in given.items():
        if dest in task_flags or dest not in owners:
            continue
        flag = "--" + dest.replace("_", "-")
        if dest in own:
            settings[own[dest]] = value
        elif dest in learner:
            if not args.temp_lora:
                raise InfinictxError(f"{flag} applies to Temp-Lora training (--method temp-lora, or --temp-lora with "
                                     "another method)")
            learner_settings[learner[dest]] = value
        elif dest not in COMMON:   # -W / -D: a method without a window or chunk of its own ignores them
            raise InfinictxError(f"{flag} is not a setting of --method {method} (it belongs to "
                                 f"{', '.join(owners[dest])})")
    task_settings = {task_flags[d]: v for d, v in given.items() if d in task_flags}
    outputs = {f: given.get(f"out_{f}") for f, *_ in OUTPUTS[args.command]}
    ray = None
    if getattr(args, "ray", False):
        ray = {"address": args.address, "workers": args.workers, "threads_per_worker": args.threads_per_worker}
    elif getattr(args, "address", None) or getattr(args, "workers", None):
        raise InfinictxError("--address and --workers apply with --ray")
    return make_spec(args.command, method, settings, temp_lora=(learner_settings or True) if args.temp_lora else None,
                     task_settings=task_settings, model=args.model, device=args.device, dtype=args.dtype,
                     threads=args.threads, outputs=outputs, progress=not args.no_progress, ray=ray)


def cmd_fetch(args) -> int:
    from ..core.models import embedded_gguf, resolve_model_path
    from ..data.texts import default_book_path
    from ..methods.rag.retrievers import default_embedder_dir

    print(f"book:  {default_book_path()}")
    print(f"model: {embedded_gguf()}")
    print(f"converted: {resolve_model_path(None)[0]}")
    print(f"embedder: {default_embedder_dir()}")
    if args.translation:
        from ..data.parallel import cuv_path, kjv_path

        print(f"gemma3-270m: {resolve_model_path('gemma3-270m')[0]}")
        print(f"bible: {cuv_path()}, {kjv_path()}")
    return 0


def cmd_serve(args) -> int:
    import torch

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise InfinictxError("serve needs FastAPI and uvicorn: pip install 'infinictx[serve]'")
    from ..core.models import load_model
    from .serve import ServeSettings, serve

    settings = ServeSettings(api_keys=tuple(args.api_key), max_sessions=args.max_sessions,
                             max_request_tokens=args.max_request_tokens, queue_size=args.queue_size,
                             state_dir=args.state_dir, idle_expiry_s=args.idle_expiry)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    print(f"infinictx: serving {lm.name} on http://{args.host}:{args.port}", file=sys.stderr)
    serve(lm, settings, args.host, args.port)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fetch":
            return cmd_fetch(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "select":
            from .select_cli import cmd_select

            return cmd_select(args)
        if args.command in ("reward-train", "reward-score"):
            from .reward_cli import cmd_reward_score, cmd_reward_train

            return (cmd_reward_train if args.command == "reward-train" else cmd_reward_score)(args)
        if args.command in ("ngram-index", "trace"):
            from .ngram_cli import cmd_ngram_index, cmd_trace

            return (cmd_ngram_index if args.command == "ngram-index" else cmd_trace)(args)
        result = run(spec_from_args(args))
        if result.stdout:
            print(result.stdout)
        if result.stderr:
            print(result.stderr, file=sys.stderr)
        return 0
    except InfinictxError as exc:
        if args.debug:
            raise
        print(f"infinictx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        ckpt = getattr(args, "checkpoint", None)
        extra = f"; rerun the same command to resume from {ckpt}" if ckpt else ""
        print(f"infinictx: interrupted{extra}", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line by default, the traceback with --debug
        if args.debug:
            raise
        print(f"infinictx: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
