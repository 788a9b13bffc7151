"""One chat completion: request -> render -> engine -> parse -> response or stream.

Streaming and non-streaming share one event generator (`events`): the non-streaming answer is
the streamed events assembled, so the two cannot disagree. The text-completions and Responses
routes are built on the same generator (`server.api.completions`, `server.api.responses`).

With `n > 1` the request becomes n sequences in the engine (admitted together or not at all;
with a `seed`, choice i samples with seed + i), each parsed for its own tool calls; their events
are interleaved as they come, tagged with the choice index.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from prompts import PromptFormat
from server.api.errors import APIError
from server.api.logprobs import TokenTexts
from server.api.metrics import Metrics
from server.api.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    FunctionCallDelta,
    FunctionCallOut,
    NeutralFields,
    REFUSED_BECAUSE,
    ToolCallDelta,
    ToolCallOut,
    Usage,
    SamplingRequest,
)
from server.api.sse import TextChunks, json_text
from server.engine.base import (
    Engine,
    EngineError,
    EngineOverloaded,
    EngineUnavailable,
    Generation,
    SamplingParams,
    TokenLogprob,
)
from server.format.detokenize import IncrementalDetokenizer
from server.format.parse import ACTION, ContentDelta, StreamEvent, StreamingParser, ToolCallArguments, ToolCallStart
from server.format.grammar import Grammar, build_grammar
from server.format.render import PromptEncoder, RenderError, RenderedPrompt, render_prompt
from server.format.stop import StopMatcher


@dataclass(frozen=True)
class PreparedChat:
    """A validated request, ready for the engine (a text completion is one with no tools)."""

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
    n: int = 1
    constrained_calls: bool = False  # a grammar holds the calls: stream them as they are generated


@dataclass(frozen=True)
class TokenLogprobs:
    """Event: the logprobs of the tokens just fed to the parser, in generation order."""

    entries: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class ChoiceDone:
    """Event: the last one of a choice."""

    finish_reason: str
    completion_tokens: int


ChoiceEvent = StreamEvent | TokenLogprobs | ChoiceDone


@dataclass
class ChoiceResult:
    """One choice assembled from its events."""

    content: list[str] = dataclasses.field(default_factory=list)
    calls: list[ToolCallOut] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str = "stop"
    completion_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.content)

    def add(self, event: ChoiceEvent) -> None:
        if isinstance(event, ContentDelta):
            self.content.append(event.text)
        elif isinstance(event, ToolCallStart):
            self.calls.append(ToolCallOut(id=event.id, function=FunctionCallOut(name=event.name, arguments="")))
        elif isinstance(event, ToolCallArguments):
            self.calls[event.index].function.arguments += event.fragment
        elif isinstance(event, TokenLogprobs):
            self.logprobs.extend(event.entries)
        else:
            self.finish_reason, self.completion_tokens = event.finish_reason, event.completion_tokens


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


def render_chat(req: ChatCompletionRequest, fmt: PromptFormat, encoder: PromptEncoder) -> RenderedPrompt:
    """The prompt a chat request becomes (also the render route and `agent-server render`)."""
    tools, tool_choice = _legacy_tools(req)
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    try:
        return render_prompt(messages, tools, tool_choice, fmt, encoder)
    except RenderError as exc:
        raise APIError(400, exc.message, param=exc.param, code="invalid_value") from None


def request_grammar(req: ChatCompletionRequest, prompt: RenderedPrompt, fmt: PromptFormat, strict_tools: bool) -> Grammar | None:
    """The grammar this request's answer must match (None: unconstrained); a schema the grammar
    library cannot enforce is a 400 naming the keyword and the tool."""
    tools, _ = _legacy_tools(req)
    try:
        return build_grammar(
            tools=tools,
            tool_choice=prompt.tool_choice,
            forced_prefix=prompt.forced_prefix,
            response_format=req.response_format.model_dump(exclude_none=True) if req.response_format else None,
            parallel_tool_calls=False if req.functions is not None else req.parallel_tool_calls,
            fmt=fmt,
            strict_tools=strict_tools,
        )
    except RenderError as exc:
        raise APIError(400, exc.message, param=exc.param, code="invalid_value") from None


def grammar_unavailable(req: ChatCompletionRequest, engine: Engine) -> APIError:
    """400 for a request that needs a grammar the engine would not enforce: refused, never answered
    unconstrained. Names the field that asked for the constraint."""
    param = "response_format" if req.response_format and req.response_format.type != "text" else (
        "tool_choice" if req.tool_choice not in (None, "auto", "none") or req.function_call not in (None, "auto", "none")
        else "tools")
    return APIError(
        400,
        f"{param} needs grammar-constrained decoding, which this server's {engine.name} engine is not configured "
        "for: start vLLM with --structured-outputs-config '{\"backend\": \"guidance\", \"disable_any_whitespace\": "
        "true}' and agent-server with --engine-grammar (or use --engine vllm, which does both).",
        param=param,
        code="unsupported_parameter",
    )


def refuse(req: NeutralFields) -> None:
    """400 naming the first field set to something this server cannot honour, and why."""
    refused = req.unsupported_fields()
    if refused:
        field = refused[0]
        raise APIError(400, f"{field} is not supported by this server: {REFUSED_BECAUSE.get(field, 'not implemented')}.",
                       param=field, code="unsupported_parameter")


def engine_unavailable(exc: Exception) -> APIError:
    """503 in OpenAI's shape: the engine is down or unreachable; clients retry."""
    return APIError(503, f"The generation engine is unavailable ({exc}). Please retry shortly.",
                    code="engine_unavailable", headers={"Retry-After": "5"})


