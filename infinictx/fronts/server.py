"""`infinictx serve`: long-context sessions over HTTP, on one loaded model (first step of the server).

  POST   /v1/sessions                {method, settings, temp_lora}  -> {id, method, config}
  POST   /v1/sessions/{id}/read      {text, score}                  -> {tokens_read, tokens, ppl (if score)}
  POST   /v1/sessions/{id}/generate  {max_tokens, temperature, top_p, seed} -> {text, tokens}
  GET    /v1/sessions/{id}           tokens read, bytes held, adapter steps, cost so far
  DELETE /v1/sessions/{id}

One model is shared read-only; each session owns its state (a window, a KV cache, a memory, an index, and with
Temp-Lora its own named adapter on the model's `AdapterHost`, activated for each of its jobs). Every piece of
model work runs on one worker thread, in order of arrival: requests for one session run in order, sessions share
the compute first come first served, and a full queue answers 503 with Retry-After instead of hanging. With
API keys, a request needs `Authorization: Bearer KEY` and a session belongs to the key that made it (another key
gets 404, so ids cannot be probed). Errors are JSON `{"error": "one line"}`, never a traceback.

Not yet: checkpoints of every session under a state directory (restart after kill -9), idle expiry, streaming
with server-sent events, OpenAI-compatible completions."""


import asyncio
import queue
import secrets
import threading
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass

from pydantic import BaseModel, Field  # request bodies (FastAPI reads them from module-level classes)

from ..core.errors import InfinictxError


@dataclass
class ServeSettings:
    api_keys: tuple[str, ...] = ()      # none: no authentication (bind to 127.0.0.1 then)
    max_sessions: int = 16
    max_request_tokens: int = 32768     # tokens one read may bring, and one generate may ask for
    queue_size: int = 64                # model jobs waiting at most; beyond it requests get 503

    def __post_init__(self):
        for name in ("max_sessions", "max_request_tokens", "queue_size"):
            if getattr(self, name) < 1:
                raise InfinictxError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")


class Busy(Exception):
    """The job queue is full."""


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Engine:
    """The loaded model, its sessions, and the one worker thread that runs every model job in arrival order."""

    def __init__(self, lm, settings: ServeSettings):
        self.lm, self.settings = lm, settings
        self.sessions: dict[str, dict] = {}
        self.jobs: queue.Queue = queue.Queue(maxsize=settings.queue_size)
        self.worker = threading.Thread(target=self._work, name="infinictx-model", daemon=True)
        self.worker.start()

    def _work(self):
        while True:
            fn, fut = self.jobs.get()
            if fn is None:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:   # handed to the request that asked
                    fut.set_exception(exc)

    def submit(self, fn) -> Future:
        fut: Future = Future()
        try:
            self.jobs.put_nowait((fn, fut))
        except queue.Full:
            raise Busy()
        return fut

    def close(self):
        def close_all():
            for entry in list(self.sessions.values()):
                entry["session"].close()
            self.sessions.clear()

        self.jobs.put((close_all, Future()))
        self.jobs.put((None, None))
        self.worker.join(timeout=60)

    # --- the jobs (run on the worker thread) ------------------------------------------------------------
    def create(self, owner, method: str, settings: dict, temp_lora) -> dict:
        from ..core.registry import METHODS, method_config

        if method not in METHODS:
            raise InfinictxError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if len(self.sessions) >= self.settings.max_sessions:
            raise HttpError(429, f"the server holds its maximum of {self.settings.max_sessions} sessions; delete one")
        if method != "temp-lora" and temp_lora:
            settings = {**settings, "temp_lora": temp_lora}
        config = method_config(method, **settings)
        session = config.make_session(self.lm)
        sid = secrets.token_hex(8)
        self.sessions[sid] = {"session": session, "owner": owner}
        return {"id": sid, "method": session.method, "config": session.describe()}

    def entry(self, sid: str, owner) -> dict:
        entry = self.sessions.get(sid)
        if entry is None or entry["owner"] != owner:
            raise HttpError(404, f"no session {sid}")
        return entry

    def _active(self, session):
        if session.learner is not None:
            session.learner.activate()   # its own adapter on the shared model
        return session

    def read(self, sid: str, owner, ids, score: bool) -> dict:
        import torch

        session = self._active(self.entry(sid, owner)["session"])
        ids = torch.tensor(ids, dtype=torch.long)
        nll = []
        for s in range(0, len(ids), session.chunk):
            piece = ids[s:s + session.chunk]
            if score and len(session.history) + len(piece) >= 2:
                nll.append(session.score_and_absorb(piece)[0])
            else:
                session.absorb(piece)
        out = {"tokens_read": len(ids), "tokens": len(session.history)}
        if score and nll:
            out["ppl"] = float(torch.cat(nll).double().mean().exp())
        return out

    def generate(self, sid: str, owner, max_tokens: int, temperature: float, top_p: float, seed: int) -> dict:
        from ..core.session import Sampler

        session = self._active(self.entry(sid, owner)["session"])
        if not len(session.history):
            raise InfinictxError("the session has read nothing yet: read a prompt first")
        if max_tokens >= session.window:
            raise InfinictxError(f"max_tokens must be below the session's window W={session.window}")
        sampler = Sampler(temperature=temperature, top_p=top_p, ban_eos=False, seed=seed)
        out = session.generate_chunk(max_tokens, min(len(session.history), session.window - max_tokens), sampler)
        session.absorb(out)   # what was written is part of the text now (Temp-Lora learns it too)
        return {"text": self.lm.tokenizer.decode(out.tolist()), "tokens": len(out)}

    def describe(self, sid: str, owner) -> dict:
        session = self.entry(sid, owner)["session"]
        out = {"id": sid, "method": session.method, "tokens": len(session.history),
               "adapter_steps": session.chunks_trained, "cost": session.meter.summary()}
        if session.capabilities.kv_bytes:
            out["bytes_held"] = session.kv_bytes()
        return out

    def delete(self, sid: str, owner) -> dict:
        self.entry(sid, owner)["session"].close()
        del self.sessions[sid]
        return {"deleted": sid}


