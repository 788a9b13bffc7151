"""One chat completion: request -> render -> engine -> parse -> response or stream.

Streaming and non-streaming share one event generator (`_run`): the non-streaming answer is
the streamed events assembled, so the two cannot disagree.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from prompts import PromptFormat
from server.format.detokenize import IncrementalDetokenizer
from server.engine.base import Engine, EngineError, EngineOverloaded, EngineUnavailable, Generation, SamplingParams
from server.api.errors import APIError
from server.api.metrics import Metrics
from server.format.parse import ACTION, ContentDelta, StreamEvent, StreamingParser, ToolCallArguments, ToolCallStart
from server.api.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    FunctionCallDelta,
    FunctionCallOut,
    ToolCallDelta,
    ToolCallOut,
    Usage,
)
from server.format.render import PromptEncoder, RenderError, RenderedPrompt, render_prompt
from server.format.stop import StopMatcher


@dataclass(frozen=True)
class PreparedChat:
    """A validated request, ready for the engine."""

    id: str
    created: int
    model: str
    prompt: RenderedPrompt
    params: SamplingParams
    stops: list[str]
    max_calls: int | None
    include_usage: bool
    legacy_functions: bool  # answer with `function_call`, as OpenAI does for `functions` requests
    started: float  # time.perf_counter() when the request was prepared


@dataclass
class _Outcome:
    """Filled in while `_run` streams: what the final chunk and the usage need."""

    finish_reason: str = "stop"
    completion_tokens: int = 0


def _legacy_tools(req: ChatCompletionRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """`functions`/`function_call` (deprecated OpenAI fields) mapped onto `tools`/`tool_choice`."""
    if req.functions and req.tools:
        raise APIError(400, "Use either tools or functions, not both.", param="functions", code="invalid_value")
    if req.function_call is not None and req.tool_choice is not None:
        raise APIError(400, "Use either tool_choice or function_call, not both.", param="function_call", code="invalid_value")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools is not None else None
    tool_choice: Any = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
    if req.functions is not None:
        tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in req.functions]
    if req.function_call is not None:
        fc = req.function_call
        tool_choice = fc if isinstance(fc, str) else {"type": "function", "function": {"name": fc.name}}
    return tools, tool_choice


def engine_unavailable(exc: Exception) -> APIError:
    """503 in OpenAI's shape: the engine is down or unreachable; clients retry."""
    return APIError(503, f"The generation engine is unavailable ({exc}). Please retry shortly.",
                    code="engine_unavailable", headers={"Retry-After": "5"})


