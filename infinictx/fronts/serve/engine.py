"""The serving engine: one loaded model, its sessions, and the one worker thread that runs every model job.

The worker takes one job per session in turn (round robin), so requests for one session run in order and a busy
session cannot starve the others; cheap jobs (create, describe, delete) go ahead of the reads and generations.
torch's own thread pool is the parallelism. A full queue raises `Busy` (the
HTTP layer answers 503 with Retry-After) instead of hanging.

With a state directory every session is checkpointed, atomically, after each job that changes it; a server killed
with -9 and started again on the same directory continues every session exactly. A read cut off by the crash was
not applied; a read that carries `offset` can be retried safely (see `Engine.read`). Sessions idle longer than
the expiry are closed and their checkpoints deleted."""

import hashlib
import io
import json
import secrets
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from ...core.errors import InfinictxError
from ...core.session import Sampler

CHECKPOINT_FORMAT = "infinictx-serve-session/1"

@dataclass
class ServeSettings:
    api_keys: tuple[str, ...] = ()      # none: no authentication (bind to 127.0.0.1 then)
    max_sessions: int = 16
    max_request_tokens: int = 32768     # tokens one read may bring, and one generate may ask for
    queue_size: int = 64                # model jobs waiting at most; beyond it requests get 503
    state_dir: str | None = None        # checkpoints of every session, reloaded at start
    idle_expiry_s: float = 3600.0       # a session untouched this long is deleted (0: never)

    def __post_init__(self):
        for name in ("max_sessions", "max_request_tokens", "queue_size"):
            if getattr(self, name) < 1:
                raise InfinictxError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if not self.idle_expiry_s >= 0:
            raise InfinictxError(f"--idle-expiry must be >= 0 seconds (got {self.idle_expiry_s})")


class Busy(Exception):
    """The job queue is full."""


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def owner_hash(key: str | None) -> str | None:
    return None if key is None else hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass
class Entry:
    """A live session and what the server keeps beside it."""
    session: object
    owner: str | None
    spec: dict                          # {method, settings, temp_lora}: how to build it again after a restart
    last_used: float = field(default_factory=time.time)
    last_read: dict | None = None       # {offset, digest, reply} of the last read: a retried read is answered by it


class Jobs:
    """Model jobs, one queue per session, served round robin; at most `limit` waiting in all. Urgent jobs (cheap
    ones: create, describe, delete, taking milliseconds) go first, so they never wait a round of every session's
    reads."""

    def __init__(self, limit: int):
        self.limit, self.waiting = limit, 0
        self.queues: OrderedDict = OrderedDict()
        self.urgent: deque = deque()
        self.cond = threading.Condition()

    def put(self, key, item, force: bool = False, urgent: bool = False):
        with self.cond:
            if self.waiting >= self.limit and not force:
                raise Busy()
            if urgent:
                self.urgent.append(item)
            else:
                self.queues.setdefault(key, deque()).append(item)
            self.waiting += 1
            self.cond.notify()

    def get(self):
        with self.cond:
            while not self.waiting:
                self.cond.wait()
            if self.urgent:
                self.waiting -= 1
                return self.urgent.popleft()
            key, q = next(iter(self.queues.items()))
            item = q.popleft()
            del self.queues[key]
            if q:
                self.queues[key] = q    # to the back of the line: the other sessions go first
            self.waiting -= 1
            return item


