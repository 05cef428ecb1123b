"""`qlora serve-model`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for the registered adapters.

One base model in memory, every adapter of `serving.models` on it (tasks.serving_models), requests
batched across adapters, aliases followed at runtime, A/B routing and metrics (tasks.serving_ab).

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as server-sent
events), `GET /v1/models`, `POST /v1/feedback`, `POST /admin/reload`, `GET /metrics`, `GET /health`
(alive) and `GET /ready` (models loaded). Every answer names what answered it in the headers
`X-Qlora-Model`, `X-Qlora-Model-Version`, `X-Qlora-Arm` and `X-Request-Id`.

Bad input is answered with a 4xx and an OpenAI-shaped JSON error (`{"error": {"message", "type",
"param", "code"}}`), never a 500: malformed JSON or fields (400), an unknown model (404), an over-long
prompt or a max_tokens above the cap (400), a missing or wrong bearer token (401).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from configs.schema import ConfigError, PipelineConfig
from tasks.serving_ab import NO_ARM, ArmStats, ServingMetrics, SummaryLogger, arm_models, choose_arm
from tasks.serving_models import BASE_MODEL_NAME, Answer, Batcher, Job, Lease, ModelPool, UnknownModel

logger = logging.getLogger(__name__)

TOKEN_ENV = "QLORA_SERVING_TOKEN"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
OPEN_PATHS = ("/health", "/ready")


class ServingError(Exception):
    """An answer with a 4xx/5xx status and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.code, self.param, self.kind)