def new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(18).replace("-", "x").replace("_", "y")


class ChatService:
    """Turns requests into completions on one engine with one prompt format."""

    def __init__(
        self, engine: Engine, fmt: PromptFormat, served_model_name: str, metrics: Metrics, *, strict_tools: bool = False
    ) -> None:
        self.engine = engine
        self.strict_tools = strict_tools  # `--strict-tools`: every tool as if it had `strict: true`
        self.metrics = metrics
        self.fmt = fmt
        self.model_name = served_model_name
        self.encoder = PromptEncoder.from_tokenizer(engine.tokenizer)
        self.token_texts = TokenTexts(engine.tokenizer)

    def check_request(self, req: SamplingRequest) -> None:
        """What every generation request must pass before rendering: refused fields, the model."""
        refuse(req)
        if req.model != self.model_name:
            raise APIError(
                404,
                f"The model `{req.model}` does not exist. This server serves `{self.model_name}`.",
                param="model",
                code="model_not_found",
            )

    def prepare(self, req: ChatCompletionRequest) -> PreparedChat:
        """Validate and render; every problem is an APIError (4xx) with a `param`."""
        self.check_request(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "Invalid value for 'top_logprobs': 'logprobs' must be true when 'top_logprobs' is set.",
                           param="top_logprobs", code="invalid_value")
        prompt = render_chat(req, self.fmt, self.encoder)
        grammar = request_grammar(req, prompt, self.fmt, self.strict_tools)
        if grammar and not self.engine.supports_grammar:
            raise grammar_unavailable(req, self.engine)
        requested = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        params = self.sampling(req, len(prompt.ids), requested, param,
                               logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        params = dataclasses.replace(params, grammar=grammar.lark if grammar else None)  # required/named always have one
        return PreparedChat(
            id=new_id("chatcmpl-"),
            created=int(time.time()),
            model=self.model_name,
            prompt=prompt,
            params=params,
            stops=[] if grammar else req.stop_sequences(),  # under a grammar, it decides where the answer ends
            max_calls=1 if req.parallel_tool_calls is False or req.functions is not None else None,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            legacy_functions=req.functions is not None,
            started=time.perf_counter(),
            n=req.n or 1,
            constrained_calls=bool(grammar and grammar.calls),
        )

    def sampling(self, req: SamplingRequest, prompt_len: int, requested: int | None, param: str,
                 *, logprobs: int | None, prompt_param: str = "messages") -> SamplingParams:
        """Context checks and the engine's sampling parameters for a request's shared fields."""
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your {prompt_param} resulted in "
                f"{prompt_len} tokens. Please reduce the length of the {prompt_param}.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if requested is not None and prompt_len + requested > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the {prompt_param}, {requested} in the completion). "
                f"Please reduce the length of the {prompt_param} or completion.",
                param=param,
                code="context_length_exceeded",
            )
        return SamplingParams(
            max_new_tokens=requested if requested is not None else limit - prompt_len,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=self._logit_bias(req.logit_bias),
            logprobs=logprobs,
        )

    def _logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        vocab = len(self.engine.tokenizer)
        out = []
        for key, value in (bias or {}).items():
            if not key.isascii() or not key.isdigit() or int(key) >= vocab:
                raise APIError(400, f"Invalid key in 'logit_bias': {key!r} is not a token id (0 to {vocab - 1}).",
                               param="logit_bias", code="invalid_value")
            out.append((int(key), float(value)))
        return tuple(out)

    def submit(self, chat: PreparedChat) -> list[Generation]:
        """Admit the request's n sequences into the engine now, all or none, so that overload is a
        429 before any stream starts. With a seed, choice i samples with seed + i."""
        engine = self.engine
        try:
            if engine.admitted + chat.n > engine.max_running + engine.max_queued:
                raise EngineOverloaded(f"{engine.running} requests running and {engine.queued} queued")
            generations = []
            for i in range(chat.n):
                params = chat.params
                if i and params.seed is not None:
                    params = dataclasses.replace(params, seed=params.seed + i)
                generations.append(engine.submit(chat.prompt.ids, params))
            return generations
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

    async def events(self, chat: PreparedChat, generations: list[Generation]) -> AsyncIterator[tuple[int, ChoiceEvent]]:
        """Every choice's events, tagged with its index; each choice ends with `ChoiceDone`.

        Closing this generator early cancels every sequence still in the engine.
        """
        if len(generations) == 1:
            async with aclosing(self._run(chat, generations[0])) as run:
                async for event in run:
                    yield 0, event
            return
        queue: asyncio.Queue[tuple[int, ChoiceEvent | Exception | None]] = asyncio.Queue()

        async def pump(index: int, generation: Generation) -> None:
            try:
                async with aclosing(self._run(chat, generation)) as run:
                    async for event in run:
                        queue.put_nowait((index, event))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # handed to the consumer, which raises it
                queue.put_nowait((index, exc))
                return
            queue.put_nowait((index, None))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for generation in generations:
                await generation.aclose()

    async def _run(self, chat: PreparedChat, generation: Generation) -> AsyncIterator[ChoiceEvent]:
        """Generate and parse one sequence; closing this generator early cancels it in the engine."""
        parser = StreamingParser(chat.prompt.tool_names, chat.max_calls, constrained=chat.constrained_calls)
        detok = IncrementalDetokenizer(self.engine.tokenizer, skip_special_tokens=True)
        stops = StopMatcher(chat.stops)
        finish = "stop"
        completion_tokens = 0
        try:
            for event in parser.feed(chat.prompt.forced_prefix):
                yield event
            async for step in generation:
                if completion_tokens == 0 and step.token_ids:
                    self.metrics.ttft.observe(time.perf_counter() - chat.started)
                completion_tokens += len(step.token_ids)
                # Tokens that arrive together leave together: one parser pass, one chunk per step.
                events = parser.feed(stops.feed("".join(detok.push(token_id) for token_id in step.token_ids)))
                if step.logprobs:  # before the text they produced: a stream attaches them to the next chunk
                    yield TokenLogprobs(tuple(step.logprobs))
                for event in events:
                    yield event
                if stops.stopped or parser.done:
                    break
                if step.finish_reason is not None:
                    finish = step.finish_reason
        finally:
            await generation.aclose()  # cancels the sequence if it is still running
            self.metrics.prompt_tokens.inc(len(chat.prompt.ids))  # counted when cancelled too
            self.metrics.completion_tokens.inc(completion_tokens)
        for event in parser.feed(stops.feed(detok.flush()) + stops.flush()):
            yield event
        for event in parser.finish():
            yield event
        calls = parser.result().tool_calls
        self.metrics.tool_calls.inc(len(calls))
        if chat.prompt.tool_names and not calls and ACTION in parser.text:
            self.metrics.parse_failures.inc()
        # A max_tokens cut inside a constrained call: its arguments are incomplete, say so.
        finish = "length" if finish == "length" and parser.cut_in_call else "tool_calls" if calls else finish
        yield ChoiceDone(finish, completion_tokens)

    @staticmethod
    def usage(chat: PreparedChat, completion_tokens: int) -> Usage:
        """OpenAI counts the prompt once however many choices there are."""
        prompt_tokens = len(chat.prompt.ids)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

    def _logprobs(self, chat: PreparedChat, entries: list[TokenLogprob]) -> ChoiceLogprobs | None:
        if chat.params.logprobs is None:
            return None
        return ChoiceLogprobs(content=self.token_texts.chat(entries))

    async def collect(self, chat: PreparedChat, generations: list[Generation]) -> list[ChoiceResult]:
        """Every choice assembled from its events (the non-streaming answers)."""
        results = [ChoiceResult() for _ in generations]
        try:
            async with aclosing(self.events(chat, generations)) as events:
                async for index, event in events:
                    results[index].add(event)
        except EngineError as exc:
            raise self._engine_failure(exc) from None
        return results

    async def complete(self, chat: PreparedChat, generations: list[Generation]) -> ChatCompletion:
        results = await self.collect(chat, generations)
        choices = []
        for index, result in enumerate(results):
            text = result.text
            message = AssistantMessage(content=text if text or not result.calls else None, tool_calls=result.calls or None)
            finish_reason = result.finish_reason
            if chat.legacy_functions and result.calls:
                message = AssistantMessage(content=message.content, function_call=result.calls[0].function)
                finish_reason = "function_call"
            choices.append(Choice(index=index, message=message, finish_reason=finish_reason,
                                  logprobs=self._logprobs(chat, result.logprobs)))
        return ChatCompletion(
            id=chat.id,
            created=chat.created,
            model=chat.model,
            choices=choices,
            usage=self.usage(chat, sum(r.completion_tokens for r in results)),
        )

    async def stream(self, chat: PreparedChat, generations: list[Generation]) -> AsyncGenerator[str, None]:
        """SSE `data:` payloads: role chunk per choice, deltas, final chunk per choice, optional
        usage chunk, [DONE]. Logprobs ride on the next chunk of their choice."""
        pending: list[list[TokenLogprob]] = [[] for _ in generations]
        want_logprobs = chat.params.logprobs is not None

        def chunk(index: int, delta: Delta, finish_reason: str | None = None) -> str:
            logprobs = None
            if want_logprobs and (pending[index] or finish_reason is not None):
                logprobs = ChoiceLogprobs(content=self.token_texts.chat(pending[index]))
                pending[index] = []
            body = ChatCompletionChunk(
                id=chat.id,
                created=chat.created,
                model=chat.model,
                choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)],
            )
            return _dump(body)

        def text_delta(call: int | None, text: str) -> Delta:
            """Content (`call` None) or a call's arguments: the per-token deltas."""
            if call is None:
                return Delta(content=text)
            function = FunctionCallDelta(arguments=text)
            if chat.legacy_functions:
                return Delta(function_call=function)
            return Delta(tool_calls=[ToolCallDelta(index=call, function=function)])

        spliced = TextChunks(lambda key, t: chunk(key[0], text_delta(key[1], t)), json_text)

        def text_chunk(index: int, call: int | None, text: str) -> str:
            """Spliced into the template of its choice and call, unless logprobs ride on it."""
            if pending[index]:
                return chunk(index, text_delta(call, text))
            return spliced((index, call), text)

        for index in range(len(generations)):
            yield chunk(index, Delta(role="assistant", content=""))
        completion_tokens = 0
        try:
            async with aclosing(self.events(chat, generations)) as events:
                async for index, event in events:
                    if isinstance(event, TokenLogprobs):
                        pending[index].extend(event.entries)
                    elif isinstance(event, ContentDelta):
                        yield text_chunk(index, None, event.text)
                    elif isinstance(event, ToolCallStart):
                        function = FunctionCallDelta(name=event.name, arguments="")
                        if chat.legacy_functions:
                            yield chunk(index, Delta(function_call=function))
                        else:
                            call = ToolCallDelta(index=event.index, id=event.id, type="function", function=function)
                            yield chunk(index, Delta(tool_calls=[call]))
                    elif isinstance(event, ToolCallArguments):
                        yield text_chunk(index, event.index, event.fragment)
                    elif isinstance(event, ChoiceDone):
                        completion_tokens += event.completion_tokens
                        legacy_call = chat.legacy_functions and event.finish_reason == "tool_calls"
                        yield chunk(index, Delta(), "function_call" if legacy_call else event.finish_reason)
        except EngineError as exc:  # headers are sent: report in-band, as OpenAI does
            yield json.dumps(self._engine_failure(exc).body())
            return
        if chat.include_usage:
            usage = ChatCompletionChunk(id=chat.id, created=chat.created, model=chat.model, choices=[],
                                        usage=self.usage(chat, completion_tokens))
            yield _dump(usage)
        yield "[DONE]"


def _dump(chunk: ChatCompletionChunk) -> str:
    """A chunk as OpenAI sends it: unset delta fields omitted, `finish_reason` always present."""
    data = chunk.model_dump(exclude={"usage"} if chunk.usage is None else set())
    for choice, model in zip(data["choices"], chunk.choices):
        choice["delta"] = model.delta.model_dump(exclude_none=True)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
