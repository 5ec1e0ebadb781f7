"""One run layer under every front: a `RunSpec` (task + method config + model + outputs) goes in, a `Result`
comes out, the same way for the CLI, a server or a Ray runner.

  spec = make_spec("ppl", "longcache", settings={"window": 2048}, temp_lora=True,
                   task_settings={"max_tokens": 8192}, outputs={"json": "out/run.json"})
  result = run(spec)          # result.summary is what out/run.json holds

`make_spec` validates everything that can be checked without a model (task, method, settings, learner), so a
front rejects a bad request before any work. `run` reads the inputs (a bad file fails before the model loads),
loads the model, fingerprints its weights, runs the task, checks the weights are unchanged and writes the
outputs, each file whole or not at all."""

from __future__ import annotations

from dataclasses import dataclass, field

from .core.errors import InfinictxError
from .core.registry import METHODS, build, method_config
from .tasks import TASKS, Outputs, Result, Task


@dataclass
class RunSpec:
    task: Task                       # a PerplexityTask, GenerationTask, RetrievalTask (settings validated)
    method: object                   # a registered method's config (validated)
    model: str | None = None         # HF directory, .gguf file, a named model; None = the embedded default
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    outputs: Outputs = field(default_factory=Outputs)
    progress: bool = True
    ray: object = None               # RayOptions: the task's units run on Ray workers (infinictx.executors)


def make_spec(task: str, method: str | None = None, settings: dict | None = None, temp_lora: bool | dict | None = None,
              task_settings: dict | None = None, model: str | None = None, device: str = "auto", dtype: str = "auto",
              threads: int | None = None, outputs: dict | Outputs | None = None, progress: bool = True,
              ray: dict | None = None) -> RunSpec:
    """A validated RunSpec from plain values (what a CLI or a JSON request holds). `settings` are the method's,
    `temp_lora` puts Temp-Lora on top (True, or a dict of its settings), `task_settings` the task's; a task's own
    defaults for a method (the passkey task reads a plain window of 1024) apply where `settings` is silent."""
    if task not in TASKS:
        raise InfinictxError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    task_obj = build(TASKS[task], dict(task_settings or {}), f"task {task}")
    method = method or task_obj.default_method
    if method not in METHODS:
        raise InfinictxError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    settings = {**task_obj.method_defaults.get(method, {}), **(settings or {})}
    if method == "temp-lora":   # the window with the learner: the learner's settings are the method's
        settings.update(temp_lora if isinstance(temp_lora, dict) else {})
    elif temp_lora:
        settings["temp_lora"] = temp_lora
    config = method_config(method, **settings)
    task_obj.check(config)
    if threads is not None and threads < 1:
        raise InfinictxError(f"threads must be >= 1 (got {threads})")
    if not isinstance(outputs, Outputs):
        outputs = build(Outputs, dict(outputs or {}), "outputs")
    options = None
    if ray is not None:
        from .executors import RayOptions

        if not task_obj.splits:
            raise InfinictxError(f"--ray: the {task} task {task_obj.split_hint}")
        options = ray if isinstance(ray, RayOptions) else RayOptions(**ray)
    return RunSpec(task=task_obj, method=config, model=model, device=device, dtype=dtype, threads=threads,
                   outputs=outputs, progress=progress, ray=options)


def run(spec: RunSpec) -> Result:
    """Run `spec` (see the module docstring)."""
    import torch

    from .core.models import load_model, weights_fingerprint

    inputs = spec.task.prepare()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    lm = load_model(spec.model, device=spec.device, dtype=spec.dtype)
    before = lm.fingerprint  # taken before the task can touch the weights
    if spec.ray is not None:   # the units run on Ray workers, each with its own model (checked there)
        from .executors import RayExecutor

        executor = RayExecutor(spec, spec.ray)
        try:
            result = spec.task.run(lm, spec.method, inputs, spec.outputs, spec.progress, executor=executor)
        finally:
            executor.close()
    else:
        result = spec.task.run(lm, spec.method, inputs, spec.outputs, spec.progress)
    if weights_fingerprint(lm.model) != before:
        raise InfinictxError("internal check failed: the base model's weights changed during the run")
    result.summary.update({"device": str(lm.device), "dtype": str(lm.dtype).split(".")[-1],
                           "base_weights_unchanged": True})
    spec.task.write(result, spec.outputs)
    return result
