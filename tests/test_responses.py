"""/v1/responses: the translation to chat (golden prompts byte for byte, no model), the store, and
the real openai SDK against the trained demo model (streaming and not, tools, follow-ups)."""

from __future__ import annotations

import json

import openai
import pytest

from prompts import load_format
from server.api.chat import render_chat
from server.api.errors import APIError
from server.api.responses import ResponseStore, to_chat
from server.api.responses_protocol import Response, ResponseRequest
from server.demo import WEATHER_TOOLS
from server.format.render import PromptEncoder
from tests.test_render import GOLDEN

MODEL = "Qwen1.5-4B-agent"
PARIS = "What's the weather in Paris?"
TOOLS = [{"type": "function", **tool["function"]} for tool in WEATHER_TOOLS]  # the Responses shape


# --- translation: the prompt is the chat prompt ----------------------------------------------------


def _parts(content, kind):
    if isinstance(content, str):
        return content
    return [{"type": kind, "text": part["text"]} for part in content]


def as_responses(case: dict, instructions: bool) -> dict:
    """A golden chat request written as a Responses request (what a Responses client would send)."""
    messages = list(case["messages"])
    body: dict = {"model": MODEL, "input": []}
    if instructions and messages and messages[0]["role"] in ("system", "developer"):
        body["instructions"] = messages.pop(0)["content"]
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "assistant":
            if message.get("content"):
                body["input"].append({"type": "message", "role": "assistant",
                                      "content": [{"type": "output_text", "text": message["content"]}]})
            for call in message.get("tool_calls") or []:
                body["input"].append({"type": "function_call", "call_id": call["id"], "name": call["function"]["name"],
                                      "arguments": call["function"]["arguments"]})
        elif role == "tool":
            body["input"].append({"type": "function_call_output", "call_id": message.get("tool_call_id", f"call_{i}"),
                                  "output": message["content"]})
        elif role == "function":  # the seed's legacy call message
            legacy = json.loads(message["content"])
            body["input"].append({"type": "function_call", "call_id": f"call_{i}", "name": legacy["name"],
                                  "arguments": json.dumps(legacy["argument"], ensure_ascii=False)})
        else:
            body["input"].append({"role": role, "content": _parts(message["content"], "input_text")})
    if case.get("tools"):
        body["tools"] = [{"type": "function", **tool["function"]} for tool in case["tools"]]
    return body


@pytest.fixture(scope="module")
def encoder(qwen_tokenizer) -> PromptEncoder:
    return PromptEncoder.from_tokenizer(qwen_tokenizer)


@pytest.mark.parametrize("instructions", [False, True], ids=["system-item", "instructions"])
@pytest.mark.parametrize("case", GOLDEN, ids=[c["name"] for c in GOLDEN])
def test_responses_prompt_is_the_golden_chat_prompt(case, instructions, encoder, qwen_tokenizer):
    request = ResponseRequest.model_validate(as_responses(case, instructions))
    chat, _ = to_chat(request, history=[])
    prompt = render_chat(chat, load_format(), encoder)
    assert prompt.text == case["prompt"]
    assert prompt.ids == qwen_tokenizer.encode(case["prompt"], add_special_tokens=False)


