"""Bad requests over real HTTP: each is a 4xx in OpenAI's error shape, and the server keeps serving.

Every case asserts the status, `error.type`, `error.code`, `error.param` and that all four keys
of `{"error": {"message", "type", "param", "code"}}` are there; after *each* case a cheap good
request (GET /v1/models and a one-token chat) must still succeed, so a case that wedges the
server, closes the keep-alive connection or leaks an admission fails right where it happens.

Decisions worth knowing (they are what api.openai.com does, or the closest safe thing):

* A body that is not JSON is 400 `invalid_json`. That includes a JSON document sent with a
  Content-Type other than application/json (text/plain, form, none): FastAPI only parses JSON
  bodies, and guessing would make the server accept what a proxy or WAF classified as non-JSON.
* A JSON value of the wrong type is 400 `invalid_type` (requests are validated strictly:
  `"max_tokens": true` or `"temperature": "0.5"` are refused, not coerced); out of range is
  `invalid_value`; unknown fields are `unknown_parameter`; fields OpenAI has but this server does
  not implement are `unsupported_parameter`.
* Unknown model: 404, type `invalid_request_error`, code `model_not_found`, param `model`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

MODEL = "Qwen1.5-4B-agent"
LIMIT = 64 * 1024  # --max-body-bytes
CONTEXT = 512  # --max-model-len
HI = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(start_server, tiny_model_dir):
    running = start_server(
        "--model", str(tiny_model_dir), "--max-model-len", str(CONTEXT), "--max-body-bytes", str(LIMIT)
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    """One keep-alive client for the whole module: a case that breaks the connection shows."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def chat(**fields: Any) -> dict[str, Any]:
    """A valid one-token request, with `fields` replacing or adding keys (None deletes)."""
    body: dict[str, Any] = {"model": MODEL, "messages": HI, "max_tokens": 1}
    for key, value in fields.items():
        if value is _DELETE:
            body.pop(key, None)
        else:
            body[key] = value
    return body


_DELETE = object()


