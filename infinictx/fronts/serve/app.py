"""The HTTP layer of `infinictx serve` (FastAPI): routes, request shapes, OpenAI compatibility, streaming.

  POST   /v1/sessions                {method, settings, temp_lora}       -> {id, method, config}
  POST   /v1/sessions/{id}/read      {text, score, offset}               -> {tokens_read, tokens, ppl (if score)}
  POST   /v1/sessions/{id}/score     {text, base}                        -> {tokens_scored, ppl} (session unchanged)
  POST   /v1/sessions/{id}/generate  {max_tokens, temperature, top_p, seed, stop_at_eos, stream}
                                                                         -> {text, tokens} (or server-sent events)
  GET    /v1/sessions/{id}           tokens read, bytes held, adapter steps, cost so far
  DELETE /v1/sessions/{id}
  POST   /v1/completions, /v1/chat/completions   OpenAI-compatible (an extra `session` field reads the prompt into
                                     that session and answers from it; without it: the base model, statelessly)
  GET    /v1/models                  the model (OpenAI shape)
  GET    /status, /                  counters as JSON; the same as a small HTML page

One model is shared read-only; each session owns its state (a window, a KV cache, a memory, an index, and with
Temp-Lora its own named adapter on the model's `AdapterHost`, activated for each of its jobs). The model work runs
on the engine's one worker (engine.py: order, fairness, checkpoints, expiry).

With API keys, a request needs `Authorization: Bearer KEY` and a session belongs to the key that made it (another
key gets 404, so ids cannot be probed; keys are kept only as hashes). Errors are JSON `{"error": "one line"}`,
never a traceback."""

import asyncio
import html
import json
import secrets
import time
from contextlib import asynccontextmanager

from pydantic import BaseModel, Field  # request bodies (FastAPI reads them from module-level classes)

from ...core.errors import InfinictxError
from ...core.session import Sampler
from .engine import Busy, Engine, HttpError, ServeSettings, StreamingSampler, owner_hash


class NewSession(BaseModel):
    method: str = "temp-lora"
    settings: dict = Field(default_factory=dict)
    temp_lora: bool | dict | None = None


class Read(BaseModel):
    text: str
    score: bool = False
    offset: int | None = Field(None, ge=0)


class Score(BaseModel):
    text: str
    base: bool = False


class Generate(BaseModel):
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    stop_at_eos: bool = False
    stream: bool = False


class OpenAIRequest(BaseModel):   # OpenAI's request shapes; fields we do not use are accepted and ignored
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = 1
    session: str | None = None      # ours: read the prompt into this session and answer from it


