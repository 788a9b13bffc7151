"""POST /v1/responses (and GET/DELETE by id), built on the chat layer.

A Responses request is translated into its chat equivalent (`to_chat`: instructions -> a system
message, input items -> messages, Responses tools -> chat tools, `text.format` -> the chat
`response_format`) and prepared by `ChatService.prepare`, so its prompt is byte for byte the chat
prompt and every chat check applies. The chat event stream (`ChatService.events`) becomes output
items and Responses stream events (`_OutputBuilder`); the non-streaming answer is the same events
assembled, so the two cannot disagree.

Storage: OpenAI stores responses by default (`store` true). This server keeps them in memory
(`ResponseStore`): at most `--responses-store-size` of them, each for `--responses-ttl` seconds,
oldest dropped first, lost on restart. A stored response can be read back (GET), deleted (DELETE)
and continued with `previous_response_id` (its input items and output are prepended to the new
input; its instructions and tools are not carried over, as in OpenAI's API). An id the server
does not have (never stored, expired, evicted, deleted) is a 404 in OpenAI's shape.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from server.api.chat import ChatService, ChoiceDone, ChoiceEvent, PreparedChat, TokenLogprobs, new_id, refuse
from server.api.logprobs import TokenTexts
from server.api.errors import APIError, validation_error
from server.api.protocol import ChatCompletionRequest
from server.api.responses_protocol import (
    ContentPartIn,
    FunctionCallItem,
    IncompleteDetails,
    InputItem,
    MessageItem,
    OutputItem,
    OutputText,
    Response,
    ResponseError,
    ResponseRequest,
    ResponseUsage,
)
from server.engine.base import EngineError, Generation, TokenLogprob
from server.format.parse import ContentDelta, ToolCallArguments, ToolCallStart
from server.format.render import RenderError, check_unicode

_MESSAGE_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


# ---------------------------------------------------------------------------------------------
# Store


@dataclass
class StoredResponse:
    response: Response
    items: list[dict[str, Any]]  # the conversation so far as input items: input (with history) + output
    expires: float


class ResponseStore:
    """Bounded, expiring, in-memory store of responses (see the module docstring)."""

    def __init__(self, max_size: int, ttl_seconds: float) -> None:
        self.max_size = max_size
        self.ttl = ttl_seconds
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response: Response, items: list[dict[str, Any]]) -> None:
        self._expire()
        if self.max_size <= 0:
            return
        self._entries[response.id] = StoredResponse(response, items, time.monotonic() + self.ttl)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        self._expire()
        entry = self._entries.get(response_id)
        if entry is None:
            raise APIError(404, f"Response with id '{response_id}' not found.", param=param,
                           code="previous_response_not_found" if param else None)
        return entry

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self._entries[response_id]

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.expires > now:
                break
            self._entries.popitem(last=False)


# ---------------------------------------------------------------------------------------------
# Request translation (pure)


def _text(parts: str | list[ContentPartIn] | None, param: str) -> str | list[dict[str, str]]:
    """Responses content as chat content: a string stays a string, text parts become chat text parts."""
    if parts is None:
        raise APIError(400, "content is required", param=param, code="missing_required_parameter")
    if isinstance(parts, str):
        return parts
    out = []
    for j, part in enumerate(parts):
        if part.type not in _TEXT_PARTS:
            raise APIError(400, f"content parts of type {part.type!r} are not supported: this model reads text only",
                           param=f"{param}[{j}].type", code="invalid_value")
        text = part.text if part.type != "refusal" else (part.model_extra or {}).get("refusal")
        if not isinstance(text, str):
            raise APIError(400, f"a {part.type} part needs a string text", param=f"{param}[{j}].text",
                           code="invalid_value")
        out.append({"type": "text", "text": text})
    return out


def _required(value: str | None, param: str) -> str:
    if value is None:
        raise APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    return value


@dataclass
class Origin:
    """Where a chat message came from: the item (or `instructions`), and the item of each tool call."""

    param: str
    calls: list[str] = field(default_factory=list)
    content_key: str | None = "content"  # `output` for a function_call_output, None for instructions


def to_messages(instructions: str | None, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Origin]]:
    """Chat messages for instructions + input items, and where each message came from.

    Consecutive `function_call` items become one assistant turn (joined to an assistant message
    right before them), consecutive outputs consecutive tool messages, which the renderer merges
    into one turn exactly as for a chat request.
    """
    messages: list[dict[str, Any]] = []
    origins: list[Origin] = []
    if instructions is not None:
        messages.append({"role": "system", "content": instructions})
        origins.append(Origin("instructions", content_key=None))
    for i, raw in enumerate(items):
        param = f"input[{i}]"
        item = InputItem.model_validate(raw)
        kind = item.type or "message"
        if kind == "message":
            if item.role not in _MESSAGE_ROLES:
                raise APIError(400, f"Invalid value for 'role': {item.role!r}; expected one of {', '.join(_MESSAGE_ROLES)}.",
                               param=f"{param}.role", code="invalid_value")
            messages.append({"role": item.role, "content": _text(item.content, f"{param}.content")})
            origins.append(Origin(param))
        elif kind == "function_call":
            call = {
                "id": _required(item.call_id, f"{param}.call_id"),
                "type": "function",
                "function": {"name": _required(item.name, f"{param}.name"),
                             "arguments": _required(item.arguments, f"{param}.arguments")},
            }
            previous = messages[-1] if messages else None
            if previous is not None and previous["role"] == "assistant" and origins[-1].param != "instructions":
                previous.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                origins.append(Origin(param))
            origins[-1].calls.append(param)
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _required(item.call_id, f"{param}.call_id"),
                             "content": _text(item.output, f"{param}.output")})
            origins.append(Origin(param, content_key="output"))
        else:
            raise APIError(400, f"Input items of type {kind!r} are not supported: use message, function_call and "
                           "function_call_output items.", param=f"{param}.type", code="invalid_value")
    return messages, origins


_MESSAGE_PARAM = re.compile(r"^messages\[(\d+)\](?:\.tool_calls\[(\d+)\](?:\.function)?|\.(content))?(.*)$")


def _chat_param(param: str | None, origins: list[Origin]) -> str | None:
    """A chat-layer `param` (messages[3].content, tools[0].function.name) in the request's terms."""
    if not param:
        return param
    match = _MESSAGE_PARAM.match(param)
    if match:
        index, call, content, rest = match.groups()
        if int(index) >= len(origins):
            return "input"
        origin = origins[int(index)]
        if call is not None and int(call) < len(origin.calls):
            return origin.calls[int(call)] + rest
        if content is not None:
            return f"{origin.param}.{origin.content_key}{rest}" if origin.content_key else origin.param + rest
        return origin.param + rest
    if param == "messages":
        return "input"
    if param == "max_completion_tokens":
        return "max_output_tokens"
    if param == "response_format":
        return "text.format"
    return param.replace(".function.", ".").replace(".function", "")


