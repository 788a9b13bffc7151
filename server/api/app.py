"""HTTP layer: routes, lifespan (model load), auth, error shape. Request logic lives in chat.py,
completions.py and responses.py."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Protocol, TypeVar

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from prompts import load_format
from server.api.chat import ChatService, render_chat
from server.api.completions import CompletionService
from server.api.responses import ResponseService, ResponseStore
from server.api.responses_protocol import DeletedResponse, Response as ResponseObject, ResponseRequest
from server.engine.base import Engine, Generation
from server.engine.builtin import BuiltinEngine, load_model
from server.api.errors import APIError, install_error_handlers
from server.api.metrics import Metrics
from server.api.middleware import RequestMiddleware
from server.api.sse import Event, EventStream
from server.api.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    RenderedChat,
    TokenizeRequest,
    TokenizeResponse,
)
from server.settings import Settings

log = logging.getLogger("agent_server")
P = TypeVar("P")  # a service's prepared request

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
    log.info("loading model from %s%s", model_path, f" with LoRA adapter {settings.adapter}" if settings.adapter else "")
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
        grammar=settings.engine_grammar,
    )


async def chat_service(request: Request) -> ChatService:
    """Dependency: the request logic bound to the loaded engine.

    The dependencies are `async def` although they never await: FastAPI runs a plain `def`
    dependency in a worker thread, a thread hop per request that the benchmark measured."""
    return request.app.state.chat


async def completion_service(request: Request) -> CompletionService:
    return request.app.state.completions


async def response_service(request: Request) -> ResponseService:
    return request.app.state.responses


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The ASGI app; the model loads in `lifespan` unless an engine is passed in."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = engine is None
        active = build_engine(settings) if owned else engine
        await active.start()
        app.state.engine = active
        app.state.chat = ChatService(
            active, load_format(), settings.served_model_name, metrics, strict_tools=settings.strict_tools
        )
        app.state.completions = CompletionService(app.state.chat)
        app.state.responses = ResponseService(
            app.state.chat, ResponseStore(settings.responses_store_size, settings.responses_ttl)
        )
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

    async def require_api_key(request: Request) -> None:
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

    stream_responses: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}

    @app.post("/v1/chat/completions", dependencies=[Auth], response_model=ChatCompletion, responses=stream_responses)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, service: Annotated[ChatService, Depends(chat_service)]
    ) -> Response:
        chat = service.prepare(body)
        return await _generate(request, service, chat, bool(body.stream))

    @app.post("/v1/completions", dependencies=[Auth], response_model=Completion, responses=stream_responses)
    async def completions(
        body: CompletionRequest, request: Request, service: Annotated[CompletionService, Depends(completion_service)]
    ) -> Response:
        prepared = service.prepare(body)
        return await _generate(request, service, prepared, bool(body.stream))

    @app.post("/v1/responses", dependencies=[Auth], response_model=ResponseObject, responses=stream_responses)
    async def responses(
        body: ResponseRequest, request: Request, service: Annotated[ResponseService, Depends(response_service)]
    ) -> Response:
        prepared = service.prepare(body)
        return await _generate(request, service, prepared, bool(body.stream))

    @app.get("/v1/responses/{response_id}", dependencies=[Auth], response_model=ResponseObject)
    async def get_response(response_id: str, service: Annotated[ResponseService, Depends(response_service)]) -> Response:
        return JSONResponse(service.store.get(response_id).response.model_dump(mode="json"))

    @app.delete("/v1/responses/{response_id}", dependencies=[Auth])
    async def delete_response(
        response_id: str, service: Annotated[ResponseService, Depends(response_service)]
    ) -> DeletedResponse:
        service.store.delete(response_id)
        return DeletedResponse(id=response_id)

    @app.post("/v1/chat/completions/render", dependencies=[Auth])
    async def render(body: ChatCompletionRequest, service: Annotated[ChatService, Depends(chat_service)]) -> RenderedChat:
        """The exact prompt a chat request becomes (nothing is generated; the model name is not checked)."""
        prompt = render_chat(body, service.fmt, service.encoder)
        return RenderedChat(prompt=prompt.text + prompt.forced_prefix, token_ids=prompt.ids, count=len(prompt.ids),
                            forced_prefix=prompt.forced_prefix, tool_names=list(prompt.tool_names))

    @app.post("/tokenize", dependencies=[Auth])
    async def tokenize(body: TokenizeRequest, service: Annotated[CompletionService, Depends(completion_service)]) -> TokenizeResponse:
        """vLLM's /tokenize: `prompt` as /v1/completions reads it, or `messages` as /v1/chat/completions renders them."""
        chat = service.chat
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "Send either 'prompt' or 'messages'.", param="prompt", code="invalid_value")
        if body.messages is not None:
            if not body.add_generation_prompt:
                raise APIError(400, "add_generation_prompt=false is not supported: the format always ends with the "
                               "assistant's turn opening.", param="add_generation_prompt", code="unsupported_parameter")
            request = ChatCompletionRequest.model_construct(  # fields already validated by TokenizeRequest
                model=chat.model_name, messages=body.messages, tools=body.tools, tool_choice=body.tool_choice,
                functions=None, function_call=None)
            ids = render_chat(request, chat.fmt, chat.encoder).ids
        else:
            ids = service.prompt_ids(body.prompt) if body.prompt else []
        strs = [chat.token_texts(i)[0] for i in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=chat.engine.max_model_len, tokens=ids, token_strs=strs)

    @app.post("/detokenize", dependencies=[Auth])
    async def detokenize(body: DetokenizeRequest, service: Annotated[CompletionService, Depends(completion_service)]) -> DetokenizeResponse:
        """vLLM's /detokenize: token ids -> text, control tokens spelled out."""
        ids = service.prompt_ids(body.tokens, param="tokens") if body.tokens else []
        return DetokenizeResponse(prompt=service.chat.engine.tokenizer.decode(ids))

    return app


class GeneratingService(Protocol[P]):
    """What each generating endpoint's service offers the routes (chat, completions, responses)."""

    def submit(self, prepared: P) -> list[Generation]: ...

    def stream(self, prepared: P, generations: list[Generation]) -> AsyncGenerator[Event, None]: ...

    def complete(self, prepared: P, generations: list[Generation]) -> Awaitable[BaseModel]: ...


async def _generate(request: Request, service: GeneratingService[P], prepared: P, stream: bool) -> Response:
    """Submit the prepared request's sequences, then stream its events or answer once it is done."""
    generations = service.submit(prepared)
    if stream:
        return EventStream(service.stream(prepared, generations))
    return await _answer(request, service.complete(prepared, generations))


async def _answer(request: Request, work: Awaitable[BaseModel]) -> Response:
    """The JSON answer of a non-streaming request, or 499 if the client left first."""
    answer = await _unless_disconnected(request, work)
    if answer is None:
        return Response(status_code=499)  # nobody is listening; the sequences were cancelled
    return JSONResponse(answer.model_dump(mode="json"))


async def _unless_disconnected(request: Request, work: Awaitable[BaseModel]) -> BaseModel | None:
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