class ChatService:
    """Turns requests into completions on one engine with one prompt format."""

    def __init__(self, engine: Engine, fmt: PromptFormat, served_model_name: str, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.fmt = fmt
        self.model_name = served_model_name
        self.encoder = PromptEncoder.from_tokenizer(engine.tokenizer)

    def prepare(self, req: ChatCompletionRequest) -> PreparedChat:
        """Validate and render; every problem is an APIError (4xx) with a `param`."""
        refused = req.unsupported_fields()
        if refused:
            raise APIError(400, f"{refused[0]} is not supported by this server.", param=refused[0], code="unsupported_parameter")
        if req.model != self.model_name:
            raise APIError(
                404,
                f"The model `{req.model}` does not exist. This server serves `{self.model_name}`.",
                param="model",
                code="model_not_found",
            )
        tools, tool_choice = _legacy_tools(req)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            prompt = render_prompt(messages, tools, tool_choice, self.fmt, self.encoder)
        except RenderError as exc:
            raise APIError(400, exc.message, param=exc.param, code="invalid_value") from None
        limit = self.engine.max_model_len
        prompt_len = len(prompt.ids)
        requested = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        if prompt_len >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
                f"{prompt_len} tokens. Please reduce the length of the messages.",
                param="messages",
                code="context_length_exceeded",
            )
        if requested is not None and prompt_len + requested > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the messages, {requested} in the completion). "
                "Please reduce the length of the messages or completion.",
                param=param,
                code="context_length_exceeded",
            )
        max_new = requested if requested is not None else limit - prompt_len
        params = SamplingParams(
            max_new_tokens=max_new,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            forced_choices=tuple(tuple(self.encoder.encode_text(c)) for c in prompt.forced_choices),
        )
        return PreparedChat(
            id="chatcmpl-" + secrets.token_urlsafe(18).replace("-", "x").replace("_", "y"),
            created=int(time.time()),
            model=self.model_name,
            prompt=prompt,
            params=params,
            stops=req.stop_sequences(),
            max_calls=1 if req.parallel_tool_calls is False or req.functions is not None else None,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            legacy_functions=req.functions is not None,
            started=time.perf_counter(),
        )

    def submit(self, chat: PreparedChat) -> Generation:
        """Admit the request into the engine now, so that overload is a 429 before any stream starts."""
        try:
            return self.engine.submit(chat.prompt.ids, chat.params)
        except EngineOverloaded as exc:
            raise APIError(
                429,
                f"The server is at capacity ({exc}). Please retry after a short wait.",
                code="server_busy",
                headers={"Retry-After": "1"},
            ) from None
        except EngineUnavailable as exc:
            self.metrics.engine_unavailable.inc()
            raise engine_unavailable(exc) from None

    def _engine_failure(self, exc: EngineError) -> APIError:
        """A 503 for a failure after admission: unreachable engine (clients retry) or an engine error."""
        if isinstance(exc, EngineUnavailable):
            self.metrics.engine_unavailable.inc()
            return engine_unavailable(exc)
        self.metrics.engine_errors.inc()
        return APIError(503, f"Generation failed: {exc}. Please retry.", type="server_error")

    async def _run(self, chat: PreparedChat, generation: Generation, outcome: _Outcome) -> AsyncIterator[StreamEvent]:
        """Generate and parse; closing this generator early cancels the sequence in the engine."""
        parser = StreamingParser(chat.prompt.tool_names, chat.max_calls)
        detok = IncrementalDetokenizer(self.engine.tokenizer, skip_special_tokens=True)
        stops = StopMatcher(chat.stops)
        finish = "stop"
        try:
            for event in parser.feed(chat.prompt.forced_prefix):
                yield event
            async for step in generation:
                if outcome.completion_tokens == 0 and step.token_ids:
                    self.metrics.ttft.observe(time.perf_counter() - chat.started)
                outcome.completion_tokens += len(step.token_ids)
                # Tokens that arrive together leave together: one parser pass, one chunk per step.
                for event in parser.feed(stops.feed("".join(detok.push(token_id) for token_id in step.token_ids))):
                    yield event
                if stops.stopped or parser.done:
                    break
                if step.finish_reason is not None:
                    finish = step.finish_reason
        finally:
            await generation.aclose()  # cancels the sequence if it is still running
        for event in parser.feed(stops.feed(detok.flush()) + stops.flush()):
            yield event
        for event in parser.finish():
            yield event
        calls = parser.result().tool_calls
        outcome.finish_reason = "tool_calls" if calls else finish
        self.metrics.prompt_tokens.inc(len(chat.prompt.ids))
        self.metrics.completion_tokens.inc(outcome.completion_tokens)
        self.metrics.tool_calls.inc(len(calls))
        if chat.prompt.tool_names and not calls and ACTION in parser.text:
            self.metrics.parse_failures.inc()

    def _usage(self, chat: PreparedChat, outcome: _Outcome) -> Usage:
        prompt_tokens = len(chat.prompt.ids)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            total_tokens=prompt_tokens + outcome.completion_tokens,
        )

    async def complete(self, chat: PreparedChat, generation: Generation) -> ChatCompletion:
        outcome = _Outcome()
        content: list[str] = []
        calls: list[ToolCallOut] = []
        try:
            events = [event async for event in self._run(chat, generation, outcome)]
        except EngineError as exc:
            raise self._engine_failure(exc) from None
        for event in events:
            if isinstance(event, ContentDelta):
                content.append(event.text)
            elif isinstance(event, ToolCallStart):
                calls.append(ToolCallOut(id=event.id, function=FunctionCallOut(name=event.name, arguments="")))
            elif isinstance(event, ToolCallArguments):
                calls[event.index].function.arguments += event.fragment
        text = "".join(content)
        message = AssistantMessage(content=text if text or not calls else None, tool_calls=calls or None)
        finish_reason = outcome.finish_reason
        if chat.legacy_functions and calls:
            message = AssistantMessage(content=message.content, function_call=calls[0].function)
            finish_reason = "function_call"
        return ChatCompletion(
            id=chat.id,
            created=chat.created,
            model=chat.model,
            choices=[Choice(message=message, finish_reason=finish_reason)],
            usage=self._usage(chat, outcome),
        )

    async def stream(self, chat: PreparedChat, generation: Generation) -> AsyncIterator[str]:
        """SSE `data:` payloads: role chunk, deltas, final chunk, optional usage chunk, [DONE]."""
        outcome = _Outcome()

        def chunk(delta: Delta, finish_reason: str | None = None) -> str:
            body = ChatCompletionChunk(
                id=chat.id,
                created=chat.created,
                model=chat.model,
                choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)],
            )
            return _dump(body)

        yield chunk(Delta(role="assistant", content=""))
        try:
            async for event in self._run(chat, generation, outcome):
                if isinstance(event, ContentDelta):
                    yield chunk(Delta(content=event.text))
                elif isinstance(event, ToolCallStart):
                    function = FunctionCallDelta(name=event.name, arguments="")
                    if chat.legacy_functions:
                        yield chunk(Delta(function_call=function))
                    else:
                        call = ToolCallDelta(index=event.index, id=event.id, type="function", function=function)
                        yield chunk(Delta(tool_calls=[call]))
                elif isinstance(event, ToolCallArguments):
                    function = FunctionCallDelta(arguments=event.fragment)
                    if chat.legacy_functions:
                        yield chunk(Delta(function_call=function))
                    else:
                        yield chunk(Delta(tool_calls=[ToolCallDelta(index=event.index, function=function)]))
        except EngineError as exc:  # headers are sent: report in-band, as OpenAI does
            yield json.dumps(self._engine_failure(exc).body())
            return
        legacy_call = chat.legacy_functions and outcome.finish_reason == "tool_calls"
        yield chunk(Delta(), "function_call" if legacy_call else outcome.finish_reason)
        if chat.include_usage:
            usage = ChatCompletionChunk(id=chat.id, created=chat.created, model=chat.model, choices=[],
                                        usage=self._usage(chat, outcome))
            yield _dump(usage)
        yield "[DONE]"


def _dump(chunk: ChatCompletionChunk) -> str:
    """A chunk as OpenAI sends it: unset delta fields omitted, `finish_reason` always present."""
    data = chunk.model_dump(exclude={"usage"} if chunk.usage is None else set())
    for choice, model in zip(data["choices"], chunk.choices):
        choice["delta"] = model.delta.model_dump(exclude_none=True)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
