"""Every command the README's "Command line" section shows is accepted and runs, on the tiny model: optional
`[...]` flags included, the first of each `a|b` choice taken, then sizes shrunk to the tiny model by flags added
after the README's own (argparse keeps the last value)."""

import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import SAMPLE

from infinictx.fronts.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"

# per subcommand and method: flags appended so the command fits the tiny model and a few seconds
SHRINK = {
    "ppl": ["-W", "64", "-D", "32", "--max-tokens", "400"],
    "generate": ["-W", "64", "-D", "16", "--tokens", "24"],
    "passkey": ["-W", "64", "--lengths", "200,300", "--trials", "1"],
    "translate": ["-W", "256", "--max-new-tokens", "6", "--chunk-sentences", "2"],
}
METHOD_SHRINK = {
    "memory": ["--mem-layers", "1", "--topk", "8"],
    "longcache": ["--global-tokens", "4", "--span", "4", "--recall-clip", "4", "-D", "8"],
    "razor": ["--min-window", "16", "--induction-ratio", "0.25", "-D", "32"],
    "temp-lora": ["--rank", "4"],
    "rag": ["--chunk-tokens", "16", "--overlap", "4", "--budget", "24", "--retriever", "bm25"],
}


def readme_commands() -> list[str]:
    text = README.read_text()
    block = text.split("## Command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.split(" # ", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        current += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            if current.strip().startswith("infinictx "):
                lines.append(current.strip())
            current = ""
    return lines


def expand(command: str) -> list[str]:
    """README notation to argv: [optional] kept, a|b -> a."""
    command = re.sub(r"\[([^\[\]]*)\]", r"\1", command)
    return [tok.split("|")[0] for tok in shlex.split(command)[1:]]


COMMANDS = readme_commands()


def test_the_readme_shows_commands_for_every_subcommand():
    assert {c.split()[1] for c in COMMANDS} == {"ppl", "generate", "passkey", "translate", "fetch"}
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "book.txt").write_text(SAMPLE * 6)
    (tmp_path / "start.txt").write_text(SAMPLE)
    (tmp_path / "src.txt").write_text("起初，神创造天地。\n地是空虚混沌。\n神说：要有光。\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("In the beginning.\nAnd the earth was void.\nLet there be light.\n")
    (tmp_path / "pg19.jsonl").write_text("\n".join(json.dumps({"text": SAMPLE * (4 + i)}) for i in range(5)))
    argv = ["book.txt" if a == "FILE" else a for a in expand(command)]
    sub = argv[0]
    if sub != "fetch":
        method = argv[argv.index("--method") + 1] if "--method" in argv else {"passkey": "window"}.get(sub, "temp-lora")
        argv += SHRINK[sub] + METHOD_SHRINK.get(method, []) + ["--model", str(tiny_model_dir), "--no-progress"]
        if "--lora-layers" in argv:
            argv += ["--lora-layers", "top:1"]     # the tiny model has 2 layers
        if "--train-context" in argv:
            argv += ["--train-context", "32"]      # L_T within the shrunk window
        if "--task" in argv and argv[argv.index("--task") + 1] not in ("passkey", "kv"):
            argv += ["-W", "256", "--lengths", "700"]   # facts planted in the book: a longer question and prompt
        if "--ray" in argv:
            argv += ["--workers", "1"]   # a small local Ray
        if sub == "ppl" and "--checkpoint" in argv:
            argv += ["--max-tokens", "1000"]   # long enough for a checkpoint to be written mid-way
    assert main(argv) == 0, argv
    for flag in ("--json", "--plot", "--out"):
        if flag in argv:
            assert (tmp_path / argv[argv.index(flag) + 1]).stat().st_size > 0
    assert not (tmp_path / "out" / "run.ckpt").exists()   # a finished run removes its checkpoint