def error_response(status: int, message: str, code: str, param: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def required_token(host: str, environ: dict[str, str] | None = None) -> str | None:
    """The bearer token requests must carry: QLORA_SERVING_TOKEN when set; refuses a non-loopback bind without it."""
    token = (environ if environ is not None else os.environ).get(TOKEN_ENV) or None
    if token is None and host not in LOOPBACK_HOSTS:
        raise ConfigError(f"serving.host={host} makes the server reachable beyond this machine: set {TOKEN_ENV} "
                          "to a secret bearer token (clients send `Authorization: Bearer <token>`), or bind "
                          "serving.host=127.0.0.1")
    return token


# --------------------------------------------------------------------------------------------------
# Request bodies (unknown fields are ignored, as OpenAI clients send many optional ones)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    stream: bool = False
    user: str | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")


class CompletionRequest(_Body):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ServingError(400, "only text content parts ({type: text, text}) are supported",
                                   "unsupported_content", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    score: float


# --------------------------------------------------------------------------------------------------
# The server's state, testable without HTTP


class ModelServer:
    """Pool + batcher + routing + statistics; the FastAPI app is a thin layer over it."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.serving = config.serving
        self.arms = arm_models(self.serving) if self.serving.ab else {}
        self.weights = {arm: weight for arm, weight in self.serving.ab.items() if arm in self.arms}
        self.pool = ModelPool(config)
        self.metrics = ServingMetrics()
        self.stats = ArmStats(window=self.serving.feedback_window)
        self.summaries = SummaryLogger(config, self.stats) if self.serving.ab else None
        self.batcher = Batcher(self.pool, self.serving.max_batch_size, self.serving.max_wait_ms,
                               on_batch=lambda jobs, _: self.metrics.batch_size.observe(len(jobs)))
        self.ready = False
        self.load_error: str | None = None
        self.stop = threading.Event()

    def start(self) -> None:
        """Load the models (in the caller's thread), then start the batcher, watcher and summaries."""
        try:
            self.pool.load()
            self.batcher.start()
            if self.serving.watch_interval_s > 0:
                self.pool.watch(self.serving.watch_interval_s, self.stop)
            if self.summaries is not None:
                self.summaries.start()
            self.ready = True
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("the model server could not load its models")

    def shutdown(self) -> None:
        self.stop.set()
        if self.ready:
            self.batcher.stop()
        if self.summaries is not None:
            self.summaries.stop()

    def route(self, model: str | None, user: str | None, request_id: str) -> tuple[str, str]:
        """(served model name, arm) for a request; A/B arms only for requests naming no model."""
        if model is not None:
            return model, NO_ARM
        if self.weights:
            arm = choose_arm(self.weights, user or request_id)
            return self.arms[arm], arm
        return self.serving.models[0].served_name(), NO_ARM

    def acquire(self, model: str) -> Lease:
        try:
            return self.pool.acquire(model)
        except UnknownModel:
            served = ", ".join(sorted(self.pool.entries))
            raise ServingError(404, f"model '{model}' is not served here; served models: {served} (GET /v1/models)",
                               "model_not_found", "model") from None

    def submit(self, lease: Lease, jobs: list[Job]) -> list[concurrent.futures.Future]:
        """Queue the jobs; the lease is released when the last of them is answered (or failed), never
        earlier, so an adapter is not unloaded while a job for it waits in the queue, even when the client
        has gone away."""
        left, lock = [len(jobs)], threading.Lock()

        def finished(_: concurrent.futures.Future) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self.pool.release(lease)

        futures = []
        try:
            for job in jobs:
                futures.append(self.batcher.submit(job))
        except Exception:
            for job in jobs[len(futures):]:
                job.future.set_exception(RuntimeError("not queued: the server is shutting down"))
            raise
        finally:
            for job in jobs:
                job.future.add_done_callback(finished)
        return futures

    def encode(self, lease: Lease, text: str) -> list[int]:
        ids = lease.slot.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.serving.max_prompt_tokens:
            raise ServingError(400, f"the prompt is {len(ids)} tokens; this server takes at most "
                                    f"{self.serving.max_prompt_tokens} (serving.max_prompt_tokens): shorten it",
                               "context_length_exceeded", "prompt")
        return ids

    def max_tokens(self, asked: int | None) -> int:
        if asked is None:
            return min(self.serving.default_max_tokens, self.serving.max_tokens)
        if asked > self.serving.max_tokens:
            raise ServingError(400, f"max_tokens={asked} is above this server's cap of {self.serving.max_tokens} "
                                    "(serving.max_tokens): ask for fewer", "max_tokens_exceeded", "max_tokens")
        return asked


# --------------------------------------------------------------------------------------------------
# The HTTP layer


def _headers(request_id: str, lease: Lease, arm: str) -> dict[str, str]:
    return {"X-Request-Id": request_id, "X-Qlora-Model": lease.entry_name,
            "X-Qlora-Model-Version": lease.slot.version, "X-Qlora-Arm": arm}


def create_app(config: PipelineConfig, token: str | None = None) -> FastAPI:
    """The FastAPI app; models load in a background thread at startup (`/ready` says when)."""
    server = ModelServer(config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=server.start, name="qlora-model-load", daemon=True)
        loader.start()
        yield
        await asyncio.to_thread(loader.join)
        server.shutdown()

    app = FastAPI(title="qlora-pipeline model server", lifespan=lifespan)
    app.state.server = server

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Response:
        if token is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error_response(401, "missing or wrong bearer token: send `Authorization: Bearer <token>` "
                                           f"with the server's {TOKEN_ENV}", "invalid_api_key",
                                      kind="authentication_error")
        return await call_next(request)

    @app.exception_handler(ServingError)
    async def serving_error(_: Request, exc: ServingError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
            problems.append(f"{where}: {error['msg']}")
        code = "invalid_json" if any(e["type"] == "json_invalid" for e in exc.errors()) else "invalid_request"
        return error_response(400, "; ".join(problems) + " (see the OpenAI API reference for the request shape)",
                              code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error",
                              kind="server_error")

    def require_ready() -> None:
        if not server.ready:
            detail = f"loading failed: {server.load_error}" if server.load_error else "the models are still loading"
            raise ServingError(503, f"not ready: {detail} (GET /ready)", "not_ready", kind="server_error")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if server.ready:
            return JSONResponse({"status": "ready", "models": [m["id"] for m in server.pool.describe()]})
        status = "failed" if server.load_error else "loading"
        return JSONResponse({"status": status, "error": server.load_error}, status_code=503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        require_ready()
        return {"object": "list", "data": server.pool.describe()}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/admin/reload")
    async def reload() -> dict[str, Any]:
        require_ready()
        try:
            switched = await asyncio.to_thread(server.pool.refresh)
        except Exception as exc:  # the registry is away or the alias is gone: the loaded versions keep serving
            raise ServingError(502, f"could not check the registry: {exc}", "registry_unavailable",
                               kind="server_error") from exc
        for change in switched:
            server.metrics.switches.labels(change["model"]).inc()
        return {"switched": switched, "models": server.pool.describe()}

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest) -> dict[str, Any]:
        found = server.stats.feedback(body.request_id, body.score)
        if found is None:
            raise ServingError(404, f"request_id '{body.request_id}' is unknown here (never answered, or older than "
                                    f"the last {server.serving.feedback_window} requests)", "request_not_found",
                               "request_id")
        server.metrics.feedback.labels(*found).observe(body.score)
        return {"recorded": True, "arm": found[0], "version": found[1]}

    async def answer(kind: str, body: _Body, render: Callable[[Lease], list[str]], max_tokens: int | None) -> Response:
        """Route, lease the answering adapter, render with its tokenizer, batch, and answer."""
        require_ready()
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        name, arm = server.route(body.model, body.user, request_id)
        lease = server.acquire(name)
        labels = (arm, name, lease.slot.version)
        try:
            prompts = [server.encode(lease, text) for text in render(lease)]
            limit = server.max_tokens(max_tokens)
            temperature = body.temperature or 0.0
            if body.stream:
                if len(prompts) != 1:
                    raise ServingError(400, "stream: true takes one prompt", "invalid_request", "prompt")
                return stream(kind, request_id, lease, arm, prompts[0], limit, temperature)
            started = time.monotonic()
            jobs = [Job(ids, lease, limit, do_sample=temperature > 0, temperature=temperature or 1.0)
                    for ids in prompts]
            futures = server.submit(lease, jobs)  # from here on, the jobs' completion releases the lease
            answers: list[Answer] = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except ServingError as exc:  # refused before anything was queued
            server.metrics.errors.labels(*labels, str(exc.status)).inc()
            server.pool.release(lease)
            raise
        except Exception:
            server.metrics.errors.labels(*labels, "500").inc()
            server.stats.failed(arm, lease.slot.version)
            raise
        elapsed = time.monotonic() - started
        record(request_id, labels, sum(len(a.token_ids) for a in answers), elapsed)
        usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": sum(len(a.token_ids) for a in answers)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        headers = {**_headers(request_id, lease, arm), "X-Qlora-Batch-Size": str(max(a.batch_size for a in answers))}
        if kind == "chat":
            choices = [{"index": 0, "message": {"role": "assistant", "content": answers[0].text},
                        "finish_reason": answers[0].finish_reason}]
        else:
            choices = [{"index": i, "text": a.text, "finish_reason": a.finish_reason, "logprobs": None}
                       for i, a in enumerate(answers)]
        payload = {"id": request_id, "object": "chat.completion" if kind == "chat" else "text_completion",
                   "created": int(time.time()), "model": name, "system_fingerprint": lease.slot.version,
                   "choices": choices, "usage": usage}
        return JSONResponse(payload, headers=headers)

    def record(request_id: str, labels: tuple[str, str, str], tokens: int, elapsed: float) -> None:
        server.metrics.requests.labels(*labels).inc()
        server.metrics.latency.labels(*labels).observe(elapsed)
        server.metrics.tokens.labels(*labels).inc(tokens)
        server.metrics.tokens_per_s.labels(*labels).set(tokens / elapsed if elapsed > 0 else 0.0)
        server.stats.answered(request_id, labels[0], labels[2], tokens, elapsed)

    def stream(kind: str, request_id: str, lease: Lease, arm: str, prompt: list[int], limit: int,
               temperature: float) -> StreamingResponse:
        """Server-sent events: one chunk per new piece of text, then a final chunk and `data: [DONE]`."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        job = Job(prompt, lease, limit, do_sample=temperature > 0, temperature=temperature or 1.0,
                  on_token=lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token))
        started = time.monotonic()
        future = asyncio.wrap_future(server.submit(lease, [job])[0])  # its completion releases the lease
        future.add_done_callback(lambda _: tokens.put_nowait(None))
        labels = (arm, lease.entry_name, lease.slot.version)
        created = int(time.time())

        def chunk(text: str | None, finish_reason: str | None) -> str:
            if kind == "chat":
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
                obj = "text_completion"
            data = {"id": request_id, "object": obj, "created": created, "model": lease.entry_name,
                    "system_fingerprint": lease.slot.version, "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            ids: list[int] = []
            sent = ""
            try:
                if kind == "chat":
                    yield chunk(None, None).replace('"delta": {}', '"delta": {"role": "assistant"}')
                while (token := await tokens.get()) is not None:
                    ids.append(token)
                    text = lease.slot.tokenizer.decode(ids, skip_special_tokens=True)
                    if len(text) > len(sent) and not text.endswith("\ufffd"):
                        yield chunk(text[len(sent):], None)
                        sent = text
                result: Answer = await future
                if result.text.startswith(sent) and len(result.text) > len(sent):
                    yield chunk(result.text[len(sent):], None)
                yield chunk(None, result.finish_reason)
                yield "data: [DONE]\n\n"
                record(request_id, labels, len(result.token_ids), time.monotonic() - started)
            except Exception as exc:  # the status line is sent already: report the error in the stream
                server.metrics.errors.labels(*labels, "500").inc()
                server.stats.failed(arm, lease.slot.version)
                yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=_headers(request_id, lease, arm))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not texts:
            raise ServingError(400, "prompt is an empty list; send a string or a list of strings", "invalid_request",
                               "prompt")
        return await answer("completion", body, lambda _: texts, body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Response:
        from tasks.data import render_prompt

        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        # rendered with the answering adapter's own tokenizer, so its own chat template
        return await answer("chat", body, lambda lease: [render_prompt(lease.slot.tokenizer, messages)],
                            body.max_completion_tokens or body.max_tokens)

    return app


def serve(config: PipelineConfig) -> None:
    """Run the server in this process until interrupted (what `qlora serve-model` calls)."""
    import uvicorn

    token = required_token(config.serving.host)
    app = create_app(config, token)
    uvicorn.run(app, host=config.serving.host, port=config.serving.port, log_level="info")


__all__ = ["BASE_MODEL_NAME", "ModelServer", "ServingError", "create_app", "required_token", "serve"]
