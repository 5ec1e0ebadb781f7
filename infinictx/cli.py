"""`infinictx` command line: a thin layer over the library.

  infinictx ppl [FILE] --method {window,temp-lora,memory} --window W --chunk D ...   streaming perplexity
  infinictx generate --prompt TEXT --tokens N ...                                   long generation
  infinictx passkey --method {window,memory,temp-lora,full,streaming,longcache,razor} --lengths 1k,4k --trials N
                                                                                    retrieval accuracy
  infinictx fetch                                                                   cache the default model and book
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import InfinictxError


METHOD_NAMES = ["window", "temp-lora", "memory", "full", "streaming", "longcache", "razor"]
KV_POLICIES = ("full", "streaming", "longcache", "razor")


def _add_common(p: argparse.ArgumentParser, default_method: str = "temp-lora", default_window: int = 512):
    p.add_argument("--method", choices=METHOD_NAMES, default=default_method)
    p.add_argument("--window", "-W", type=int, default=None,
                   help=f"W: tokens the model sees at once ({default_window}; memory: local window)")
    p.add_argument("--chunk", "-D", type=int, default=None, help="Δ: tokens per chunk (256; memory: W/2)")
    p.add_argument("--train-context", type=int, default=None, help="L_T: context tokens per training sample (W−Δ)")
    p.add_argument("--lr", type=float, default=None, help="Temp-Lora learning rate (3e-4)")
    p.add_argument("--steps", type=int, default=None, help="Temp-Lora optimizer steps per chunk (2)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (64)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (64)")
    p.add_argument("--no-fuse", action="store_true", help="do not fuse scoring with the first training step")
    p.add_argument("--save-adapter", default=None, help="directory to save the final adapter to")
    p.add_argument("--mst", action="store_true", help="Mini-Sequence training for Temp-Lora steps: the same updates "
                   "in a fraction of the memory (long W)")
    p.add_argument("--mst-save-attention", action="store_true", help="--mst, keeping each layer's attention output "
                   "instead of recomputing it in backward: faster, one more hidden-size tensor per layer")
    m = p.add_argument_group("memory method (Focused Transformer)")
    m.add_argument("--mem-layers", default=None, help="memory layer indices (e.g. 8,15,22), 'auto[:N]' (the N layers "
                   "with the strongest retrieval heads; N = 40%% of layers) or 'spread' (3 layers, LongLLaMA); default: "
                   "the checkpoint's, else auto")
    m.add_argument("--positionals", choices=["first", "distance", "window", "none"], default=None,
                   help="RoPE of memory keys: as if first in the window (default), at distance W, ...")
    m.add_argument("--lookup", choices=["dense", "topk"], default="dense", help="all memory entries or the top k")
    m.add_argument("--topk", type=int, default=128, help="k of the top-k lookup (128)")
    m.add_argument("--mem-dtype", default=None, help="dtype of the stored memory (default: the model's)")
    m.add_argument("--grouping", default=None, metavar="HEADS,QUERIES",
                   help="memory attention in blocks of query heads × queries (bounds peak memory)")
    kv = p.add_argument_group("KV-cache policies (full, streaming, longcache, razor)")
    kv.add_argument("--temp-lora", action="store_true", help="train Temp-Lora on top of the policy (uses --lr, "
                    "--steps, --rank, --alpha, --train-context)")
    kv.add_argument("--sinks", type=int, default=4, help="attention-sink tokens every head keeps (streaming, razor: 4)")
    kv.add_argument("--global-tokens", type=int, default=32, help="longcache: first tokens always attended (32)")
    kv.add_argument("--span", type=int, default=32, help="longcache: tokens recalled around each selected one (32)")
    kv.add_argument("--recall-clip", type=int, default=None, help="longcache: spans recalled per step "
                    "(default: half of what W leaves after global tokens and Δ)")
    kv.add_argument("--select-topk", type=int, default=4, help="longcache: positions each query and head votes for (4)")
    kv.add_argument("--select-dtype", default=None, help="longcache: dtype of the selection scores (default: the "
                    "model's; bfloat16 is ~2x faster on CPUs with AMX)")
    kv.add_argument("--keep-ratio", type=float, default=0.0625, help="razor: 1/C, share of tokens a non-retrieval "
                    "head keeps (1/16)")
    kv.add_argument("--min-window", type=int, default=256, help="razor: S0, recent tokens a non-retrieval head "
                    "keeps at least (256)")
    kv.add_argument("--induction-ratio", type=float, default=0.14, help="razor: share of KV heads kept whole as "
                    "induction heads (0.14)")
    kv.add_argument("--echo-ratio", type=float, default=0.10, help="razor: ... as echo heads (0.10; paper 0.01)")
    kv.add_argument("--compensation", choices=["weighted", "mean", "none"], default="weighted",
                    help="razor: compensation token weighted by the dropped count (paper), plain mean, or none")
    kv.add_argument("--prefill", choices=["chunked", "dense"], default="chunked",
                    help="razor: compress after every chunk (bounded while reading) or once the prompt is in "
                    "(as the paper and kvpress; passkey/generate only: perplexity never ends a prompt)")
    p.add_argument("--model", default=None, help="HF model directory or .gguf file (default: embedded SmolLM2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinictx", description="Long texts through a short context window.")
    sub = parser.add_subparsers(dest="command", required=True)

    ppl = sub.add_parser("ppl", help="streaming perplexity of a long text")
    ppl.add_argument("file", nargs="?", default=None, help=".txt, folder of .txt, .jsonl or .parquet "
                                                             "(default: the default book, Paradise Lost)")
    _add_common(ppl)
    ppl.add_argument("--record", type=int, default=0, help="row of a .jsonl/.parquet file (0)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="only the first N tokens of the text")
    ppl.add_argument("--compare-base", action="store_true", help="also score every chunk with the method off")
    ppl.add_argument("--bucket-size", type=int, default=10_000, help="position bucket width in tokens (10000)")
    ppl.add_argument("--plot", default=None, metavar="OUT.png", help="plot PPL against position")
    ppl.add_argument("--report", default=None, metavar="OUT.md", help="Markdown report (default: next to --json)")
    ppl.add_argument("--checkpoint", default=None, help="checkpoint file: a rerun resumes from it")

    gen = sub.add_parser("generate", help="generate a long text chunk by chunk")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", default=None, help="prompt text")
    src.add_argument("--prompt-file", default=None, help="file with the prompt")
    _add_common(gen)
    gen.add_argument("--tokens", type=int, default=1024, help="tokens to generate (1024)")
    gen.add_argument("--context", type=int, default=None, help="L_x: tokens each chunk is conditioned on (W−Δ)")
    gen.add_argument("--no-cache-reuse", action="store_true", help="re-encode the context after every update")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.12)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", default=None, help="write the generated text to this file")

    pk = sub.add_parser("passkey", help="retrieval accuracy against prompt length (passkey or key-value lookup)")
    _add_common(pk, default_method="window", default_window=1024)
    pk.add_argument("--task", choices=["passkey", "kv"], default="passkey")
    pk.add_argument("--lengths", default="1k,2k,4k", help="prompt lengths in tokens, e.g. 1k,2k,4k,...,64k")
    pk.add_argument("--trials", type=int, default=20, help="trials per length, needle depths spread evenly (20)")
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--plot", default=None, metavar="OUT.png", help="plot accuracy against length")

    fetch = sub.add_parser("fetch", help="download and cache the embedded model and the default book")
    fetch.add_argument("--debug", action="store_true")
    return parser


def _int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InfinictxError(f"{what} must be comma-separated integers, got {text!r}")


def method_config(args, default_window: int = 512):
    """The method's config dataclass from the arguments (validates W, Δ, L_T; a memory config is validated
    against the model when the session is made)."""
    from .methods import MemoryConfig, TempLoraConfig, WindowConfig
    from .methods.memory import parse_mem_layers

    trains_temp_lora = args.method == "temp-lora" or (args.method in KV_POLICIES and args.temp_lora)
    if (args.mst or args.mst_save_attention) and not trains_temp_lora:
        raise InfinictxError("--mst applies to Temp-Lora training (--method temp-lora, or a policy with --temp-lora)")
    if args.method == "memory":
        grouping = _int_list(args.grouping, "--grouping")
        if grouping is not None and len(grouping) != 2:
            raise InfinictxError("--grouping takes two numbers: HEADS,QUERIES")
        return MemoryConfig(window=args.window, chunk=args.chunk, mem_layers=parse_mem_layers(args.mem_layers),
                            positionals=args.positionals, lookup=args.lookup, topk=args.topk,
                            mem_dtype=args.mem_dtype, grouping=grouping)
    extra = {k: getattr(args, k) for k in ("train_context", "lr", "steps", "rank", "alpha")
             if getattr(args, k) is not None}
    if args.mst or args.mst_save_attention:
        extra.update(mst=True, mst_save_attention=args.mst_save_attention)
    if args.method in KV_POLICIES:
        return _policy_config(args, extra)
    if args.temp_lora:
        raise InfinictxError("--temp-lora goes with a KV-cache policy (--method full|streaming|longcache|razor)")
    window = default_window if args.window is None else args.window
    chunk = min(256, window // 2) if args.chunk is None else args.chunk
    if args.method == "window":
        return WindowConfig(window=window, chunk=chunk)
    return TempLoraConfig(window=window, chunk=chunk, fuse_first_step=not args.no_fuse,
                          save_adapter=args.save_adapter, **extra)


def _policy_config(args, temp_lora_extra: dict):
    """The config of a KV-cache policy, with Temp-Lora on top if asked (W and Δ are validated when the session
    is made)."""
    from .methods import FullConfig, LongCacheConfig, RazorConfig, StreamingConfig, TempLoraConfig

    window = 1024 if args.window is None else args.window
    if args.window is not None and args.window <= 0:
        raise InfinictxError(f"--window must be > 0 (got {args.window})")
    chunk = args.chunk
    temp_lora = None
    if args.temp_lora:
        scope = window if args.method in ("streaming", "longcache") else 1024
        tl_chunk = min(256, scope // 2) if chunk is None else min(chunk, scope // 2)
        temp_lora = TempLoraConfig(window=scope, chunk=tl_chunk, save_adapter=args.save_adapter, **temp_lora_extra)
    if args.method == "full":
        return FullConfig(chunk=chunk or 512, temp_lora=temp_lora)
    if args.method == "streaming":
        return StreamingConfig(window=window, sinks=args.sinks, chunk=chunk, temp_lora=temp_lora)
    if args.method == "longcache":
        return LongCacheConfig(window=window, chunk=chunk, global_tokens=args.global_tokens, span=args.span,
                               recall_clip=args.recall_clip, topk=args.select_topk, select_dtype=args.select_dtype,
                               temp_lora=temp_lora)
    return RazorConfig(chunk=chunk or 512, keep_ratio=args.keep_ratio, min_window=args.min_window, sinks=args.sinks,
                       induction_ratio=args.induction_ratio, echo_ratio=args.echo_ratio,
                       compensation=args.compensation, prefill=args.prefill, temp_lora=temp_lora)


def _setup_torch(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def cmd_ppl(args) -> int:
    from .evaluate import streaming_perplexity
    from .models import load_model, weights_fingerprint
    from .report import plot_ppl, ppl_markdown, write_json, atomic_write
    from .texts import read_text

    config = method_config(args)  # validates W, Δ, L_T before any heavy work
    window = getattr(config, "window", None)
    if args.max_tokens is not None and window and args.max_tokens <= window:
        raise InfinictxError(f"--max-tokens {args.max_tokens} must be larger than the window W={window}")
    text, text_name = read_text(args.file, record=args.record)
    _setup_torch(args)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    before = weights_fingerprint(lm.model)
    with config.make_session(lm) as session:
        result = streaming_perplexity(session, ids, compare_base=args.compare_base, bucket_size=args.bucket_size,
                                      progress=not args.no_progress, checkpoint=args.checkpoint)
    result.meta = {"model": lm.name, "text": text_name, "device": str(lm.device), "dtype": str(lm.dtype).split(".")[-1],
                   "base_weights_unchanged": weights_fingerprint(lm.model) == before}
    if not result.meta["base_weights_unchanged"]:
        raise InfinictxError("internal check failed: the base model's weights changed during the run")
    summary = result.summary()
    md = ppl_markdown(summary)
    print(md)
    if args.json:
        write_json(summary, args.json)
    report = args.report or (str(Path(args.json).with_suffix(".md")) if args.json else None)
    if report:
        atomic_write(report, md)
    if args.plot:
        plot_ppl(summary, args.plot, nll=result.nll, base_nll=result.base_nll)
    return 0


def cmd_generate(args) -> int:
    import torch

    from .generate import generate_long
    from .models import load_model
    from .report import atomic_write, cost_markdown, write_json
    from .session import Sampler
    from .texts import decode_text

    config = method_config(args)
    if args.prompt_file:
        p = Path(args.prompt_file)
        if not p.is_file():
            raise InfinictxError(f"prompt file {p} does not exist")
        prompt = decode_text(p.read_bytes(), str(p))
    else:
        prompt = args.prompt
        if not prompt or not prompt.strip():
            raise InfinictxError("the prompt is empty")
    _setup_torch(args)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    ids = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids[0]
    sampler = Sampler(temperature=args.temperature, top_p=args.top_p,
                      repetition_penalty=args.repetition_penalty, seed=args.seed)
    torch.manual_seed(args.seed)
    with config.make_session(lm) as session:
        result = generate_long(session, ids, args.tokens, context_len=args.context, sampler=sampler,
                               cache_reuse=not args.no_cache_reuse, progress=not args.no_progress,
                               tokenizer=lm.tokenizer)
    summary = result.summary()
    summary.update({"model": lm.name, "text": result.text})
    if args.out:
        atomic_write(args.out, result.text)
    else:
        print(result.text)
    print(f"\n{result.method}: {len(result.tokens)} tokens in {result.wall_s:.1f} s "
          f"({summary['tokens_per_s']:.2f} tokens/s, cache reuse {'on' if result.cache_reuse else 'off'})",
          file=sys.stderr)
    summary["wall_s"] = result.wall_s
    print(cost_markdown(summary), file=sys.stderr)
    if args.json:
        write_json(summary, args.json)
    return 0


def cmd_passkey(args) -> int:
    from .models import load_model, weights_fingerprint
    from .report import accuracy_markdown, atomic_write, plot_accuracy, write_json
    from .retrieval import parse_lengths, run_retrieval

    config = method_config(args, default_window=1024)
    lengths = parse_lengths(args.lengths)
    if args.trials < 1:
        raise InfinictxError("--trials must be >= 1")
    _setup_torch(args)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    config.make_session(lm).close()  # validate the method's settings against the model before the first trial
    before = weights_fingerprint(lm.model)
    partial = Path(args.json).with_suffix(".partial.json") if args.json else None

    def save_partial(result):  # a long run leaves its finished lengths behind if it is stopped
        if partial:
            write_json(result.summary() | {"model": lm.name, "complete": False}, partial)

    result = run_retrieval(lambda: config.make_session(lm), lm.tokenizer, args.task, lengths, args.trials,
                           seed=args.seed, progress=not args.no_progress, on_length_done=save_partial)
    if weights_fingerprint(lm.model) != before:
        raise InfinictxError("internal check failed: the base model's weights changed during the run")
    result.meta = {"model": lm.name, "seed": args.seed, "device": str(lm.device), "base_weights_unchanged": True}
    summary = result.summary()
    md = accuracy_markdown(summary)
    print(md)
    if args.json:
        write_json(summary, args.json)
        atomic_write(Path(args.json).with_suffix(".md"), md)
        if partial and partial.exists():
            partial.unlink()
    if args.plot:
        plot_accuracy([summary], args.plot)
    return 0


def cmd_fetch(args) -> int:
    from .models import embedded_gguf, resolve_model_path
    from .texts import default_book_path

    print(f"book:  {default_book_path()}")
    print(f"model: {embedded_gguf()}")
    print(f"converted: {resolve_model_path(None)[0]}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"ppl": cmd_ppl, "generate": cmd_generate, "passkey": cmd_passkey, "fetch": cmd_fetch}[args.command]
    try:
        return handler(args)
    except InfinictxError as exc:
        if args.debug:
            raise
        print(f"infinictx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        extra = f"; rerun the same command to resume from {args.checkpoint}" if getattr(args, "checkpoint", None) else ""
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
