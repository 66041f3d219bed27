"""The ASGI app (FastAPI): OpenAI chat completions over the bundle, /v1/models, /health.

    app = create_app(ServeOptions(bundle="out/bundle"))   # uvicorn.run(app) serves it

The bundle loads on a background thread when the app starts, so the port answers at once:
/health and /v1 say 503 until the pipeline is loaded and one warm-up request has run through
every stage. Every error is an OpenAI error object with a 4xx status (or 500 for a bug, with
no traceback: that goes to the server log).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ib_edge.runtime.embed_cache import EmbedCache
from ib_edge.runtime.errors import IbEdgeError, InputError

from . import api
from .engine import Cancelled, Completion, Engine, GenParams, Job, QueueFull, batch_limit
from .options import ServeOptions

log = logging.getLogger("ib_edge.serve")
POLL_S = 0.25        # how often a waiting handler checks that its client is still connected
WARMUP_PROMPT = "Describe this image."


def load_pipeline(opts: ServeOptions):
    from ib_edge.runtime import Pipeline

    return Pipeline.load(opts.bundle, providers=list(opts.providers) if opts.providers else None,
                         threads=opts.threads, verify=opts.verify, llm_engine=opts.llm_engine)


class ServerState:
    """Loading -> ready (or failed); the pipeline and engine once ready."""

    def __init__(self, opts: ServeOptions):
        self.opts = opts
        self.phase = "loading"
        self.error: str | None = None
        self.pipe = None
        self.engine: Engine | None = None
        self.model_name: str | None = None
        self.created = api.now()
        self.closing = False
        self.load_s: float | None = None

    def require_ready(self) -> Engine:
        if self.phase == "ready":
            return self.engine
        if self.phase == "failed":
            raise api.RequestError(f"the bundle failed to load: {self.error}", status=503, type="server_error",
                                   code="load_failed")
        raise api.RequestError("the model is still loading", status=503, type="server_error", code="model_loading",
                               hint="retry when GET /health says ok")


def warm_up(engine: Engine) -> None:
    """One request through every stage (and the LLM's lazy load), then the counters reset."""
    from PIL import Image

    pipe = engine.pipe
    done = threading.Event()
    out = []
    engine.reserve()
    pv = pipe.pixel_values([Image.new("RGB", (64, 64), (128, 128, 128))] * (pipe.manifest.frames or 1))
    engine.submit(Job(pv, pipe.prompts.encode(WARMUP_PROMPT, 2, frames=pipe.manifest.frames), GenParams(max_new_tokens=2), None,
                      lambda r: (out.append(r), done.set())))
    done.wait()
    if not isinstance(out[0], Completion):
        raise out[0]
    if pipe.embed_cache is not None:
        pipe.embed_cache.clear()
    engine.batches.clear()
    engine.completed = engine.cancelled = 0


def start_loading(state: ServerState, load, on_fatal, on_ready) -> threading.Thread:
    def run():
        t0 = time.perf_counter()
        try:
            pipe = load(state.opts)
            opts = state.opts
            pipe.embed_cache = EmbedCache(opts.cache_mb) if opts.cache_mb > 0 else None
            engine = Engine(pipe, max_queue=opts.max_queue, max_batch=batch_limit(pipe.manifest, opts.max_batch))
            engine.start()
            warm_up(engine)
        except Exception as e:  # bundle problems are IbEdgeErrors; anything else is a bug, logged in full
            if not isinstance(e, IbEdgeError):
                log.exception("loading failed")
            state.error = e.line() if isinstance(e, IbEdgeError) else f"{type(e).__name__}: {e}"
            state.phase = "failed"
            if on_fatal is not None:
                on_fatal(e)
            return
        if state.closing:
            engine.stop()
            return
        state.pipe, state.engine = pipe, engine
        state.model_name = state.opts.model_name or str((pipe.manifest.data.get("source") or {}).get("model", "ib-edge"))
        state.load_s = time.perf_counter() - t0
        state.phase = "ready"
        if on_ready is not None:
            on_ready(state)

    t = threading.Thread(target=run, name="ib-serve-load", daemon=True)
    t.start()
    return t


# --- the guard in front of the app: API key, body size ------------------------------------------
class Guard:
    """Pure ASGI middleware: the API key for /v1 (before any body is kept), then the body read
    whole up to ``max_body`` (413 beyond) and replayed to the app. An oversized or refused body
    is still drained (up to ``DRAIN_FACTOR`` times the limit) so the client reads the answer
    instead of a broken pipe."""
    DRAIN_FACTOR = 8

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = None
        if self.api_key and scope["path"].startswith("/v1"):
            got = headers.get("authorization", "")
            token = got[7:] if got[:7].lower() == "bearer " else None
            if token is None:
                refusal = (401, api.error_body("missing API key (send Authorization: Bearer KEY)",
                                               "invalid_request_error", "invalid_api_key"))
            elif not hmac.compare_digest(token.encode(), self.api_key.encode()):
                refusal = (401, api.error_body("incorrect API key", "invalid_request_error", "invalid_api_key"))
        length = headers.get("content-length")
        if refusal is None and length is not None:
            if not length.isdigit():
                refusal = (400, api.error_body("bad Content-Length header"))
            elif int(length) > self.max_body:
                refusal = (413, self._too_large())
        body, more, size = [], True, 0
        if scope["method"] in ("POST", "PUT", "PATCH"):
            keep = refusal is None
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunk = msg.get("body", b"")
                size += len(chunk)
                more = msg.get("more_body", False)
                if keep and size > self.max_body:
                    keep, refusal, body = False, (413, self._too_large()), []
                if keep:
                    body.append(chunk)
                if size > self.DRAIN_FACTOR * self.max_body:
                    break
        if refusal is not None:
            status, err = refusal
            extra = {"www-authenticate": "Bearer"} if status == 401 else {}
            return await JSONResponse(err, status_code=status, headers=extra)(scope, receive, send)
        data = b"".join(body)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()  # after the body: the client's disconnect, when it comes

        return await self.app(scope, replay, send)

    def _too_large(self) -> dict:
        return api.error_body(f"request body larger than the server's limit ({self.max_body / (1 << 20):g} MiB)",
                              "invalid_request_error", "request_too_large")


# --- the app ------------------------------------------------------------------------------------
def create_app(opts: ServeOptions, *, load=load_pipeline, on_fatal=None, on_ready=None) -> FastAPI:
    """``load(opts) -> Pipeline`` runs on a background thread at start-up; then ``on_ready(state)``,
    or ``on_fatal(exc)`` if loading fails (the CLI stops the server with exit 3)."""
    state = ServerState(opts)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        start_loading(state, load, on_fatal, on_ready)
        yield
        state.closing = True
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="ib-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(Guard, api_key=opts.api_key, max_body=opts.max_body_bytes)
    allow_files = None
    if opts.allow_files:
        from pathlib import Path

        allow_files = Path(opts.allow_files)

    # -- errors: always OpenAI's error object --
    @app.exception_handler(api.RequestError)
    async def _request_error(request, e: api.RequestError):
        return JSONResponse(api.error_body(e.line(), e.type, e.code, e.param), status_code=e.status)

    @app.exception_handler(QueueFull)
    async def _queue_full(request, e: QueueFull):
        return JSONResponse(api.error_body(e.line(), "rate_limit_error", "queue_full"), status_code=429,
                            headers={"retry-after": "1"})

    @app.exception_handler(InputError)
    async def _input_error(request, e: InputError):
        return JSONResponse(api.error_body(e.line()), status_code=400)

    @app.exception_handler(Cancelled)
    async def _cancelled(request, e: Cancelled):
        return JSONResponse(api.error_body(e.line(), "server_error", "cancelled"), status_code=503)

    @app.exception_handler(IbEdgeError)
    async def _runtime_error(request, e: IbEdgeError):  # a bundle/runtime problem, not the request's
        log.error("runtime error on %s: %s", request.url.path, e.line())
        return JSONResponse(api.error_body(e.line(), "server_error"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(api.error_body("request body is not valid JSON"), status_code=400)
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(api.error_body(f"{loc or 'body'}: {first.get('msg', 'invalid')}", param=loc or None),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(api.error_body(msg, code="not_found" if e.status_code == 404 else None),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.error("internal error on %s", request.url.path, exc_info=e)
        return JSONResponse(api.error_body(f"internal error: {type(e).__name__} (see the server log)",
                                           "server_error"), status_code=500)

    # -- endpoints --
    @app.get("/health")
    async def health():
        body = {"status": {"ready": "ok"}.get(state.phase, state.phase), "model": state.model_name}
        if state.phase == "failed":
            body["error"] = state.error
        if state.engine is not None:
            body["queue"] = state.engine.stats()
            cache = state.pipe.embed_cache
            body["cache"] = cache.stats() if cache is not None else None
            body["load_s"] = round(state.load_s, 2)
        return JSONResponse(body, status_code=200 if state.phase == "ready" else 503)

    @app.get("/v1/models")
    async def models():
        state.require_ready()
        return api.models_body(state.model_name, state.created)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        state.require_ready()
        if model_id != state.model_name:
            raise _unknown_model(model_id)
        return api.model_body(state.model_name, state.created)

    def _unknown_model(name: str):
        return api.RequestError(f"model {name!r} is not served here (this server serves {state.model_name!r})",
                                status=404, code="model_not_found", param="model")

    def prepare(url, prompt: str, params: GenParams):
        frames = state.pipe.manifest.frames
        enc = state.pipe.prompts.encode(prompt, params.max_new_tokens, frames=frames)  # the prompt first: it is cheap
        if frames is not None:  # a video bundle: the frames' URLs in order (or one animated GIF)
            return video_pixel_values(url, frames), enc
        image = api.load_request_image(url, allow_files, opts.max_body_bytes)
        return state.pipe.pixel_values([image]), enc

    def video_pixel_values(urls: list[str], frames: int):
        if len(urls) == frames:
            return state.pipe.video_pixel_values([api.load_request_image(u, allow_files, opts.max_body_bytes)
                                                  for u in urls])
        url = urls[0]  # one animated image: the bytes go through the runtime's video decoding
        if not url.startswith("data:"):
            raise api.RequestError(f"a video model takes {frames} image_url parts (frames) or one animated GIF "
                                   "as a data: URL", param="image_url")
        return state.pipe.video_pixel_values(api.data_url_bytes(url))

    @app.post("/v1/chat/completions")
    async def chat(req: api.ChatRequest, request: Request):
        engine = state.require_ready()
        if req.model != state.model_name:
            raise _unknown_model(req.model)
        params = api.gen_params(req, opts.max_tokens)
        prompt, url = api.prompt_and_image(req.messages, state.pipe.manifest.frames)
        engine.reserve()
        try:
            try:
                pv, enc = await run_in_threadpool(prepare, url, prompt, params)
            except InputError as e:
                raise e if isinstance(e, api.RequestError) else api.RequestError(e.line()) from None
        except BaseException:
            engine.release()
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(item):
            with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down, nobody waits
                loop.call_soon_threadsafe(events.put_nowait, item)

        stream = bool(req.stream)
        job = Job(pv, enc, params, (lambda t: put(("text", t))) if stream else None,
                  lambda r: put(("done", r)))
        engine.submit(job)
        cid, created = api.completion_id(), api.now()
        if stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(request, job, events, cid, created, include_usage),
                                     media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        try:
            while True:
                item = await _next_event(request, job, events)
                if item is None:
                    return Response(status_code=499)  # the client left; nobody reads this
                kind, result = item
                if kind == "done":
                    break
        except asyncio.CancelledError:
            job.cancel()
            raise
        if isinstance(result, Completion):
            return api.completion_body(cid, state.model_name, created, result.text,
                                       result.finish_reason, result.prompt_tokens, len(result.token_ids))
        raise result if isinstance(result, Exception) else RuntimeError(repr(result))

    async def _sse(request, job, events, cid, created, include_usage):
        name = state.model_name

        def data(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            yield data(api.chunk_body(cid, name, created, {"role": "assistant", "content": ""}))
            while True:
                item = await _next_event(request, job, events)
                if item is None:
                    return
                kind, value = item
                if kind == "text":
                    yield data(api.chunk_body(cid, name, created, {"content": value}))
                    continue
                if isinstance(value, Completion):
                    yield data(api.chunk_body(cid, name, created, {}, value.finish_reason))
                    if include_usage:
                        yield data({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                                    "choices": [], "usage": api.usage(value.prompt_tokens, len(value.token_ids))})
                else:  # the status line is sent: the error goes in the stream, as OpenAI does
                    if not isinstance(value, IbEdgeError):
                        log.error("generation failed", exc_info=value)
                    msg = value.line() if isinstance(value, IbEdgeError) else f"internal error: {type(value).__name__}"
                    yield data(api.error_body(msg, "invalid_request_error" if isinstance(value, InputError)
                                              else "server_error"))
                yield "data: [DONE]\n\n"
                return
        finally:
            job.cancel()  # a no-op once finished; stops the generation when the client went away

    return app


async def _next_event(request: Request, job: Job, events: asyncio.Queue):
    """The job's next event, or None (and the job cancelled) once the client has disconnected."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return None
