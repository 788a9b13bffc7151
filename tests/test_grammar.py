"""The grammar builder, without a model: llguidance matchers accept exactly the right answers.

Each text is tokenized with the real Qwen tokenizer and fed to a matcher built the way the engine
builds it (lm_head-sized vocabulary, `<|im_end|>` as EOS); a text is accepted when every token is
and the matcher then takes EOS.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prompts import load_format
from server.format.grammar import Grammar, GrammarError, build_grammar
from server.format.render import RenderError, ToolChoice

FMT = load_format()
VOCAB, EOS = 151936, 151645


def tool(name: str, parameters: dict | None = None, strict: bool | None = None) -> dict:
    function: dict = {"name": name, "parameters": parameters or {"type": "object", "properties": {}}}
    if strict is not None:
        function["strict"] = strict
    return {"type": "function", "function": function}


WEATHER = tool("get_weather", {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
    "additionalProperties": False,
})
TIME = tool("get_time", {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]})
TOOLS = [WEATHER, TIME]


def grammar(choice: ToolChoice, tools=TOOLS, response_format=None, parallel=None, strict_tools=False) -> Grammar | None:
    prefix = {"required": FMT.forced_required, "named": FMT.forced_named.replace("{name}", choice.name or "")}
    return build_grammar(
        tools=tools, tool_choice=choice, forced_prefix=prefix.get(choice.mode, ""), response_format=response_format,
        parallel_tool_calls=parallel, fmt=FMT, strict_tools=strict_tools,
    )


@pytest.fixture(scope="module")
def llg_tokenizer(qwen_tokenizer):
    import llguidance.hf

    return llguidance.hf.from_tokenizer(qwen_tokenizer, n_vocab=VOCAB, eos_token=EOS)


@pytest.fixture(scope="module")
def accepts(llg_tokenizer, qwen_tokenizer):
    from llguidance import LLMatcher

    def check(g: Grammar, text: str) -> bool:
        matcher = LLMatcher(llg_tokenizer, g.lark, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        ids = qwen_tokenizer.encode(text, add_special_tokens=False) if text else []
        return matcher.consume_tokens(ids) and matcher.consume_token(EOS)

    return check


CALL_W = 'get_weather\nAction Input: {"city": "Paris"}'
CALL_T = 'get_time\nAction Input: {"tz": "UTC"}'


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (' {"city": "Paris"}', True),
        (' {"city": "Paris", "unit": "c"}', True),
        (' {"city": "巴黎"}', True),
        (' {"city": "Paris\\n"}', True),  # newline escaped inside a string: fine
        ('{"city": "Paris"}', False),  # the space after `Action Input:` is generated, not forced
        (' {"city":"Paris"}', False),  # separators pinned to json.dumps
        (' {"city": "Paris",  "unit": "c"}', False),
        (' {\n"city": "Paris"}', False),
        (' {"city": "Paris"}\n', False),
        (' {"unit": "c"}', False),  # missing required
        (' {"city": "Paris", "unit": "k"}', False),  # outside the enum
        (' {"city": "Paris", "x": 1}', False),  # additionalProperties false
        (' {"city": "' + "x" * 21 + '"}', False),  # maxLength
        (' {"city": "Paris"} Observation:', False),
        ("", False),
    ],
)
def test_named(accepts, text, ok):
    g = grammar(ToolChoice("named", "get_weather"))
    assert g is not None and g.calls
    assert accepts(g, text) is ok


@pytest.mark.parametrize(
    ("text", "parallel", "ok"),
    [
        (" " + CALL_W, None, True),
        (" " + CALL_T, None, True),
        (f" {CALL_W}\nAction: {CALL_T}", None, True),
        (f" {CALL_W}\nAction: {CALL_T}\nAction: {CALL_W}", None, True),
        (f" {CALL_W}\nAction: {CALL_T}", False, False),
        (" " + CALL_W, False, True),
        (' get_weather\nAction Input: {"tz": "UTC"}', None, False),  # the other tool's arguments
        (' send_email\nAction Input: {"to": "x"}', None, False),  # not offered
        (" I will check the weather.", None, False),  # prose under required
        (f" {CALL_W}\n", None, False),
        (f" {CALL_W}\n\nAction: {CALL_T}", None, False),
        ("", None, False),
    ],
)
def test_required(accepts, text, parallel, ok):
    g = grammar(ToolChoice("required"), parallel=parallel)
    assert accepts(g, text) is ok


def test_required_enforces_every_schema_even_without_strict(accepts):
    assert not accepts(grammar(ToolChoice("required")), ' get_time\nAction Input: {"zone": 1}')


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("The weather is fine.", True),
        ("", True),
        ("Two lines\nof text, with Action and Input: but no trigger.", True),
        (f"Let me check.\nAction: {CALL_W}", True),
        (f"Action: {CALL_W}\nAction: {CALL_T}", True),
        ('Action: get_time\nAction Input: {"zone": 1}', True),  # get_time is not strict: any object
        ('Action: get_time\nAction Input: ["UTC"]', False),  # ... but an object
        ('Action: get_weather\nAction Input: {"city": 3}', False),  # get_weather is strict
        ('Action: send_email\nAction Input: {}', False),
        ("I would say Action: nothing", False),  # after the trigger only a call
        (f"Action: {CALL_W}\nObservation: sunny", False),
    ],
)
def test_auto_with_a_strict_tool(accepts, text, ok):
    g = grammar(ToolChoice("auto"), tools=[tool("get_weather", WEATHER["function"]["parameters"], strict=True), TIME])
    assert g is not None and g.calls
    assert accepts(g, text) is ok


def test_auto_without_strict_is_unconstrained_unless_the_server_flag_says_so(accepts):
    assert grammar(ToolChoice("auto")) is None
    g = grammar(ToolChoice("auto"), strict_tools=True)
    assert not accepts(g, 'Action: get_time\nAction Input: {"zone": 1}')
    assert accepts(g, f"Action: {CALL_T}")


SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["answer"]}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}


@pytest.mark.parametrize(
    ("response_format", "text", "ok"),
    [
        (JSON_SCHEMA, '{"answer": 7}', True),
        (JSON_SCHEMA, '{"answer": 10}', False),
        (JSON_SCHEMA, ' {"answer": 7}', False),
        (JSON_SCHEMA, "Sure: 7", False),
        ({"type": "json_object"}, '{"a": [1, {"b": null}]}', True),
        ({"type": "json_object"}, "[1, 2]", False),
        ({"type": "json_object"}, '{"a":1}', False),
        ({"type": "json_schema", "json_schema": {"name": "anything"}}, '"just a string"', True),
    ],
)
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_response_format(accepts, response_format, text, ok, tools):
    choice = ToolChoice("auto" if tools else "none")
    g = grammar(choice, tools=tools, response_format=response_format)
    assert g.calls is bool(tools)
    assert accepts(g, text) is ok


def test_response_format_with_tools_allows_a_call_instead(accepts):
    g = grammar(ToolChoice("auto"), response_format=JSON_SCHEMA)
    assert accepts(g, f"Action: {CALL_W}")
    assert not accepts(g, f"Thinking.\nAction: {CALL_W}")  # content must be the JSON
    assert grammar(ToolChoice("none"), response_format={"type": "text"}) is None


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "string", "if": {"minLength": 2}, "then": {"maxLength": 3}}, "if"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ],
)
def test_unenforceable_keywords_are_refused_naming_keyword_and_tool(schema, keyword):
    bad = tool("bad_tool", {"type": "object", "properties": {"x": schema}})
    with pytest.raises(GrammarError) as err:
        grammar(ToolChoice("required"), tools=[WEATHER, bad])
    assert keyword in err.value.message and "bad_tool" in err.value.message
    assert err.value.param == "tools[1].function.parameters"
    with pytest.raises(GrammarError) as err:
        grammar(ToolChoice("none"), tools=None, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert keyword in err.value.message and err.value.param == "response_format.json_schema.schema"


def test_unenforceable_schema_is_fine_where_it_is_not_enforced():
    bad = tool("bad_tool", {"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}})
    assert grammar(ToolChoice("named", "get_weather"), tools=[WEATHER, bad]) is not None  # only NAME's schema
    assert grammar(ToolChoice("auto"), tools=[tool("s", strict=True), bad]) is not None  # bad is not strict
    assert grammar(ToolChoice("auto"), tools=[bad]) is None


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "json_schema"}, "response_format"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "no-such"}}},
         "response_format.json_schema.schema"),
    ],
)
def test_bad_response_formats(response_format, param):
    with pytest.raises(GrammarError) as err:
        grammar(ToolChoice("none"), tools=None, response_format=response_format)
    assert err.value.param == param


def test_tool_parameters_must_describe_an_object(accepts):
    with pytest.raises(GrammarError) as err:
        grammar(ToolChoice("required"), tools=[tool("t", {"type": "string"})])
    assert err.value.param == "tools[0].function.parameters"
    g = grammar(ToolChoice("required"), tools=[tool("t", {"properties": {"a": {"type": "integer"}}})])
    assert accepts(g, ' t\nAction Input: {"a": 1}') and not accepts(g, " t\nAction Input: 1")


# ---------------------------------------------------------------------------------------------
# Properties: whatever the model could say in the training format is accepted, nothing else.

# DEL is the one character json.dumps writes raw and llguidance wants escaped (as `\u007f`).
texts = st.text(st.characters(exclude_characters="\x7f", exclude_categories=("Cs",)), max_size=6)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=6,
)
json_objects = st.dictionaries(texts, json_values, max_size=3)


@settings(max_examples=60, deadline=None)
@given(obj=json_objects)
def test_any_json_dumps_object_is_a_json_object_answer(accepts, obj):
    """As in training (`ensure_ascii=False`); llguidance allows \\u escapes only for control characters."""
    g = grammar(ToolChoice("none"), tools=None, response_format={"type": "json_object"})
    assert accepts(g, json.dumps(obj, ensure_ascii=False))
    compact = json.dumps(obj, separators=(",", ":"))
    if compact != json.dumps(obj):
        assert not accepts(g, compact)


@settings(max_examples=40, deadline=None)
@given(
    calls=st.lists(st.tuples(st.sampled_from(["get_weather", "get_time"]), texts), min_size=1, max_size=3),
    preamble=st.text(max_size=12).filter(lambda t: "Action:" not in t),
)
def test_auto_strict_calls_in_training_format_are_accepted(accepts, calls, preamble):
    blocks = [
        FMT.function_call.replace("{name}", name).replace(
            "{arguments}", json.dumps({"city": text[:20]} if name == "get_weather" else {"tz": text}, ensure_ascii=False)
        )
        for name, text in calls
    ]
    g = grammar(ToolChoice("auto"), strict_tools=True)
    assert accepts(g, preamble)
    text = preamble + FMT.content_separator + FMT.call_separator.join(blocks)
    assert accepts(g, text)
    assert not accepts(g, text.replace("Action: get_", "Action: got_", 1))


schema_like = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False) | st.sampled_from(
        ["object", "string", "integer", "array", "number", "boolean", "null", "#/$defs/x", "^a+$", "date-time"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(
        ["type", "properties", "items", "required", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs",
         "minimum", "maxLength", "pattern", "format", "additionalProperties", "uniqueItems", "x", "not"]), children,
        max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(parameters=st.dictionaries(st.sampled_from(["type", "properties", "required", "$defs", "anyOf", "items"]),
                                  schema_like, max_size=3))
def test_any_schema_is_a_grammar_or_a_grammar_error(parameters):
    """Whatever a client sends as a schema, the answer is a grammar or a 400, never a crash."""
    tools = [tool("f", parameters)]
    try:
        g = grammar(ToolChoice("required"), tools=tools)
    except RenderError as err:  # the renderer's own checks (it runs first in the server) or GrammarError
        assert err.param.startswith("tools[0].function.parameters")
        return
    from llguidance import LLMatcher

    assert LLMatcher.validate_grammar(g.lark) == ""
    try:
        g = grammar(ToolChoice("none"), tools=None,
                    response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": parameters}})
    except GrammarError as err:
        assert err.param == "response_format.json_schema.schema"
        return
    assert LLMatcher.validate_grammar(g.lark) == ""
