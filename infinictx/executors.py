"""Where a task's units of work run: in this process (`InProcess`) or on Ray workers (`RayExecutor`).

A task that can split its work (passkey: one trial per unit) has `run_unit(lm, config, unit)`; its `run` hands
the units to `executor.map(units)` and merges the results as they come back, in whatever order: the science is
the task's own code either way, and the merged summary equals a single-process run's. A Ray worker is an actor
that loads the model once and runs unit after unit with it; after each unit it checks that the base weights are
unchanged. A worker that dies is restarted and its unit retried (Ray's actor restarts and task retries).

Without `--address`, Ray starts on this machine with `workers × threads_per_worker` CPUs; with it, the job joins
that cluster (its nodes need infinictx and the model where the same `--model` path resolves)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from .core.errors import InfinictxError


class InProcess:
    """Units run one after the other with the model loaded here: the reference for the distributed path."""

    def __init__(self, spec, lm):
        self.spec, self.lm = spec, lm

    def map(self, units: Iterable) -> Iterator:
        for unit in units:
            yield self.spec.task.run_unit(self.lm, self.spec.method, unit)

    def close(self):
        pass


@dataclass
class RayOptions:
    address: str | None = None       # an existing cluster (ray://host:10001, or host:6379 from a node); None: local
    workers: int | None = None       # actors (default: the CPUs Ray sees ÷ threads_per_worker, at least 1)
    threads_per_worker: int = 1      # torch threads (and Ray CPUs) per actor

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise InfinictxError(f"--workers must be >= 1 (got {self.workers})")
        if self.threads_per_worker < 1:
            raise InfinictxError(f"--threads-per-worker must be >= 1 (got {self.threads_per_worker})")


class _Worker:
    """A Ray actor: the model loaded once, units run with it."""

    def __init__(self, spec, threads: int):
        import torch

        from .core.models import load_model

        torch.set_num_threads(threads)
        self.spec = spec
        self.lm = load_model(spec.model, device=spec.device, dtype=spec.dtype)
        self.fingerprint = self.lm.fingerprint

    def pid(self) -> int:
        import os

        return os.getpid()

    def run(self, unit):
        from .core.models import weights_fingerprint

        out = self.spec.task.run_unit(self.lm, self.spec.method, unit)
        if weights_fingerprint(self.lm.model) != self.fingerprint:
            raise RuntimeError("the base model's weights changed while a unit ran")
        return out


def check_reachable(address: str, timeout: float = 5.0):
    """Fail fast, in one line, when nothing listens at a host:port address (Ray's own connect retries for long)."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return   # "auto" and other forms: Ray resolves them
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise InfinictxError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}")


def ray_module():
    try:
        import ray
    except ImportError:
        raise InfinictxError("--ray needs Ray: pip install 'infinictx[ray]' (or pip install ray)")
    return ray


class RayExecutor:
    """Units spread over Ray actors, each loading the model once; results yielded as they finish."""

    def __init__(self, spec, options: RayOptions):
        ray = ray_module()
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            kwargs = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            try:
                if options.address:
                    check_reachable(options.address)
                    ray.init(address=options.address, **kwargs)
                else:
                    ray.init(num_cpus=(options.workers or 1) * options.threads_per_worker, **kwargs)
            except InfinictxError:
                raise
            except Exception as exc:   # ConnectionError, RuntimeError, ValueError: one line either way
                where = f"the Ray cluster at {options.address}" if options.address else "a local Ray"
                raise InfinictxError(f"cannot start {where}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = options.workers or max(1, cpus // options.threads_per_worker)
        actor = ray.remote(num_cpus=options.threads_per_worker, max_restarts=3, max_task_retries=3)(_Worker)
        self.actors = [actor.remote(spec, options.threads_per_worker) for _ in range(workers)]

    def map(self, units: Iterable) -> Iterator:
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        yield from pool.map_unordered(lambda a, unit: a.run.remote(unit), list(units))

    def close(self):
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        if self.started:
            self.ray.shutdown()