def _tools(req: ResponseRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    tools = None
    if req.tools is not None:
        tools = []
        for i, tool in enumerate(req.tools):
            if tool.type != "function":
                raise APIError(400, f"Tools of type {tool.type!r} are not supported: this server runs function tools "
                               "only (hosted tools need OpenAI's servers).", param=f"tools[{i}].type",
                               code="unsupported_parameter")
            function = {"name": _required(tool.name, f"tools[{i}].name")}
            for key in ("description", "parameters", "strict"):
                if getattr(tool, key) is not None:
                    function[key] = getattr(tool, key)
            tools.append({"type": "function", "function": function})
    choice: Any = req.tool_choice
    if choice is not None and not isinstance(choice, str):
        if choice.type != "function":
            raise APIError(400, f"tool_choice of type {choice.type!r} is not supported: use none, auto, required or "
                           "a function.", param="tool_choice.type", code="unsupported_parameter")
        choice = {"type": "function", "function": {"name": _required(choice.name, "tool_choice.name")}}
    return tools, choice


def _response_format(req: ResponseRequest) -> dict[str, Any] | None:
    """`text.format` as the chat layer's `response_format` (its grammar path decides what it supports)."""
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    schema = {k: v for k, v in {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict,
                                "description": fmt.description}.items() if v is not None}
    return {"type": "json_schema", "json_schema": schema}


def to_chat(req: ResponseRequest, history: list[dict[str, Any]]) -> tuple[ChatCompletionRequest, list[Origin]]:
    """The chat request equivalent to `req` continued from `history` (input items), and the origins
    of its messages (for error params)."""
    items = history + current_items(req)
    messages, origins = to_messages(req.instructions, items)
    tools, tool_choice = _tools(req)
    body: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "tools": tools,
        "tool_choice": tool_choice,
        "parallel_tool_calls": req.parallel_tool_calls,
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "response_format": _response_format(req),
        "logprobs": True if req.wants_logprobs else None,
        "top_logprobs": req.top_logprobs if req.wants_logprobs else None,
    }
    try:
        chat = ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        error = validation_error(RequestValidationError(exc.errors()))
        error.param = _chat_param(error.param, origins)
        raise error from None
    return chat, origins


def current_items(req: ResponseRequest) -> list[dict[str, Any]]:
    """This request's input as a list of input items (a string is one user message)."""
    if isinstance(req.input, str):
        return [{"type": "message", "role": "user", "content": req.input}]
    return [item.model_dump(exclude_none=True, by_alias=True) for item in req.input]