class Engine:
    """The loaded model, its sessions, and the one worker thread that runs every model job."""

    def __init__(self, lm, settings: ServeSettings):
        self.lm, self.settings = lm, settings
        self.loaded_weights = lm.fingerprint   # as loaded, before any session: checkpoints and /status compare to it
        self.sessions: dict[str, Entry] = {}
        self.jobs = Jobs(settings.queue_size)
        self.stats = {"started": time.time(), "requests": 0, "jobs": 0, "busy_s": 0.0, "tokens_read": 0,
                      "tokens_generated": 0, "restored": 0, "expired": 0}
        self.state_dir = Path(settings.state_dir) if settings.state_dir else None
        if self.state_dir:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._restore_all()
        self._stop = threading.Event()
        self.worker = threading.Thread(target=self._work, name="infinictx-model", daemon=True)
        self.worker.start()
        if settings.idle_expiry_s:
            threading.Thread(target=self._janitor, name="infinictx-expiry", daemon=True).start()

    def _work(self):
        while True:
            fn, fut = self.jobs.get()
            if fn is None:
                return
            if fut.set_running_or_notify_cancel():
                t0 = time.perf_counter()
                try:
                    fut.set_result(fn())
                except BaseException as exc:   # handed to the request that asked
                    fut.set_exception(exc)
                self.stats["jobs"] += 1
                self.stats["busy_s"] += time.perf_counter() - t0

    def submit(self, fn, key=None, urgent: bool = False) -> Future:
        """Queue `fn` for the worker, behind the earlier jobs of the same session `key` (or, `urgent`, first)."""
        fut: Future = Future()
        self.jobs.put(key, (fn, fut), urgent=urgent)
        return fut

    def close(self):
        """Stop the worker and close every session (their checkpoints stay: a restart continues them)."""
        self._stop.set()

        def close_all():
            for entry in list(self.sessions.values()):
                entry.session.close()
            self.sessions.clear()

        self.jobs.put("__close__", (close_all, Future()), force=True)
        self.jobs.put("__close__", (None, None), force=True)
        self.worker.join(timeout=60)

    # --- durability ----------------------------------------------------------------------------------------
    def _path(self, sid: str) -> Path:
        return self.state_dir / f"{sid}.ckpt"

    def _save(self, sid: str):
        """Checkpoint one session, whole or not at all (a temporary file renamed into place)."""
        import os

        import torch

        if not self.state_dir:
            return
        entry = self.sessions[sid]
        buf = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, "model": self.loaded_weights, "spec": entry.spec,
                    "owner": entry.owner, "last_used": entry.last_used, "last_read": entry.last_read,
                    "history": entry.session.history, "session": entry.session.state_dict()}, buf)
        tmp = self._path(sid).with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())   # on disk before it replaces the last good checkpoint
        os.replace(tmp, self._path(sid))

    def _forget(self, sid: str):
        if self.state_dir:
            self._path(sid).unlink(missing_ok=True)

    def _restore_all(self):
        import sys

        for tmp in self.state_dir.glob("*.tmp"):   # a save cut off by a crash: the previous checkpoint stands
            tmp.unlink()
        for path in sorted(self.state_dir.glob("*.ckpt")):
            try:
                self._restore(path)
            except Exception as exc:   # one bad file must not keep the server (and the other sessions) down
                print(f"infinictx serve: session {path.stem} not restored ({type(exc).__name__}: {exc}); "
                      f"its checkpoint is kept", file=sys.stderr)

    def _restore(self, path: Path):
        import torch

        state = torch.load(path, weights_only=False)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise InfinictxError("not a session checkpoint of this version")
        if state["model"] != self.loaded_weights:
            raise InfinictxError("it was made with other model weights")
        if self.settings.idle_expiry_s and time.time() - state["last_used"] > self.settings.idle_expiry_s:
            path.unlink()
            self.stats["expired"] += 1
            return
        spec = state["spec"]
        session = self._build(spec)
        session.load_state_dict(state["session"], state["history"])
        self.sessions[path.stem] = Entry(session, state["owner"], spec, state["last_used"], state["last_read"])
        self.stats["restored"] += 1

    def _janitor(self):
        every = max(0.2, min(30.0, self.settings.idle_expiry_s / 4))
        while not self._stop.wait(every):
            try:
                self.submit(self._expire, key="__expiry__")
            except Busy:
                pass   # the worker is busy anyway; try at the next tick

    def _expire(self):
        now = time.time()
        for sid, entry in list(self.sessions.items()):
            if now - entry.last_used > self.settings.idle_expiry_s:
                entry.session.close()
                del self.sessions[sid]
                self._forget(sid)
                self.stats["expired"] += 1

    # --- the jobs (run on the worker thread) ------------------------------------------------------------
    def _build(self, spec: dict):
        from ...core.registry import method_config

        settings = dict(spec["settings"])
        if spec["method"] != "temp-lora" and spec["temp_lora"]:
            settings["temp_lora"] = spec["temp_lora"]
        return method_config(spec["method"], **settings).make_session(self.lm)

    def create(self, owner, method: str, settings: dict, temp_lora) -> dict:
        from ...core.registry import METHODS

        if method not in METHODS:
            raise InfinictxError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if len(self.sessions) >= self.settings.max_sessions:
            raise HttpError(429, f"the server holds its maximum of {self.settings.max_sessions} sessions; delete one")
        spec = {"method": method, "settings": settings, "temp_lora": temp_lora}
        session = self._build(spec)
        sid = secrets.token_hex(8)
        self.sessions[sid] = Entry(session, owner, spec)
        self._save(sid)
        return {"id": sid, "method": session.method, "config": session.describe()}

    def entry(self, sid: str, owner) -> Entry:
        entry = self.sessions.get(sid)
        if entry is None or entry.owner != owner:
            raise HttpError(404, f"no session {sid}")
        entry.last_used = time.time()
        return entry

    def _active(self, entry: Entry):
        if entry.session.learner is not None:
            entry.session.learner.activate()   # its own adapter on the shared model
        return entry.session

    def _rollback(self, sid: str):
        """A job failed half-way: put the session back as its last checkpoint has it (without a state
        directory it stays as the failure left it)."""
        if self.state_dir and self._path(sid).exists():
            self.sessions.pop(sid).session.close()
            self._restore(self._path(sid))

    def read(self, sid: str, owner, ids: list[int], score: bool, offset: int | None = None) -> dict:
        """Absorb `ids` in the session's chunks (scoring them if asked). `offset`, when given, is the token count
        the client expects the session to have before this read: a retry of the last read (same offset, same
        text) gets that read's reply without reading twice; any other mismatch is 409."""
        import torch

        entry = self.entry(sid, owner)
        session = self._active(entry)
        digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
        if offset is not None and offset != len(session.history):
            last = entry.last_read
            if last and last["offset"] == offset and last["digest"] == digest:
                return last["reply"]   # a retry of a read that was applied: its reply, not a second read
            raise HttpError(409, f"the session has read {len(session.history)} tokens, not offset={offset}")
        before = len(session.history)
        ids = torch.tensor(ids, dtype=torch.long)
        nll = []
        try:
            for s in range(0, len(ids), session.chunk):
                piece = ids[s:s + session.chunk]
                if score and len(session.history) + len(piece) >= 2:
                    nll.append(session.score_and_absorb(piece)[0])
                else:
                    session.absorb(piece)
        except BaseException:
            self._rollback(sid)
            raise
        out = {"tokens_read": len(ids), "tokens": len(session.history)}
        if score and nll:
            out["ppl"] = float(torch.cat(nll).double().mean().exp())
        entry.last_read = {"offset": before, "digest": digest, "reply": out}
        self._save(sid)
        self.stats["tokens_read"] += len(ids)
        return out

    def score(self, sid: str, owner, ids: list[int], base: bool) -> dict:
        """Perplexity of a text read on its own (no context but itself, in windows of W) by the session's model,
        its adapter included (`base`: switched off); the session does not change. What tells whether an adapter
        learnt a passage, and only its own session's passages."""
        from contextlib import nullcontext

        import torch

        session = self._active(self.entry(sid, owner))
        ids = torch.tensor(ids, dtype=torch.long)
        nll = []
        with torch.no_grad(), (session.base_model_context() if base else nullcontext()):
            for s in range(0, len(ids), session.window):
                if len(ids[s:s + session.window]) >= 2:
                    nll.append(session.chunk_nll(ids[:0], ids[s:s + session.window]).float().cpu())
        if not nll:
            raise InfinictxError("the text needs at least 2 tokens to be scored")
        nll = torch.cat(nll)
        session.check_nll(nll)
        return {"tokens_scored": len(nll), "ppl": float(nll.double().mean().exp())}

    def generate(self, sid: str, owner, sampler: Sampler, max_tokens: int) -> dict:
        entry = self.entry(sid, owner)
        session = self._active(entry)
        if not len(session.history):
            raise InfinictxError("the session has read nothing yet: read a prompt first")
        if max_tokens >= session.window:
            raise InfinictxError(f"max_tokens must be below the session's window W={session.window}")
        try:
            out = session.generate_chunk(max_tokens, min(len(session.history), session.window - max_tokens), sampler)
            session.absorb(out)   # what was written is part of the text now (Temp-Lora learns it too)
        except BaseException:
            self._rollback(sid)
            raise
        self._save(sid)
        self.stats["tokens_generated"] += len(out)
        return {**self._answer(out, sampler, session.eos_ids), "tokens_total": len(session.history)}

    def _answer(self, out, sampler: Sampler, eos_ids: list[int]) -> dict:
        """The text written (an end-of-sequence token that ended it is left out of the text) and why it ended."""
        stopped = len(out) > 0 and sampler.done(int(out[-1]), eos_ids)
        text = self.lm.tokenizer.decode(out[:-1 if stopped else None].tolist())
        return {"text": text, "tokens": len(out), "finish_reason": "stop" if stopped else "length"}

    def complete_stateless(self, ids: list[int], sampler: Sampler, max_tokens: int) -> dict:
        """A completion on the base model alone: the prompt and the answer must fit the model's own context."""
        import torch

        from ...core.registry import method_config

        window = self.lm.model.config.max_position_embeddings
        if len(ids) + max_tokens > window:
            raise InfinictxError(f"the prompt ({len(ids)} tokens) and max_tokens ({max_tokens}) exceed the model's "
                                 f"context of {window}; read long texts into a session")
        chunk = max(1, min(len(ids), window - max_tokens))
        with method_config("window", window=window, chunk=chunk).make_session(self.lm) as session:
            session.absorb(torch.tensor(ids, dtype=torch.long))
            out = session.generate_chunk(max_tokens, len(ids), sampler)
            eos_ids = session.eos_ids
        self.stats["tokens_generated"] += len(out)
        return self._answer(out, sampler, eos_ids)

    def describe(self, sid: str, owner) -> dict:
        session = self.entry(sid, owner).session
        out = {"id": sid, "method": session.method, "tokens": len(session.history),
               "adapter_steps": session.chunks_trained, "cost": session.meter.summary()}
        if session.capabilities.kv_bytes:
            out["bytes_held"] = session.kv_bytes()
        return out

    def delete(self, sid: str, owner) -> dict:
        self.entry(sid, owner).session.close()
        del self.sessions[sid]
        self._forget(sid)
        return {"deleted": sid}

    def status(self) -> dict:
        s = self.stats
        up = time.time() - s["started"]
        return {"model": self.lm.name, "sessions": len(self.sessions), "queued": self.jobs.waiting,
                "uptime_s": round(up, 1), "requests": s["requests"], "jobs": s["jobs"],
                "busy_fraction": round(s["busy_s"] / up, 3) if up else 0.0, "tokens_read": s["tokens_read"],
                "tokens_generated": s["tokens_generated"],
                "tokens_per_busy_s": round((s["tokens_read"] + s["tokens_generated"]) / s["busy_s"], 1)
                if s["busy_s"] else 0.0, "restored": s["restored"], "expired": s["expired"]}


class StreamingSampler(Sampler):
    """A sampler that also hands every token it picks to `emit` (called on the worker thread)."""

    def __init__(self, emit, **kw):
        super().__init__(**kw)
        self.emit = emit

    def __call__(self, logits, recent, eos_ids) -> int:
        token = super().__call__(logits, recent, eos_ids)
        if not self.done(token, eos_ids):   # the end-of-sequence token that ends an answer is not text
            self.emit(token)
        return token