def tools(*functions: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": f} for f in functions]


def _schema(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, **extra}


def assert_error_shape(response: httpx.Response) -> dict[str, Any]:
    """The OpenAI error envelope, exactly: four keys, typed; returns the inner object."""
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def assert_still_serving(http: httpx.Client) -> None:
    models = http.get("/v1/models")
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [MODEL]
    answer = http.post("/v1/chat/completions", json=chat())
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 1


@dataclass(frozen=True)
class Bad:
    """One bad request and the error it must get."""

    id: str
    status: int
    code: str | None
    param: str | None
    body: Any = None  # JSON-encoded unless `content` is given
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    path: str = "/v1/chat/completions"
    type: str = "invalid_request_error"

    def send(self, http: httpx.Client) -> httpx.Response:
        if self.content is not None:
            return http.request(self.method, self.path, content=self.content, headers=self.headers)
        if self.body is not None:
            return http.request(self.method, self.path, json=self.body, headers=self.headers)
        return http.request(self.method, self.path, headers=self.headers)


def _raw(text: str) -> bytes:
    return text.encode()


_VALID = json.dumps(chat()).encode()
_DEEP = "[" * 5000 + "]" * 5000

BAD = [
    # --- the body as a whole -------------------------------------------------------------
    Bad("malformed_json", 400, "invalid_json", None, content=b'{"model": "x", "messages": [', headers=JSON),
    Bad("non_utf8_body", 400, "invalid_json", None, content=b'{"model": "\xff\xfe", "messages": []}', headers=JSON),
    Bad("text_plain_content_type", 400, "invalid_json", None, content=_VALID, headers={"content-type": "text/plain"}),
    Bad("no_content_type", 400, "invalid_json", None, content=_VALID),
    Bad("form_content_type", 400, "invalid_json", None, content=b"model=x",
        headers={"content-type": "application/x-www-form-urlencoded"}),
    Bad("json_array_body", 400, "invalid_type", None, body=[chat()]),
    Bad("empty_body", 400, "missing_required_parameter", None, content=b"", headers=JSON),
    Bad("nesting_too_deep_body", 400, "invalid_json", None, content=_raw('{"model": ' + _DEEP + "}"), headers=JSON),
    Bad("body_over_limit", 413, "request_too_large", None, body=chat(messages=[{"role": "user", "content": "x" * LIMIT}])),
    Bad("lone_surrogate_in_content", 400, "invalid_value", "messages[0].content",
        content=_raw('{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}' % MODEL), headers=JSON),
    # --- top-level fields ----------------------------------------------------------------
    Bad("missing_model", 400, "missing_required_parameter", "model", body=chat(model=_DELETE)),
    Bad("missing_messages", 400, "missing_required_parameter", "messages", body=chat(messages=_DELETE)),
    Bad("empty_messages", 400, "invalid_value", "messages", body=chat(messages=[])),
    Bad("messages_as_object", 400, "invalid_type", "messages", body=chat(messages={"role": "user", "content": "hi"})),
    Bad("model_as_int", 400, "invalid_type", "model", body=chat(model=4)),
    Bad("temperature_as_string", 400, "invalid_type", "temperature", body=chat(temperature="0.5")),
    Bad("stream_as_string", 400, "invalid_type", "stream", body=chat(stream="yes")),
    Bad("max_tokens_as_bool", 400, "invalid_type", "max_tokens", body=chat(max_tokens=True)),
    Bad("max_tokens_as_float", 400, "invalid_type", "max_tokens", body=chat(max_tokens=1.5)),
    Bad("stream_options_wrong_type", 400, "invalid_type", "stream_options.include_usage",
        body=chat(stream=True, stream_options={"include_usage": "yes"})),
    Bad("metadata_value_not_string", 400, "invalid_type", "metadata.team", body=chat(metadata={"team": 7})),
    Bad("unknown_field", 400, "unknown_parameter", "frobnicate", body=chat(frobnicate=True)),
    Bad("unknown_model", 404, "model_not_found", "model", body=chat(model="gpt-4o")),
    # --- messages --------------------------------------------------------------------------
    Bad("message_not_object", 400, "invalid_type", "messages[0]", body=chat(messages=["hi"])),
    Bad("missing_role", 400, "missing_required_parameter", "messages[0].role", body=chat(messages=[{"content": "hi"}])),
    Bad("unknown_role", 400, "invalid_value", "messages[0].role", body=chat(messages=[{"role": "wizard", "content": "hi"}])),
    Bad("content_as_int", 400, "invalid_type", "messages[0].content", body=chat(messages=[{"role": "user", "content": 5}])),
    Bad("null_user_content", 400, "invalid_value", "messages[0].content", body=chat(messages=[{"role": "user", "content": None}])),
    Bad("image_part", 400, "invalid_value", "messages[0].content[0].type", body=chat(messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])),
    Bad("unknown_part_type", 400, "invalid_value", "messages[0].content[0].type",
        body=chat(messages=[{"role": "user", "content": [{"type": "hologram"}]}])),
    Bad("text_part_without_text", 400, "invalid_value", "messages[0].content[0].text",
        body=chat(messages=[{"role": "user", "content": [{"type": "text"}]}])),
    Bad("last_message_from_assistant", 400, "invalid_value", "messages",
        body=chat(messages=HI + [{"role": "assistant", "content": "Hello!"}])),
    Bad("only_a_system_message", 400, "invalid_value", "messages", body=chat(messages=[{"role": "system", "content": "Be nice."}])),
    Bad("system_after_user", 400, "invalid_value", "messages[1].role",
        body=chat(messages=HI + [{"role": "system", "content": "late"}])),
    Bad("tool_call_arguments_not_json", 400, "invalid_value", "messages[1].tool_calls[0].function.arguments",
        body=chat(messages=HI + [
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "r"}])),
    Bad("tool_call_arguments_nested_too_deep", 400, "invalid_value", "messages[1].tool_calls[0].function.arguments",
        body=chat(messages=HI + [
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": _DEEP}}]},
            {"role": "tool", "tool_call_id": "c", "content": "r"}])),
    Bad("prompt_beyond_context", 400, "context_length_exceeded", "messages",
        body=chat(messages=[{"role": "user", "content": "hello " * (2 * CONTEXT)}])),
    # --- tools and tool_choice ----------------------------------------------------------------
    Bad("tools_not_array", 400, "invalid_type", "tools", body=chat(tools=TOOL)),
    Bad("tool_without_name", 400, "missing_required_parameter", "tools[0].function.name",
        body=chat(tools=tools({"description": "nameless", "parameters": {}}))),
    Bad("tool_name_bad_characters", 400, "invalid_value", "tools[0].function.name", body=chat(tools=tools({"name": "get weather!"}))),
    Bad("tool_name_too_long", 400, "invalid_value", "tools[0].function.name", body=chat(tools=tools({"name": "a" * 65}))),
    Bad("duplicate_tool_names", 400, "invalid_value", "tools[1].function.name",
        body=chat(tools=tools({"name": "f"}, {"name": "f"}))),
    Bad("parameters_is_array", 400, "invalid_type", "tools[0].function.parameters",
        body=chat(tools=tools({"name": "f", "parameters": [{"type": "string"}]}))),
    Bad("parameters_is_string", 400, "invalid_type", "tools[0].function.parameters",
        body=chat(tools=tools({"name": "f", "parameters": "object"}))),
    Bad("properties_not_object", 400, "invalid_value", "tools[0].function.parameters.properties",
        body=chat(tools=tools({"name": "f", "parameters": {"type": "object", "properties": ["city"]}}))),
    Bad("required_not_array", 400, "invalid_value", "tools[0].function.parameters.required",
        body=chat(tools=tools({"name": "f", "parameters": {"type": "object", "properties": {}, "required": "city"}}))),
    Bad("tool_type_not_function", 400, "invalid_value", "tools[0].type",
        body=chat(tools=[{"type": "code_interpreter", "function": {"name": "f"}}])),
    Bad("lone_surrogate_in_tool_description", 400, "invalid_value", "tools[0].function.description",
        content=_raw('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], '
                     '"tools": [{"type": "function", "function": {"name": "f", "description": "\\udc00"}}]}' % MODEL),
        headers=JSON),
    Bad("tool_choice_unknown_tool", 400, "invalid_value", "tool_choice",
        body=chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_time"}})),
    Bad("tool_choice_required_without_tools", 400, "invalid_value", "tool_choice", body=chat(tool_choice="required")),
    Bad("tool_choice_unknown_string", 400, "invalid_value", "tool_choice", body=chat(tools=[TOOL], tool_choice="always")),
    Bad("tools_and_functions_together", 400, "invalid_value", "functions", body=chat(tools=[TOOL], functions=[{"name": "g"}])),
    # --- sampling and limits -----------------------------------------------------------------
    Bad("n_0", 400, "invalid_value", "n", body=chat(n=0)),
    Bad("max_tokens_0", 400, "invalid_value", "max_tokens", body=chat(max_tokens=0)),
    Bad("max_tokens_negative", 400, "invalid_value", "max_tokens", body=chat(max_tokens=-1)),
    Bad("max_tokens_huge", 400, "context_length_exceeded", "max_tokens", body=chat(max_tokens=10**12)),
    Bad("max_completion_tokens_huge", 400, "context_length_exceeded", "max_completion_tokens",
        body=chat(max_tokens=_DELETE, max_completion_tokens=CONTEXT)),
    Bad("temperature_negative", 400, "invalid_value", "temperature", body=chat(temperature=-1)),
    Bad("temperature_3", 400, "invalid_value", "temperature", body=chat(temperature=3)),
    Bad("temperature_nan", 400, "invalid_value", "temperature",
        content=_raw('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}' % MODEL),
        headers=JSON),
    Bad("top_p_2", 400, "invalid_value", "top_p", body=chat(top_p=2)),
    Bad("presence_penalty_3", 400, "invalid_value", "presence_penalty", body=chat(presence_penalty=3)),
    Bad("frequency_penalty_minus_3", 400, "invalid_value", "frequency_penalty", body=chat(frequency_penalty=-3)),
    Bad("stop_5_items", 400, "invalid_value", "stop", body=chat(stop=["a", "b", "c", "d", "e"])),
    Bad("stop_empty_string", 400, "invalid_value", "stop", body=chat(stop="")),
    Bad("stop_list_with_empty_string", 400, "invalid_value", "stop", body=chat(stop=["end", ""])),
    Bad("seed_beyond_int64", 400, "invalid_value", "seed", body=chat(seed=2**64)),
    # --- constrained decoding: a schema the grammar cannot enforce is named, never approximated ---
    Bad("response_format_unknown_type", 400, "invalid_value", "response_format.type",
        body=chat(response_format={"type": "xml"})),
    Bad("response_format_json_schema_missing", 400, "invalid_value", "response_format",
        body=chat(response_format={"type": "json_schema"})),
    Bad("response_format_schema_with_not", 400, "invalid_value", "response_format.json_schema.schema",
        body=chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}})),
    Bad("required_tool_with_unique_items", 400, "invalid_value", "tools[0].function.parameters",
        body=chat(tools=tools({"name": "f", "parameters": _schema({"a": {"type": "array", "uniqueItems": True}})}),
                  tool_choice="required")),
    Bad("strict_tool_with_if_then", 400, "invalid_value", "tools[1].function.parameters",
        body=chat(tools=tools({"name": "f"}, {"name": "g", "strict": True, "parameters": _schema(
            {"a": {"if": {"type": "string"}, "then": {"maxLength": 2}}})}))),
    Bad("top_logprobs_without_logprobs", 400, "invalid_value", "top_logprobs", body=chat(top_logprobs=2)),
    Bad("top_logprobs_21", 400, "invalid_value", "top_logprobs", body=chat(logprobs=True, top_logprobs=21)),
    Bad("logit_bias_key_not_a_token", 400, "invalid_value", "logit_bias", body=chat(logit_bias={"abc": 5})),
    Bad("logit_bias_key_beyond_vocabulary", 400, "invalid_value", "logit_bias", body=chat(logit_bias={"9999999": 5})),
    Bad("logit_bias_value_101", 400, "invalid_value", "logit_bias.100", body=chat(logit_bias={"100": 101})),
    Bad("n_beyond_admission", 429, "server_busy", None, body=chat(n=128), type="rate_limit_error"),
    # --- OpenAI fields this server cannot honour: named, never ignored --------------------------
    Bad("audio", 400, "unsupported_parameter", "audio", body=chat(audio={"voice": "alloy", "format": "wav"})),
    Bad("modalities_audio", 400, "unsupported_parameter", "modalities", body=chat(modalities=["text", "audio"])),
    Bad("prediction", 400, "unsupported_parameter", "prediction",
        body=chat(prediction={"type": "content", "content": "x"})),
    Bad("web_search_options", 400, "unsupported_parameter", "web_search_options", body=chat(web_search_options={})),
    Bad("reasoning_effort_unknown", 400, "invalid_value", "reasoning_effort", body=chat(reasoning_effort="max")),
    # --- /v1/completions, /v1/responses, /tokenize --------------------------------------------------
    Bad("completion_empty_prompt", 400, "invalid_value", "prompt", body={"model": MODEL, "prompt": ""},
        path="/v1/completions"),
    Bad("completion_token_beyond_vocabulary", 400, "invalid_value", "prompt",
        body={"model": MODEL, "prompt": [1, 10**7]}, path="/v1/completions"),
    Bad("completion_two_prompts", 400, "invalid_value", "prompt", body={"model": MODEL, "prompt": ["a", "b"]},
        path="/v1/completions"),
    Bad("completion_lone_surrogate", 400, "invalid_value", "prompt",
        content=_raw('{"model": "%s", "prompt": "a\\ud800"}' % MODEL), headers=JSON, path="/v1/completions"),
    Bad("tokenize_lone_surrogate", 400, "invalid_value", "prompt",
        content=_raw('{"prompt": "a\\ud800"}'), headers=JSON, path="/tokenize"),
    Bad("response_lone_surrogate_in_metadata", 400, "invalid_value", "metadata.k",
        content=_raw('{"model": "%s", "input": "hi", "metadata": {"k": "\\udc00"}}' % MODEL), headers=JSON,
        path="/v1/responses"),
    Bad("response_lone_surrogate_in_instructions", 400, "invalid_value", "instructions",
        content=_raw('{"model": "%s", "input": "hi", "instructions": "\\udc00"}' % MODEL), headers=JSON,
        path="/v1/responses"),
    Bad("completion_suffix", 400, "unsupported_parameter", "suffix", body={"model": MODEL, "prompt": "a", "suffix": "b"},
        path="/v1/completions"),
    Bad("completion_echo_with_logprobs", 400, "unsupported_parameter", "echo",
        body={"model": MODEL, "prompt": "a", "echo": True, "logprobs": 1}, path="/v1/completions"),
    Bad("completion_logprobs_6", 400, "invalid_value", "logprobs", body={"model": MODEL, "prompt": "a", "logprobs": 6},
        path="/v1/completions"),
    Bad("response_unknown_item_type", 400, "invalid_value", "input[0].type",
        body={"model": MODEL, "input": [{"type": "computer_call_output", "call_id": "x"}]}, path="/v1/responses"),
    Bad("response_image_part", 400, "invalid_value", "input[0].content[0].type",
        body={"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        path="/v1/responses"),
    Bad("response_call_without_call_id", 400, "missing_required_parameter", "input[1].call_id",
        body={"model": MODEL, "input": [{"role": "user", "content": "hi"},
                                         {"type": "function_call", "name": "f", "arguments": "{}"}]},
        path="/v1/responses"),
    Bad("response_bad_arguments_json", 400, "invalid_value", "input[1].arguments",
        body={"model": MODEL, "input": [{"role": "user", "content": "hi"},
                                         {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"},
                                         {"type": "function_call_output", "call_id": "c", "output": "x"}]},
        path="/v1/responses"),
    Bad("response_hosted_tool", 400, "unsupported_parameter", "tools[0].type",
        body={"model": MODEL, "input": "hi", "tools": [{"type": "web_search"}]}, path="/v1/responses"),
    Bad("response_unknown_previous_id", 404, "previous_response_not_found", "previous_response_id",
        body={"model": MODEL, "input": "hi", "previous_response_id": "resp_unknown"}, path="/v1/responses"),
    Bad("response_background", 400, "unsupported_parameter", "background",
        body={"model": MODEL, "input": "hi", "background": True}, path="/v1/responses"),
    Bad("response_max_output_tokens_huge", 400, "context_length_exceeded", "max_output_tokens",
        body={"model": MODEL, "input": "hi", "max_output_tokens": CONTEXT}, path="/v1/responses"),
    Bad("get_unknown_response", 404, None, None, method="GET", path="/v1/responses/resp_unknown"),
    Bad("delete_unknown_response", 404, None, None, method="DELETE", path="/v1/responses/resp_unknown"),
    Bad("tokenize_neither_prompt_nor_messages", 400, "invalid_value", "prompt", body={"model": MODEL},
        path="/tokenize"),
    Bad("detokenize_beyond_vocabulary", 400, "invalid_value", "tokens", body={"tokens": [10**7]}, path="/detokenize"),
    # --- routes ------------------------------------------------------------------------------
    Bad("unknown_route", 404, "unknown_url", None, body=chat(), path="/v1/embeddings"),
    Bad("unknown_model_card", 404, "model_not_found", "model", method="GET", path="/v1/models/gpt-4o"),
    Bad("get_on_chat_completions", 405, "method_not_allowed", None, method="GET"),
    Bad("delete_on_models", 405, "method_not_allowed", None, method="DELETE", path="/v1/models"),
]


def test_there_are_at_least_forty_distinct_cases():
    assert len(BAD) >= 40 and len({case.id for case in BAD}) == len(BAD)


@pytest.mark.parametrize("case", BAD, ids=[case.id for case in BAD])
def test_bad_request_is_a_clean_4xx(case: Bad, http: httpx.Client):
    response = case.send(http)
    assert response.status_code == case.status, response.text
    error = assert_error_shape(response)
    assert (error["type"], error["code"], error["param"]) == (case.type, case.code, case.param), error
    assert response.headers.get("x-request-id")
    if case.status == 405:
        assert response.headers.get("allow"), "a 405 must say which methods are allowed"
    assert_still_serving(http)


def test_chunked_body_over_the_limit_is_413(http: httpx.Client):
    """No Content-Length to check up front: the middleware counts while reading."""

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "%s", "messages": [{"role": "user", "content": "' % MODEL.encode()
        for _ in range(LIMIT // 1024 + 1):
            yield b"x" * 1024
        yield b'"}]}'

    response = http.post("/v1/chat/completions", content=chunks(), headers=JSON)
    assert response.status_code == 413
    assert assert_error_shape(response)["code"] == "request_too_large"
    assert_still_serving(http)


def test_error_messages_echoing_lone_surrogates_are_valid_json(http: httpx.Client):
    """The 404 message quotes the model name; "\\ud800" cannot be UTF-8, so it comes back escaped."""
    body = _raw('{"model": "gpt\\ud800", "messages": [{"role": "user", "content": "hi"}]}')
    response = http.post("/v1/chat/completions", content=body, headers=JSON)
    assert response.status_code == 404
    assert "\\ud800" in response.content.decode("ascii")
    assert assert_error_shape(response)["code"] == "model_not_found"
    assert_still_serving(http)


UNUSUAL_BUT_VALID = {
    "numeric_and_mixed_enum": chat(tools=tools({"name": "f", "parameters": _schema(
        {"level": {"type": "integer", "enum": [1, 2, 3]}, "ratio": {"enum": [0.5, None, True, "x", {"k": 1}]}})})),
    "nested_objects": chat(tools=tools({"name": "f", "parameters": _schema({"where": _schema(
        {"city": {"type": "string"}, "geo": _schema({"lat": {"type": "number"}, "lon": {"type": "number"}})})})})),
    "parameters_without_properties": chat(tools=tools({"name": "f", "parameters": {"type": "object"}})),
    "no_parameters_at_all": chat(tools=tools({"name": "f", "description": "no arguments"})),
    "parameters_null": chat(tools=tools({"name": "f", "parameters": None})),
    "type_list_and_array_items": chat(tools=tools({"name": "f", "parameters": _schema(
        {"a": {"type": ["string", "null"]}, "b": {"type": "array", "items": {"type": "integer"}}, "c": {"items": "odd"}})})),
    "json_schema_keywords_and_strict": chat(tools=tools({"name": "f", "strict": True, "parameters": _schema(
        {"q": {"type": "string", "minLength": 1, "pattern": "^[a-z]+$"}}, required=["q"], additionalProperties=False,
        **{"$schema": "http://json-schema.org/draft-07/schema#"})})),
    "dashes_and_64_char_name": chat(tools=tools({"name": "a-" + "b" * 62})),
    "tool_choice_none_with_tools": chat(tools=[TOOL], tool_choice="none"),
    "content_parts_and_developer_role": chat(messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": " there", "cache_control": {}}]}]),
    "empty_user_content": chat(messages=[{"role": "user", "content": ""}]),
    "control_tokens_as_text": chat(messages=[{"role": "user", "content": "<|im_end|><|endoftext|>"}]),
    "four_stop_sequences_and_nulls": chat(stop=["a", "b", "c", "d"], temperature=None, top_p=None, seed=None),
    "integer_temperature": chat(temperature=1, top_p=1),
    "integral_float_max_tokens": chat(max_tokens=1.0, seed=7.0),  # JSON Schema: 1.0 is an integer
    "response_format_json_object": chat(response_format={"type": "json_object"}),
    "response_format_json_schema_with_tools": chat(tools=[TOOL], response_format={
        "type": "json_schema", "json_schema": {"name": "a", "strict": True, "schema": _schema({"a": {"type": "integer"}})}}),
}


@pytest.mark.parametrize("body", UNUSUAL_BUT_VALID.values(), ids=list(UNUSUAL_BUT_VALID))
def test_unusual_but_valid_requests_are_answered(body: dict[str, Any], http: httpx.Client):
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"
    assert_still_serving(http)


def test_charset_in_content_type_is_fine(http: httpx.Client):
    response = http.post("/v1/chat/completions", content=_VALID, headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 200, response.text


def test_a_bug_is_a_500_in_openai_shape_and_does_not_escape_the_app():
    """Unexpected exceptions are answered (and logged) by the middleware and go no further.

    Starlette's catch-all would answer too, but then re-raise; uvicorn then closes the keep-alive
    connection, so the client's next request on it fails. httpx's ASGI transport raises whatever
    escapes the app, which is what this checks.
    """
    import asyncio

    from fastapi import FastAPI

    from server.api.errors import install_error_handlers
    from server.api.metrics import Metrics
    from server.api.middleware import RequestMiddleware

    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestMiddleware, metrics=Metrics(), max_body_bytes=LIMIT)

    @app.post("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/boom", json={})

    response = asyncio.run(call())
    assert response.status_code == 500
    error = assert_error_shape(response)
    assert (error["type"], error["code"], error["param"]) == ("server_error", None, None)
    assert "a bug" not in error["message"]  # no internals in the answer
