"""Server-sent events: the response of every streaming endpoint, and chunks pre-serialized for it.

Streaming is the per-token hot path, and on a box where vLLM shares the cores every CPU-second
spent here is taken from generation (issue 9's benchmark). So an event costs one `send` of bytes
encoded here: Starlette's `StreamingResponse` brings the disconnect watcher (a client that leaves
cancels the body, and so its sequences), where sse-starlette also opened an anyio cancel scope and
built an event object per token. Like OpenAI and vLLM, no keep-alive comments are sent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Generic, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Send

# A `data:` payload, or (event name, data) for streams whose events are named (the Responses API).
# Payloads are single-line JSON (or `[DONE]`), so each is one `data:` line.
Event = str | tuple[str, str]
K = TypeVar("K")  # what a chunk template is kept per: a choice, or a choice and a call


def encode(event: Event) -> bytes:
    if isinstance(event, str):
        return b"data: " + event.encode() + b"\n\n"
    name, data = event
    return f"event: {name}\ndata: {data}\n\n".encode()


class EventStream(StreamingResponse):
    """`text/event-stream` of `events`; the generator is closed however the stream ends."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[Event, None]) -> None:
        # no-cache and X-Accel-Buffering keep proxies (nginx) from holding events back.
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        # aclosing: a disconnect may cancel this task while it is suspended in `send`, not in the
        # generator; closing it here still runs its cleanup (which cancels the generation).
        async with aclosing(self.events) as events:
            async for event in events:
                await send({"type": "http.response.body", "body": encode(event), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class TextChunks(Generic[K]):
    """The JSON of streamed chunks whose only varying part is one text field, built by splicing.

    `render(key, text)` serializes a whole chunk (the slow, authoritative way); for each key (a
    choice, or a choice and a call) it is called once, with a marker, and the output around the
    marker is kept. `encode_text` must be the string encoding `render` uses, so a spliced chunk is
    byte-identical to a rendered one (tested).
    """

    _MARK = "\x00\x01mark\x01\x00"

    def __init__(self, render: Callable[[K, str], str], encode_text: Callable[[str], str]) -> None:
        self._render = render
        self._encode_text = encode_text
        self._parts: dict[K, list[str] | None] = {}

    def __call__(self, key: K, text: str) -> str:
        if key not in self._parts:
            rendered = self._render(key, self._MARK)
            mark = self._encode_text(self._MARK)
            self._parts[key] = rendered.split(mark) if rendered.count(mark) == 1 else None
        parts = self._parts[key]
        if parts is None:  # the marker showed up elsewhere too (say, in a model name)
            return self._render(key, text)
        prefix, suffix = parts
        return prefix + self._encode_text(text) + suffix


def json_text(text: str) -> str:
    """A JSON string as `json.dumps(..., ensure_ascii=False)` writes it inside a chunk."""
    return json.dumps(text, ensure_ascii=False)
