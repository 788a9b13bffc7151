"""The streaming wire format without a model: SSE framing and spliced chunks.

Spliced chunks (`TextChunks`) must be byte-identical to chunks serialized the slow way, for any
text a model can produce: clients parse them, and the stream == non-stream tests compare them.
"""

from __future__ import annotations

import json

import pydantic_core
from hypothesis import given, settings, strategies as st

from server.api.chat import _dump
from server.api.protocol import (
    ChatCompletionChunk,
    ChunkChoice,
    Completion,
    CompletionChoice,
    Delta,
    FunctionCallDelta,
    ToolCallDelta,
)
from server.api.sse import TextChunks, encode, json_text

TEXTS = st.text() | st.sampled_from(['"', "\\", "\n\t\r\b\f", "\x00\x1f\x7f", "巴黎", "😀", "\u2028\u2029", "</script>"])


def chat_chunk(model: str, index: int, delta: Delta) -> str:
    return _dump(ChatCompletionChunk(id="chatcmpl-1", created=1, model=model,
                                     choices=[ChunkChoice(index=index, delta=delta)]))


def completion_chunk(model: str, index: int, text: str) -> str:
    body = Completion(id="cmpl-1", created=1, model=model, choices=[CompletionChoice(index=index, text=text, finish_reason=None)])
    return body.model_dump_json(exclude={"usage"})


def completion_text(text: str) -> str:
    return pydantic_core.to_json(text).decode()


@settings(max_examples=300)
@given(text=TEXTS, model=st.text(min_size=1, max_size=20), index=st.integers(0, 3))
def test_spliced_content_chunk_equals_the_serialized_one(text: str, model: str, index: int) -> None:
    spliced = TextChunks(lambda i, t: chat_chunk(model, i, Delta(content=t)), json_text)
    assert spliced(index, text) == chat_chunk(model, index, Delta(content=text))


@settings(max_examples=300)
@given(text=TEXTS, call=st.integers(0, 3))
def test_spliced_arguments_chunk_equals_the_serialized_one(text: str, call: int) -> None:
    def render(key: int, t: str) -> str:
        return chat_chunk("m", 0, Delta(tool_calls=[ToolCallDelta(index=key, function=FunctionCallDelta(arguments=t))]))

    assert TextChunks(render, json_text)(call, text) == render(call, text)


@settings(max_examples=300)
@given(text=TEXTS, model=st.text(min_size=1, max_size=20))
def test_spliced_completion_chunk_equals_the_serialized_one(text: str, model: str) -> None:
    spliced = TextChunks(lambda i, t: completion_chunk(model, i, t), completion_text)
    assert spliced(0, text) == completion_chunk(model, 0, text)


def test_a_model_name_holding_the_marker_falls_back_to_serializing() -> None:
    model = TextChunks._MARK
    spliced = TextChunks(lambda i, t: chat_chunk(model, i, Delta(content=t)), json_text)
    assert spliced(0, "hi") == chat_chunk(model, 0, Delta(content="hi"))
    assert spliced._parts[0] is None
    assert json.loads(spliced(0, "hi"))["model"] == model


def test_event_framing() -> None:
    assert encode('{"a":1}') == b'data: {"a":1}\n\n'
    assert encode("[DONE]") == b"data: [DONE]\n\n"
    assert encode(("response.created", '{"x":"巴黎"}')) == 'event: response.created\ndata: {"x":"巴黎"}\n\n'.encode()
