"""What every task shares: the outputs a run writes, the result it returns, and the protocol a task follows.

A task is a dataclass of settings (`core.registry.setting`, like a method's config) with:

  check(config)            settings that depend on the method, checked before the model loads
  prepare()                read the inputs (a text file, a prompt): bad files fail before the model loads
  run(lm, config, inputs, outputs, progress) -> Result     the work; it makes its sessions from `config`
  run_unit(lm, config, unit)   (a task that `splits`) one unit of its work; `run(..., executor=)` then hands
                           its units to `executor.map` (`infinictx.executors`: in-process or Ray workers)
  write(result, outputs)   the files: JSON, Markdown report, plot, text; each written whole or not at all

`infinictx.runs` drives them all the same way; fronts (the CLI, later a server or a Ray runner) only build a
`RunSpec` and call `run`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Outputs:
    json: str | None = None     # the summary as JSON
    report: str | None = None   # the Markdown report (default: next to the JSON, .md)
    plot: str | None = None     # a PNG figure
    text: str | None = None     # the generated text


@dataclass
class Result:
    summary: dict               # what the JSON holds
    stdout: str = ""            # what a terminal front prints (the report, or the generated text)
    stderr: str = ""            # ... and prints beside it (timings)
    data: object = None         # the task's own result (PerplexityResult, GenerationResult, RetrievalResult)


class Task:
    name = ""                   # the CLI subcommand
    default_method = "temp-lora"
    method_defaults: dict = {}  # {method: {setting: value}}: this task's defaults where they differ from the method's
    splits = False              # its work splits into units (`run_unit`) that an executor may run elsewhere (--ray)
    split_hint = "does not split into units of work (passkey does; ppl does over a dataset of books)"

    def run_unit(self, lm, config, unit):
        """One unit of work, on a worker with its own loaded model (tasks that split)."""
        raise NotImplementedError

    def check(self, config):
        pass

    def prepare(self):
        return None

    def run(self, lm, config, inputs, outputs: Outputs, progress: bool) -> Result:
        raise NotImplementedError

    def write(self, result: Result, outputs: Outputs):
        raise NotImplementedError


def write_summary(result: Result, outputs: Outputs):
    """The JSON and the Markdown report (by default next to the JSON, .md), each written whole or not at all."""
    from pathlib import Path

    from ..core.files import atomic_write, write_json

    if outputs.json:
        write_json(result.summary, outputs.json)
    report = outputs.report or (str(Path(outputs.json).with_suffix(".md")) if outputs.json else None)
    if report:
        atomic_write(report, result.stdout)
