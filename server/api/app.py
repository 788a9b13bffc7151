"""HTTP layer: routes, lifespan (model load), auth, error shape. Request logic lives in chat.py."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from prompts import load_format
from server.api.chat import ChatService
from server.engine.base import Engine
from server.engine.builtin import BuiltinEngine, load_model
from server.api.errors import APIError, install_error_handlers
from server.api.metrics import Metrics
from server.api.middleware import RequestMiddleware
from server.api.protocol import ChatCompletion, ChatCompletionRequest, ErrorResponse, ModelCard, ModelList
from server.settings import Settings

log = logging.getLogger("agent_server")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 405, 413, 429, 500, 503)
}


def build_engine(settings: Settings) -> Engine:
    """The engine the settings name: built-in (load the model here) or vLLM (over HTTP or as a child)."""
    model_path = _model_path(settings)
    if settings.engine_url or settings.engine == "vllm":
        return _vllm_engine(settings, model_path)
    if settings.engine != "builtin":
        raise SystemExit(f"unknown --engine {settings.engine!r}: use builtin or vllm")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model, tokenizer = load_model(model_path, settings.adapter, dtype=settings.dtype, device=settings.device)
    engine = BuiltinEngine(
        model,
        tokenizer,
        max_model_len=settings.max_model_len,
        max_running=settings.max_running,
        max_queued=settings.max_queued,
        kv_cache_tokens=settings.kv_cache_tokens,
        max_batch_tokens=settings.max_batch_tokens,
    )
    log.info(
        "serving %s from %s on %s (%s), max_model_len=%d",
        settings.served_model_name, model_path, model.device, model.dtype, engine.max_model_len,
    )
    return engine


def _model_path(settings: Settings) -> str:
    """`--model`, or the demo model (built once, cached) under `--demo`."""
    if settings.demo:
        from server.demo import build_demo_model

        log.warning("=" * 72)
        log.warning("DEMO MODEL: a tiny model trained in a minute to call three demo tools.")
        log.warning("It is not Qwen1.5-4B-agent and knows nothing else. Use --model for real work.")
        log.warning("=" * 72)
        return str(build_demo_model(settings.demo_cache))
    if not settings.model:
        raise SystemExit("no model: pass --model DIR (or --demo)")
    return settings.model


def _vllm_engine(settings: Settings, model_path: str) -> Engine:
    """vLLM over HTTP: at `--engine-url`, or a child process started by `--engine vllm`.

    The model directory still gives the tokenizer: this server renders and detokenizes.
    """
    from transformers import AutoTokenizer

    from server.engine.vllm import VLLMEngine, model_stop_ids
    from server.engine.vllm_process import VLLMProcess

    if settings.engine_url and settings.engine == "vllm":
        raise SystemExit("pass either --engine-url (a running vLLM) or --engine vllm (start one), not both")
    if settings.adapter:
        raise SystemExit("--adapter is for the built-in engine; for vLLM, `agent-server merge` first and serve the merged dir")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    process = None
    if settings.engine == "vllm":
        process = VLLMProcess(
            settings.vllm_python,
            model_path,
            tensor_parallel_size=settings.tensor_parallel_size,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=settings.max_model_len,
            dtype=settings.dtype,
            extra_args=settings.vllm_args,
        )
    return VLLMEngine(
        settings.engine_url or process.url,  # type: ignore[union-attr]
        tokenizer,
        stop_ids=model_stop_ids(model_path, tokenizer),
        max_model_len=settings.max_model_len,
        max_running=settings.max_running,
        max_queued=settings.max_queued,
        startup_timeout=settings.engine_startup_timeout,
        process=process,
    )


def chat_service(request: Request) -> ChatService:
    """Dependency: the request logic bound to the loaded engine."""
    return request.app.state.chat


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The ASGI app; the model loads in `lifespan` unless an engine is passed in."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = engine is None
        active = build_engine(settings) if owned else engine
        await active.start()
        app.state.engine = active
        app.state.chat = ChatService(active, load_format(), settings.served_model_name, metrics)
        metrics.engine_info.labels(engine=active.name).set(1)
        metrics.running.set_function(lambda: active.running)
        metrics.queued.set_function(lambda: active.queued)
        app.state.started = int(time.time())
        try:
            yield
        finally:
            if owned:
                await active.stop()

    metrics = Metrics()
    app = FastAPI(title="agent-server", version="0.1.0", lifespan=lifespan, responses=_ERRORS)
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(RequestMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)

    def require_api_key(request: Request) -> None:
        """Bearer auth on /v1/* when an API key is configured (constant-time comparison)."""
        expected = settings.api_key
        if not expected:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
            raise APIError(
                401,
                "Incorrect API key provided. Send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    Auth = Depends(require_api_key)

    @app.get("/health", include_in_schema=True)
    async def health(request: Request) -> dict[str, str]:
        """200 once the model is loaded (the server only listens after that); 503 while the engine is down."""
        active: Engine = request.app.state.engine
        if not active.available:
            raise APIError(503, f"The {active.name} engine is unavailable.", code="engine_unavailable")
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        """Prometheus text format; open like /health (put it behind your proxy's ACL)."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[Auth])
    async def models(request: Request) -> ModelList:
        return ModelList(data=[ModelCard(id=settings.served_model_name, created=request.app.state.started)])

    @app.get("/v1/models/{model_id}", dependencies=[Auth])
    async def model(model_id: str, request: Request) -> ModelCard:
        if model_id != settings.served_model_name:
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return ModelCard(id=model_id, created=request.app.state.started)

    @app.post(
        "/v1/chat/completions",
        dependencies=[Auth],
        response_model=ChatCompletion,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, service: Annotated[ChatService, Depends(chat_service)]
    ) -> Response:
        chat = service.prepare(body)
        generation = service.submit(chat)
        if body.stream:
            return EventSourceResponse(service.stream(chat, generation), sep="\n", ping=15)
        completion = await _unless_disconnected(request, service.complete(chat, generation))
        if completion is None:
            return Response(status_code=499)  # nobody is listening; the sequence was cancelled
        return JSONResponse(completion.model_dump(mode="json"))

    return app


async def _unless_disconnected(request: Request, work: Awaitable[ChatCompletion]) -> ChatCompletion | None:
    """Run `work`, cancelling it (and so its sequence) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    return task.result()