class NewSession(BaseModel):
    method: str = "temp-lora"
    settings: dict = Field(default_factory=dict)
    temp_lora: bool | dict | None = None


class Read(BaseModel):
    text: str
    score: bool = False


class Generate(BaseModel):
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0


def create_app(lm, settings: ServeSettings):
    """The FastAPI app over one loaded model."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    engine = Engine(lm, settings)

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()   # sessions closed: their adapters leave the model

    app = FastAPI(title="infinictx", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine

    def error(status: int, message: str, headers: dict | None = None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(400, f"invalid request: {where + ': ' if where else ''}{first.get('msg', 'bad body')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request, exc):   # a body that is not JSON, an unknown route, a wrong verb
        detail = str(exc.detail).splitlines()[0] if exc.detail else "error"
        return error(exc.status_code, f"invalid request: {detail}" if exc.status_code == 400 else detail)

    @app.exception_handler(HttpError)
    async def http_error(request, exc):
        return error(exc.status, str(exc))

    @app.exception_handler(InfinictxError)
    async def bad_input(request, exc):
        return error(400, str(exc))

    @app.exception_handler(Busy)
    async def busy(request, exc):
        return error(503, "the server is busy: retry shortly", {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def failed(request, exc):   # a bug: the client gets one line, the server log the traceback
        return error(500, f"internal error: {type(exc).__name__}")

    def owner_of(request: Request):
        if not settings.api_keys:
            return None
        auth = request.headers.get("authorization", "")
        key = auth[7:] if auth.lower().startswith("bearer ") else None
        if key not in settings.api_keys:
            raise HttpError(401, "a valid API key is needed (Authorization: Bearer KEY)")
        return key

    async def run(fn):
        return await asyncio.wrap_future(engine.submit(fn))

    def tokens(text: str) -> list[int]:
        if not text.strip():
            raise InfinictxError("the text is empty")
        ids = lm.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) > settings.max_request_tokens:
            raise HttpError(413, f"the text has {len(ids)} tokens; at most {settings.max_request_tokens} per request")
        return ids

    @app.post("/v1/sessions")
    async def new_session(body: NewSession, request: Request):
        owner = owner_of(request)
        return await run(lambda: engine.create(owner, body.method, body.settings, body.temp_lora))

    @app.post("/v1/sessions/{sid}/read")
    async def read(sid: str, body: Read, request: Request):
        owner = owner_of(request)
        engine.entry(sid, owner)
        ids = tokens(body.text)
        return await run(lambda: engine.read(sid, owner, ids, body.score))

    @app.post("/v1/sessions/{sid}/generate")
    async def generate(sid: str, body: Generate, request: Request):
        owner = owner_of(request)
        engine.entry(sid, owner)
        if body.max_tokens > settings.max_request_tokens:
            raise HttpError(413, f"max_tokens is at most {settings.max_request_tokens}")
        return await run(lambda: engine.generate(sid, owner, body.max_tokens, body.temperature, body.top_p,
                                                 body.seed))

    @app.get("/v1/sessions/{sid}")
    async def describe(sid: str, request: Request):
        owner = owner_of(request)
        return await run(lambda: engine.describe(sid, owner))

    @app.delete("/v1/sessions/{sid}")
    async def delete(sid: str, request: Request):
        owner = owner_of(request)
        return await run(lambda: engine.delete(sid, owner))

    return app


def serve(lm, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000):
    import uvicorn

    uvicorn.run(create_app(lm, settings), host=host, port=port, log_level="warning")