# ---------------------------------------------------------------------------------------------
# Output


class _OutputBuilder:
    """Chat events -> output items and the Responses stream events that build them.

    `feed`/`finish` return the events to send; `response` is complete after `finish`.
    """

    def __init__(self, response: Response, token_texts: TokenTexts | None = None) -> None:
        self.response = response
        self.sequence = 0
        self._texts = token_texts  # set when logprobs are wanted
        self._pending: list[TokenLogprob] = []  # logprobs not yet attached to a text delta
        self._message: MessageItem | None = None  # the open message item
        self._call: FunctionCallItem | None = None  # the open function_call item

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return payload

    def start(self) -> list[dict[str, Any]]:
        snapshot = self.response.model_dump(mode="json")
        return [self.event("response.created", response=snapshot), self.event("response.in_progress", response=snapshot)]

    def _add(self, item: OutputItem) -> dict[str, Any]:
        self.response.output.append(item)
        return self.event("response.output_item.added", output_index=len(self.response.output) - 1,
                          item=item.model_dump(mode="json"))

    def _open_message(self) -> list[dict[str, Any]]:
        events = self._close()
        self._message = MessageItem(id=new_id("msg_"), status="in_progress", content=[])
        events.append(self._add(self._message))
        self._message.content.append(OutputText(text=""))
        events.append(self.event("response.content_part.added", item_id=self._message.id,
                                 output_index=len(self.response.output) - 1, content_index=0,
                                 part=OutputText(text="").model_dump(mode="json")))
        return events

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        events = []
        index = len(self.response.output) - 1
        if self._message is not None:
            item, self._message = self._message, None
            part = item.content[0]
            part.logprobs += self._take_logprobs()
            events.append(self.event("response.output_text.done", item_id=item.id, output_index=index, content_index=0,
                                     text=part.text, logprobs=part.logprobs))
            events.append(self.event("response.content_part.done", item_id=item.id, output_index=index,
                                     content_index=0, part=part.model_dump(mode="json")))
            item.status = status  # type: ignore[assignment]
            events.append(self.event("response.output_item.done", output_index=index, item=item.model_dump(mode="json")))
        if self._call is not None:
            call, self._call = self._call, None
            events.append(self.event("response.function_call_arguments.done", item_id=call.id, output_index=index,
                                     name=call.name, arguments=call.arguments))
            call.status = status  # type: ignore[assignment]
            events.append(self.event("response.output_item.done", output_index=index, item=call.model_dump(mode="json")))
        return events

    def feed(self, event: ChoiceEvent) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if isinstance(event, ContentDelta):
            if self._message is None:
                events += self._open_message()
            assert self._message is not None
            part = self._message.content[0]
            logprobs = self._take_logprobs()
            part.text += event.text
            part.logprobs += logprobs
            events.append(self.event("response.output_text.delta", item_id=self._message.id,
                                     output_index=len(self.response.output) - 1, content_index=0,
                                     delta=event.text, logprobs=logprobs))
        elif isinstance(event, TokenLogprobs):
            if self._texts is not None:
                self._pending += event.entries
        elif isinstance(event, ToolCallStart):
            events += self._close()
            self._pending.clear()  # the tokens the call was parsed from: logprobs are for output_text only
            self._call = FunctionCallItem(id=new_id("fc_"), call_id=event.id, name=event.name, arguments="",
                                          status="in_progress")
            events.append(self._add(self._call))
        elif isinstance(event, ToolCallArguments) and self._call is not None:
            self._call.arguments += event.fragment
            events.append(self.event("response.function_call_arguments.delta", item_id=self._call.id,
                                     output_index=len(self.response.output) - 1, delta=event.fragment))
        return events

    def finish(self, done: ChoiceDone, input_tokens: int) -> list[dict[str, Any]]:
        incomplete = done.finish_reason == "length"
        events = []
        if not self.response.output and self._message is None:
            events += self._open_message()  # an empty answer is still one (empty) message
        events += self._close("incomplete" if incomplete else "completed")
        response = self.response
        response.status = "incomplete" if incomplete else "completed"
        if incomplete:
            response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        response.usage = ResponseUsage(input_tokens=input_tokens, output_tokens=done.completion_tokens,
                                       total_tokens=input_tokens + done.completion_tokens)
        kind = "response.incomplete" if incomplete else "response.completed"
        events.append(self.event(kind, response=response.model_dump(mode="json")))
        return events

    def _take_logprobs(self) -> list[dict[str, Any]]:
        """The pending logprobs in OpenAI's shape (the chat one), handed to the text being emitted."""
        if self._texts is None or not self._pending:
            return []
        taken, self._pending = self._pending, []
        return [entry.model_dump(mode="json") for entry in self._texts.chat(taken)]

    def fail(self, message: str) -> dict[str, Any]:
        self.response.status = "failed"
        self.response.error = ResponseError(code="server_error", message=message)
        return self.event("response.failed", response=self.response.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------------
# Service


@dataclass
class PreparedResponse:
    chat: PreparedChat
    request: ResponseRequest
    items: list[dict[str, Any]] = field(default_factory=list)  # history + this input, for the store


class ResponseService:
    """Responses on the chat service, with the store."""

    def __init__(self, chat: ChatService, store: ResponseStore) -> None:
        self.chat = chat
        self.store = store

    def prepare(self, req: ResponseRequest) -> PreparedResponse:
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            history = list(self.store.get(req.previous_response_id, param="previous_response_id").items)
        refuse(req)
        for name, value in req.model_dump(exclude_none=True, by_alias=True).items():
            try:  # the response echoes request fields: they must be encodable text
                check_unicode(value, name)
            except RenderError as exc:
                raise APIError(400, exc.message, param=exc.param, code="invalid_value") from None
        chat_req, origins = to_chat(req, history)
        try:
            prepared = self.chat.prepare(chat_req)
        except APIError as exc:
            param = _chat_param(exc.param, origins)
            if exc.param and param != exc.param and exc.message.startswith(exc.param):
                exc.message = param + exc.message[len(exc.param):]
            exc.param = param
            raise
        prepared = dataclasses.replace(prepared, id=new_id("resp_"))
        return PreparedResponse(prepared, req, history + current_items(req))

    def submit(self, prepared: PreparedResponse) -> list[Generation]:
        return self.chat.submit(prepared.chat)

    def _response(self, prepared: PreparedResponse) -> Response:
        req = prepared.request
        tool_choice: Any = req.tool_choice or "auto"
        if not isinstance(tool_choice, str):
            tool_choice = tool_choice.model_dump(exclude_none=True)
        text = {"format": {"type": "text"}}
        if req.text and req.text.format:
            text = req.text.model_dump(mode="json", exclude_none=True, by_alias=True)
        return Response(
            id=prepared.chat.id,
            created_at=prepared.chat.created,
            status="in_progress",
            instructions=req.instructions,
            max_output_tokens=req.max_output_tokens,
            model=prepared.chat.model,
            parallel_tool_calls=req.parallel_tool_calls is not False,
            previous_response_id=req.previous_response_id,
            store=req.store is not False,
            temperature=1.0 if req.temperature is None else req.temperature,
            text=text,
            tool_choice=tool_choice,
            tools=[t.model_dump(mode="json", exclude_none=True) for t in req.tools or []],
            top_p=1.0 if req.top_p is None else req.top_p,
            top_logprobs=req.top_logprobs,
            truncation=req.truncation or "disabled",
            user=req.user,
            metadata=req.metadata or {},
        )

    def _builder(self, prepared: PreparedResponse) -> _OutputBuilder:
        texts = self.chat.token_texts if prepared.request.wants_logprobs else None
        return _OutputBuilder(self._response(prepared), texts)

    def _remember(self, prepared: PreparedResponse, response: Response) -> None:
        if prepared.request.store is not False:
            output = [item.model_dump(mode="json") for item in response.output]
            self.store.put(response, prepared.items + output)

    async def _events(self, prepared: PreparedResponse, generations: list[Generation], builder: _OutputBuilder) -> AsyncIterator[dict[str, Any]]:
        for event in builder.start():
            yield event
        async with aclosing(self.chat.events(prepared.chat, generations)) as events:
            async for _, event in events:
                if isinstance(event, ChoiceDone):
                    batch = builder.finish(event, len(prepared.chat.prompt.ids))
                else:
                    batch = builder.feed(event)
                for item in batch:
                    yield item
        self._remember(prepared, builder.response)

    async def complete(self, prepared: PreparedResponse, generations: list[Generation]) -> Response:
        builder = self._builder(prepared)
        try:
            async with aclosing(self._events(prepared, generations, builder)) as events:
                async for _ in events:
                    pass
        except EngineError as exc:
            raise APIError(503, f"Generation failed: {exc}. Please retry.", type="server_error") from None
        return builder.response

    async def stream(self, prepared: PreparedResponse, generations: list[Generation]) -> AsyncGenerator[tuple[str, str], None]:
        """SSE events named like their `type` (as OpenAI sends them), each with a `sequence_number`."""
        builder = self._builder(prepared)
        try:
            async with aclosing(self._events(prepared, generations, builder)) as events:
                async for event in events:
                    yield event["type"], json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        except EngineError as exc:  # headers are sent: report in-band, as OpenAI does
            event = builder.fail(f"Generation failed: {exc}.")
            yield event["type"], json.dumps(event, ensure_ascii=False, separators=(",", ":"))
