"""Constrained decoding end to end: real models behind a real server, driven with the openai SDK.

A random-weight model knows no JSON at all, so whatever it writes under a grammar is the grammar's
doing: every output must validate against its schema. The schemas are bounded (maxLength,
maximum, maxItems, additionalProperties false) because a model that never chooses to stop would
otherwise run to max_tokens. The trained demo model checks that typical fine-tune mistakes turn
into valid calls.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from server.demo import WEATHER_TOOLS

MODEL = "Qwen1.5-4B-agent"
ASK = [{"role": "user", "content": "Fill in the form."}]
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]


def obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            "additionalProperties": False, **extra}


NAME = {"type": "string", "maxLength": 8}
SCHEMAS = {
    "nested_objects": obj({"user": obj({"name": NAME, "address": obj({"city": NAME, "zip": {"type": "integer", "minimum": 0, "maximum": 99999}})})}),
    "array_of_objects": obj({"items": {"type": "array", "items": obj({"id": {"type": "integer", "minimum": 1, "maximum": 9}, "tag": NAME}),
                                       "minItems": 1, "maxItems": 3}}),
    "enum_with_null_and_integers": obj({"level": {"enum": [1, 2, 3, None, "max"]}, "mode": {"enum": ["a", "b"]}}),
    "nullable_types": obj({"note": {"type": ["string", "null"], "maxLength": 5}, "count": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}}),
    "any_of": obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 50}, {"type": "string", "maxLength": 4}, {"type": "boolean"}]}}),
    "const": obj({"kind": {"const": "point"}, "x": {"type": "integer", "minimum": -5, "maximum": 5}}),
    "bounded_integers": obj({"a": {"type": "integer", "minimum": 10, "maximum": 20}, "b": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4}}),
    "unicode_property_names": obj({"城市": NAME, "température": {"type": "integer", "minimum": -40, "maximum": 50}, "ok?": {"type": "boolean"}}),
    "optional_properties": obj({"flag": {"type": "boolean"}, "note": NAME, "n": {"type": "integer", "minimum": 0, "maximum": 3}}, required=["flag"]),
    "refs_and_defs": {"$defs": {"P": obj({"x": {"type": "integer", "minimum": 0, "maximum": 3}})}, **obj({"p": {"$ref": "#/$defs/P"}, "q": {"$ref": "#/$defs/P"}})},
    "pattern_and_min_length": obj({"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}, "word": {"type": "string", "minLength": 2, "maxLength": 4}}),
    "array_of_enums": obj({"tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 4}, "empty": obj({})}),
}
OTHER = {"type": "function", "function": {"name": "other_tool", "parameters": obj({"ok": {"type": "boolean"}})}}


def offered(name: str) -> list[dict]:
    return [{"type": "function", "function": {"name": name, "description": "Records a form.", "parameters": SCHEMAS[name]}}, OTHER]


@pytest.fixture(scope="module", params=["builtin", "vllm"])
def random_client(request, start_server, tiny_model_dir):
    """The random model on each engine; on vLLM in a vLLM child of its own (`--engine vllm`), stopped
    with the module so that at most one vLLM besides the session's runs at a time."""
    args, env = ["--model", str(tiny_model_dir), "--max-model-len", "1024", "--max-running", "8"], None
    if request.param == "vllm":
        args += ["--engine", "vllm", "--vllm-python", request.getfixturevalue("vllm_python"),
                 "--vllm-args", "--enforce-eager --max-num-seqs 8"]
        env = request.getfixturevalue("vllm_env")
    server = start_server(*args, env=env)
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    server.stop()


def _ask(client: openai.OpenAI, schema_name: str, mode: str, sampling: str):
    extra: dict = {"temperature": 0} if sampling == "greedy" else {"temperature": 1.0, "seed": 7}
    if mode == "response_format":
        extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "form", "schema": SCHEMAS[schema_name], "strict": True}}
    else:
        extra["tools"] = offered(schema_name)
        extra["tool_choice"] = "required" if mode == "required" else {"type": "function", "function": {"name": schema_name}}
        extra["parallel_tool_calls"] = False  # a model that never stops would otherwise call again and again
    return client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=300, **extra)


def test_random_model_output_always_validates(random_client):
    """12 schemas x named/required/response_format x greedy/seeded, sent concurrently (one batch)."""
    cases = [(s, m, g) for s in SCHEMAS for m in ("named", "required", "response_format") for g in ("greedy", "seeded")]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda case: _ask(random_client, *case), cases))
    for (schema_name, mode, _), response in zip(cases, responses):
        choice = response.choices[0]
        where = f"{schema_name}/{mode}: {choice.message}"
        if mode == "response_format":
            assert choice.finish_reason == "stop" and not choice.message.tool_calls, where
            jsonschema.validate(json.loads(choice.message.content), SCHEMAS[schema_name])
            continue
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, where
        schemas = {"other_tool": OTHER["function"]["parameters"], schema_name: SCHEMAS[schema_name]}
        for call in choice.message.tool_calls:
            assert call.function.name in schemas and (mode == "required" or call.function.name == schema_name), where
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_streamed_call_arguments_arrive_as_generated(random_client):
    """Announced once the name is fixed, then several argument deltas; the same as non-streaming."""
    request = {"model": MODEL, "messages": ASK, "max_tokens": 300, "temperature": 0, "tools": offered("nested_objects"),
               "tool_choice": {"type": "function", "function": {"name": "nested_objects"}}}
    whole = random_client.chat.completions.create(**request).choices[0]
    chunks = list(random_client.chat.completions.create(**request, stream=True))
    calls = [c for chunk in chunks for choice in chunk.choices for c in choice.delta.tool_calls or []]
    assert calls[0].id and calls[0].function.name == "nested_objects" and not calls[0].function.arguments
    fragments = [c.function.arguments for c in calls[1:]]
    assert len(fragments) >= 3 and all(fragments) and all(c.id is None for c in calls[1:])
    assert "".join(fragments) == whole.message.tool_calls[0].function.arguments
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == whole.finish_reason == "tool_calls"