class Completion(OpenAIRequest):
    prompt: str | list[str] = ""
    max_tokens: int = Field(16, ge=1)


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatCompletion(OpenAIRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The model's chat template over `messages`, ready for the assistant's turn (a plain "role: text" layout for
    a model without a template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def create_app(lm, settings: ServeSettings):
    """The FastAPI app over one loaded model."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
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
        return error(400, str(exc).splitlines()[0])

    @app.exception_handler(Busy)
    async def busy(request, exc):
        return error(503, "the server is busy: retry shortly", {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def failed(request, exc):   # a bug: the client gets one line, the server log the traceback
        return error(500, f"internal error: {type(exc).__name__}")

    def owner_of(request: Request):
        engine.stats["requests"] += 1
        if not settings.api_keys:
            return None
        auth = request.headers.get("authorization", "")
        key = auth[7:] if auth.lower().startswith("bearer ") else None
        if key not in settings.api_keys:
            raise HttpError(401, "a valid API key is needed (Authorization: Bearer KEY)")
        return owner_hash(key)

    async def run(fn, key=None, urgent: bool = False):
        return await asyncio.wrap_future(engine.submit(fn, key, urgent))

    def tokens(text: str) -> list[int]:
        if not text.strip():
            raise InfinictxError("the text is empty")
        ids = lm.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) > settings.max_request_tokens:
            raise HttpError(413, f"the text has {len(ids)} tokens; at most {settings.max_request_tokens} per request")
        return ids

    def check_max_tokens(n: int):
        if n > settings.max_request_tokens:
            raise HttpError(413, f"max_tokens is at most {settings.max_request_tokens}")

    async def streamed(job, key, sampler_kw: dict, frame):
        """Run `job(sampler)` on the worker with a sampler that streams its tokens; answer with server-sent
        events: `frame(delta_text, final_result_or_None)` gives each event's JSON. Errors before the first token
        (a bad session, bad settings) still get their own status code."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sampler = StreamingSampler(lambda t: loop.call_soon_threadsafe(events.put_nowait, ("token", t)),
                                   **sampler_kw)
        fut = engine.submit(lambda: job(sampler), key)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, ("done", None)))
        first = await events.get()
        if first[0] == "done" and fut.exception() is not None:
            raise fut.exception()

        async def body():
            ids, sent, item = [], "", first
            while True:
                if item[0] == "token":
                    ids.append(item[1])
                    text = lm.tokenizer.decode(ids)
                    if not text.endswith("\ufffd"):   # wait for the rest of a character split over tokens
                        yield f"data: {json.dumps(frame(text[len(sent):], None))}\n\n"
                        sent = text
                else:
                    rest = lm.tokenizer.decode(ids)[len(sent):] if ids else ""
                    if rest:   # what was held back for a character that never completed
                        yield f"data: {json.dumps(frame(rest, None))}\n\n"
                    if fut.exception() is not None:
                        yield f"data: {json.dumps({'error': str(fut.exception()).splitlines()[0]})}\n\n"
                    else:
                        yield f"data: {json.dumps(frame('', fut.result()))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                item = await events.get()

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # --- sessions ------------------------------------------------------------------------------------
    @app.post("/v1/sessions")
    async def new_session(body: NewSession, request: Request):
        owner = owner_of(request)
        return await run(lambda: engine.create(owner, body.method, body.settings, body.temp_lora), urgent=True)

    @app.post("/v1/sessions/{sid}/read")
    async def read(sid: str, body: Read, request: Request):
        owner = owner_of(request)
        engine.entry(sid, owner)
        ids = tokens(body.text)
        return await run(lambda: engine.read(sid, owner, ids, body.score, body.offset), sid)

    @app.post("/v1/sessions/{sid}/score")
    async def score(sid: str, body: Score, request: Request):
        owner = owner_of(request)
        engine.entry(sid, owner)
        ids = tokens(body.text)
        return await run(lambda: engine.score(sid, owner, ids, body.base), sid)

    @app.post("/v1/sessions/{sid}/generate")
    async def generate(sid: str, body: Generate, request: Request):
        owner = owner_of(request)
        engine.entry(sid, owner)
        check_max_tokens(body.max_tokens)
        kw = dict(temperature=body.temperature, top_p=body.top_p, ban_eos=False, seed=body.seed,
                  stop_at_eos=body.stop_at_eos)
        if body.stream:
            return await streamed(lambda sampler: engine.generate(sid, owner, sampler, body.max_tokens), sid, kw,
                                  lambda delta, done: {"text": delta, **(done or {}), "done": done is not None})
        return await run(lambda: engine.generate(sid, owner, Sampler(**kw), body.max_tokens), sid)

    @app.get("/v1/sessions/{sid}")
    async def describe(sid: str, request: Request):
        owner = owner_of(request)
        engine.entry(sid, owner)
        return await run(lambda: engine.describe(sid, owner), sid, urgent=True)

    @app.delete("/v1/sessions/{sid}")
    async def delete(sid: str, request: Request):
        owner = owner_of(request)
        engine.entry(sid, owner)
        return await run(lambda: engine.delete(sid, owner), sid, urgent=True)

    # --- OpenAI-compatible ---------------------------------------------------------------------------
    async def openai_answer(request, prompt: str, max_tokens: int, body, kind: str):
        """Shared by both completion routes: the prompt read into `body.session` (then answered from it), or
        answered by the base model alone; the reply in OpenAI's shape for `kind` (text or chat)."""
        owner = owner_of(request)
        if body.n != 1:
            raise InfinictxError("n must be 1")
        if body.stop:
            raise InfinictxError("stop sequences are not supported; the answer ends at end-of-sequence or max_tokens")
        check_max_tokens(max_tokens)
        ids = tokens(prompt)
        kw = dict(temperature=body.temperature, top_p=body.top_p, ban_eos=False, repetition_penalty=1.0,
                  seed=body.seed if body.seed is not None else secrets.randbelow(2 ** 31), stop_at_eos=True)
        sid = body.session
        if sid is not None:
            engine.entry(sid, owner)

            def job(sampler):
                engine.read(sid, owner, ids, score=False)
                return engine.generate(sid, owner, sampler, max_tokens)
        else:
            def job(sampler):
                return engine.complete_stateless(ids, sampler, max_tokens)

        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
        created, model = int(time.time()), lm.name

        def usage(result):
            return {"prompt_tokens": len(ids), "completion_tokens": result["tokens"],
                    "total_tokens": len(ids) + result["tokens"]}

        if body.stream:
            started = {"role": False}

            def frame(delta, done):
                if kind == "text":
                    choice = {"index": 0, "text": delta, "logprobs": None,
                              "finish_reason": done["finish_reason"] if done else None}
                    out = {"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [choice]}
                else:
                    d = {} if done else {"content": delta}
                    if not started["role"]:
                        d["role"], started["role"] = "assistant", True
                    choice = {"index": 0, "delta": d, "logprobs": None,
                              "finish_reason": done["finish_reason"] if done else None}
                    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [choice]}
                if done:
                    out["usage"] = usage(done)
                return out

            return await streamed(job, sid, kw, frame)
        result = await run(lambda: job(Sampler(**kw)), sid)
        if kind == "text":
            choice = {"index": 0, "text": result["text"], "logprobs": None, "finish_reason": result["finish_reason"]}
            obj = "text_completion"
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]}, "logprobs": None,
                      "finish_reason": result["finish_reason"]}
            obj = "chat.completion"
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                "usage": usage(result)}

    @app.post("/v1/completions")
    async def completions(body: Completion, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InfinictxError("prompt must be one string")
            prompt = prompt[0]
        return await openai_answer(request, prompt, body.max_tokens, body, "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletion, request: Request):
        if not body.messages:
            raise InfinictxError("messages is empty")
        prompt = chat_prompt(lm.tokenizer, [m.model_dump() for m in body.messages])
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        return await openai_answer(request, prompt, max_tokens, body, "chat")

    @app.get("/v1/models")
    async def models(request: Request):
        owner_of(request)
        return {"object": "list", "data": [{"id": lm.name, "object": "model", "created": int(engine.stats["started"]),
                                            "owned_by": "infinictx"}]}

    # --- status --------------------------------------------------------------------------------------
    @app.get("/status")
    async def status_json(weights: bool = False):
        """Counters; `?weights=true` also hashes the base weights now (on the worker, between jobs) and says
        whether they are still the weights loaded: no adapter ever leaks into them."""
        out = engine.status()
        if weights:
            from ...core.models import weights_fingerprint

            now = await run(lambda: weights_fingerprint(lm.model), "__status__")
            out["weights_unchanged"] = now == engine.loaded_weights
        return out

    @app.get("/", response_class=HTMLResponse)
    async def status_page():
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in engine.status().items())
        return (f"<!doctype html><title>infinictx serve</title><meta http-equiv=refresh content=5>"
                f"<h1>infinictx serve</h1><table>{rows}</table>")

    return app


def serve(lm, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000):
    import uvicorn

    uvicorn.run(create_app(lm, settings), host=host, port=port, log_level="warning")