def test_consecutive_calls_are_one_assistant_turn_and_history_comes_first():
    request = ResponseRequest.model_validate({
        "model": MODEL,
        "input": [{"type": "function_call_output", "call_id": "b", "output": "2"}],
        "tools": TOOLS,
        "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False,
        "max_output_tokens": 7,
    })
    history = [
        {"role": "user", "content": "q"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me see."}]},
        {"type": "function_call", "call_id": "a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "b", "name": "get_weather", "arguments": '{"city": "Tokyo"}'},
        {"type": "function_call_output", "call_id": "a", "output": "1"},
    ]
    chat, _ = to_chat(request, history)
    messages = [m.model_dump(exclude_none=True) for m in chat.messages]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["a", "b"] and messages[1]["content"][0]["text"] == "Let me see."
    assert chat.tools[0].function.name == "get_weather"
    assert chat.tool_choice.function.name == "get_weather"
    assert (chat.parallel_tool_calls, chat.max_completion_tokens) == (False, 7)


@pytest.mark.parametrize("fmt,expected", [
    ({"type": "json_object"}, {"type": "json_object"}),
    ({"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True},
     {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True}}),
])
def test_text_format_becomes_the_chat_response_format(fmt, expected):
    request = ResponseRequest.model_validate({"model": MODEL, "input": "hi", "text": {"format": fmt}})
    chat, _ = to_chat(request, [])
    assert chat.response_format.model_dump(exclude_none=True) == expected


# --- the store ------------------------------------------------------------------------------------


def _response(rid: str) -> Response:
    return Response(id=rid, created_at=0, status="completed", model=MODEL)


def test_store_is_bounded_oldest_first():
    store = ResponseStore(max_size=2, ttl_seconds=3600)
    for rid in ("a", "b", "c"):
        store.put(_response(rid), [])
    assert len(store) == 2
    with pytest.raises(APIError) as info:
        store.get("a", param="previous_response_id")
    assert (info.value.status, info.value.code, info.value.param) == (404, "previous_response_not_found", "previous_response_id")
    assert store.get("c").response.id == "c"
    store.delete("c")
    with pytest.raises(APIError):
        store.delete("c")


def test_store_entries_expire():
    store = ResponseStore(max_size=10, ttl_seconds=0)  # expired as soon as stored
    store.put(_response("a"), [])
    with pytest.raises(APIError):
        store.get("a")
    assert len(store) == 0
    nothing = ResponseStore(max_size=0, ttl_seconds=3600)
    nothing.put(_response("a"), [])
    assert len(nothing) == 0


# --- the openai SDK on the demo model ----------------------------------------------------------------


def create(client, **kwargs):
    return client.responses.create(model=MODEL, temperature=0, **kwargs)


def test_function_call_then_function_call_output(client):
    first = create(client, input=PARIS, tools=TOOLS)
    assert first.id.startswith("resp_") and first.object == "response" and first.status == "completed"
    (call,) = first.output
    assert call.type == "function_call" and call.status == "completed"
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens
    # The follow-up as the client replays it: its input, the call, the output.
    replay = [{"role": "user", "content": PARIS}, call.model_dump(exclude_none=True),
              {"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"}]
    answer = create(client, input=replay, tools=TOOLS, store=False)
    assert answer.output_text == "It is 18C and sunny in Paris."
    (message,) = answer.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    # The same follow-up through previous_response_id: only the new item is sent.
    chained = create(client, previous_response_id=first.id, tools=TOOLS,
                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"}])
    assert chained.output_text == answer.output_text and chained.previous_response_id == first.id
    assert chained.usage.input_tokens == answer.usage.input_tokens


def test_streaming_emits_the_full_event_sequence(client):
    def events_of(**kwargs):
        with client.responses.stream(model=MODEL, temperature=0, **kwargs) as stream:
            events = list(stream)
            return events, stream.get_final_response()

    events, final = events_of(input=PARIS, tools=TOOLS)
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == final.output[0].arguments == events[-1].response.output[0].arguments
    assert events[0].response.status == "in_progress" and final.status == "completed"

    events, final = events_of(input=[{"role": "user", "content": PARIS},
                                     {"type": "function_call", "call_id": "c1", "name": "get_weather",
                                      "arguments": '{"city": "Paris"}'},
                                     {"type": "function_call_output", "call_id": "c1", "output": "18C, sunny"}],
                              tools=TOOLS)
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-5:] == ["response.output_text.delta", "response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == "It is 18C and sunny in Paris."
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_length_cut_is_incomplete(client):
    response = create(client, input="Hi", max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert "Hello! How can I help you today?".startswith(response.output_text) and response.usage.output_tokens == 3
    with client.responses.stream(model=MODEL, input="Hi", max_output_tokens=3, temperature=0) as stream:
        kinds = [event.type for event in stream]
    assert kinds[-1] == "response.incomplete"


def test_tool_choice_and_parallel_tool_calls(client):
    compare = "Compare the weather in Paris and Tokyo."
    both = create(client, input=compare, tools=TOOLS)
    assert [json.loads(c.arguments)["city"] for c in both.output] == ["Paris", "Tokyo"]
    one = create(client, input=compare, tools=TOOLS, parallel_tool_calls=False)
    assert [json.loads(c.arguments)["city"] for c in one.output] == ["Paris"]
    named = create(client, input=PARIS, tools=TOOLS, tool_choice={"type": "function", "name": "get_weather"})
    assert named.output[0].type == "function_call" and named.tool_choice.name == "get_weather"
    required = create(client, input=PARIS, tools=TOOLS, tool_choice="required")
    assert required.output[0].type == "function_call"
    none = create(client, input=PARIS, tools=TOOLS, tool_choice="none")
    assert all(item.type == "message" for item in none.output)


def test_stored_responses_can_be_read_back_and_deleted(client):
    response = create(client, input="Hi", instructions="You are a helpful assistant.")
    assert response.output_text == "Hello! How can I help you today?"  # the default system prompt, as instructions
    again = client.responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump()
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.retrieve(response.id)
    assert info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as info:
        create(client, input="Hi", previous_response_id=response.id)
    assert info.value.body["param"] == "previous_response_id"
    unstored = create(client, input="Hi", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_text_format_is_held_to_its_schema(client):
    """`text.format` is the chat `response_format`: the output is JSON of the schema (a grammar holds it)."""
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]}}, "required": ["city"],
              "additionalProperties": False}
    response = create(client, input="Hi", text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
                      max_output_tokens=40)
    assert response.status == "completed" and response.text.format.type == "json_schema"
    assert json.loads(response.output_text)["city"] in ("Paris", "Tokyo")


def test_logprobs_on_output_text_streamed_and_not(client):
    include = ["message.output_text.logprobs"]
    response = create(client, input="Hi", include=include, top_logprobs=2)
    part = response.output[0].content[0]
    assert "".join(t.token for t in part.logprobs) == part.text == "Hello! How can I help you today?"
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in part.logprobs)
    with client.responses.stream(model=MODEL, input="Hi", include=include, top_logprobs=2, temperature=0) as stream:
        events = list(stream)
    streamed = [t for e in events if e.type == "response.output_text.delta" for t in e.logprobs]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, pytest.approx(t.logprob, abs=1e-5)) for t in part.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [t.token for t in done.logprobs] == [t.token for t in part.logprobs]
    assert create(client, input="Hi").output[0].content[0].logprobs == []  # only when asked for
    # With a tool call, the call's own tokens carry no output_text logprobs.
    call = create(client, input=PARIS, tools=TOOLS, include=include)
    assert [item.type for item in call.output] == ["function_call"]