def test_max_tokens_cut_inside_a_constrained_call_says_length(random_client):
    request = {"model": MODEL, "messages": ASK, "max_tokens": 4, "temperature": 0, "tools": offered("nested_objects"),
               "tool_choice": {"type": "function", "function": {"name": "nested_objects"}}}
    choice = random_client.chat.completions.create(**request).choices[0]
    assert choice.finish_reason == "length"
    (call,) = choice.message.tool_calls
    assert call.function.name == "nested_objects" and call.function.arguments.startswith("{")  # a prefix, cut short
    chunks = list(random_client.chat.completions.create(**request, stream=True))
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"


class City(BaseModel):
    name: str = Field(max_length=10)
    population: int = Field(ge=0, le=10**7)
    capital: bool


def test_sdk_parse_with_a_pydantic_model(random_client):
    completion = random_client.chat.completions.parse(model=MODEL, messages=ASK, response_format=City, max_tokens=300,
                                                      temperature=0)
    assert isinstance(completion.choices[0].message.parsed, City)


def test_json_object_mode(random_client):
    response = random_client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                                     max_tokens=40, temperature=0)
    choice = response.choices[0]
    if choice.finish_reason == "stop":  # an unbounded object may be cut by max_tokens
        assert isinstance(json.loads(choice.message.content), dict)
    assert choice.message.content.startswith("{")


# ---------------------------------------------------------------------------------------------
# The trained model: its usual answer to "What's the weather in Paris?" is
# get_weather {"city": "Paris"}; each schema below makes that answer a mistake.


def weather(parameters: dict, name: str = "get_weather", strict: bool | None = True) -> list[dict]:
    function = {**WEATHER_TOOLS[0]["function"], "name": name, "parameters": parameters}
    if strict is not None:
        function["strict"] = strict
    return [{"type": "function", "function": function}]


CITY = {"type": "string", "description": "The city name, e.g. Paris", "maxLength": 12}
UNIT = {"type": "string", "description": "The temperature unit", "enum": ["celsius", "fahrenheit"]}
MISTAKES = {
    "missing_required_field": weather(obj({"city": CITY, "unit": UNIT})),
    "extra_property": weather(obj({"town": {**CITY, "description": "The city name, e.g. Paris"}})),
    "value_outside_the_enum": weather(obj({"city": {**CITY, "enum": ["London", "Tokyo"]}, "unit": UNIT}, required=["city"])),
    "unoffered_tool_name": weather(obj({"city": CITY, "unit": UNIT}, required=["city"]), name="lookup_weather"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_trained_model_mistakes_become_valid_calls(client, mistake):
    tools = MISTAKES[mistake]
    schema = tools[0]["function"]["parameters"]
    choice = client.chat.completions.create(model=MODEL, messages=PARIS, tools=tools, temperature=0,
                                                    tool_choice="required", max_tokens=60).choices[0]
    assert choice.finish_reason == "tool_calls", choice
    for call in choice.message.tool_calls:
        assert call.function.name == tools[0]["function"]["name"]
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_trained_model_prose_under_required_becomes_a_call(client):
    tools = MISTAKES["missing_required_field"]
    choice = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], tools=tools,
                                                    tool_choice="required", temperature=0, max_tokens=60).choices[0]
    assert choice.finish_reason == "tool_calls", choice
    jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments), tools[0]["function"]["parameters"])


def test_strict_tool_in_auto_mode_and_the_unconstrained_default(client):
    """strict: true holds an auto-mode call to the schema; without it the tolerant parse applies."""
    strict = client.chat.completions.create(model=MODEL, messages=PARIS, tools=MISTAKES["value_outside_the_enum"],
                                                    temperature=0, max_tokens=60).choices[0]
    assert strict.finish_reason == "tool_calls"
    assert json.loads(strict.message.tool_calls[0].function.arguments)["city"] in ("London", "Tokyo")
    loose = weather(MISTAKES["value_outside_the_enum"][0]["function"]["parameters"], strict=None)
    free = client.chat.completions.create(model=MODEL, messages=PARIS, tools=loose, temperature=0,
                                                  max_tokens=60).choices[0]
    # Whatever it wrote (with this listing the demo model garbles the call, which stays content), it was not held
    # to the enum.
    assert all(json.loads(c.function.arguments).get("city") not in ("London", "Tokyo") for c in free.message.tool_calls or [])


@pytest.mark.parametrize("engine", ["builtin", "vllm"])
def test_strict_tools_flag(start_server, trained_model_dir, engine, request):
    engine_args = ["--engine-url", request.getfixturevalue("vllm_server").url, "--engine-grammar"] if engine == "vllm" else []
    server = start_server("--model", str(trained_model_dir), "--strict-tools", *engine_args)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    tools = weather(MISTAKES["value_outside_the_enum"][0]["function"]["parameters"], strict=None)
    choice = client.chat.completions.create(model=MODEL, messages=PARIS, tools=tools, temperature=0, max_tokens=60).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] in ("London", "Tokyo")
    server.stop()
