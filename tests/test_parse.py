"""The output parser: examples for every FORMAT.md rule, and stream == non-stream by property."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.format.parse import (
    ACTION,
    ContentDelta,
    StreamingParser,
    ToolCallArguments,
    ToolCallStart,
    new_call_id,
    parse_output,
)

NAMES = ("get_weather", "get-time", "calculate_discount")


def calls_of(parsed):
    return [(c.name, c.arguments) for c in parsed.tool_calls]


def test_single_call():
    out = parse_output('Action: get_weather\nAction Input: {"city": "Paris"}', NAMES)
    assert out.content is None
    assert calls_of(out) == [("get_weather", '{"city": "Paris"}')]
    assert out.tool_calls[0].id.startswith("call_") and len(out.tool_calls[0].id) == 29


def test_preamble_becomes_content_and_trailing_observation_is_dropped():
    text = 'Let me check.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: 18C\nThe answer is'
    out = parse_output(text, NAMES)
    assert out.content == "Let me check."
    assert calls_of(out) == [("get_weather", '{"city": "Paris"}')]


def test_two_calls_hyphenated_name_and_chinese_reserialized():
    text = 'Action: get_weather\nAction Input:   {"city":"北京"}\n\nAction: get-time\nAction Input: {"tz": "Asia/Tokyo"}'
    out = parse_output(text, NAMES)
    assert calls_of(out) == [("get_weather", '{"city": "北京"}'), ("get-time", '{"tz": "Asia/Tokyo"}')]
    assert out.tool_calls[0].id != out.tool_calls[1].id


def test_escaped_unicode_is_reserialized_without_ascii_escapes():
    out = parse_output('Action: get_weather\nAction Input: {"city": "\\u5317\\u4eac"}', NAMES)
    assert calls_of(out) == [("get_weather", '{"city": "北京"}')]


@pytest.mark.parametrize(
    "json_text",
    ['```{"city": "Paris"}```', '```json\n{"city": "Paris"}\n```', '  \n{"city": "Paris"}  '],
)
def test_fences_and_whitespace_are_tolerated(json_text):
    out = parse_output(f"Action:  get_weather \n Action Input: {json_text}", NAMES)
    assert calls_of(out) == [("get_weather", '{"city": "Paris"}')]


@pytest.mark.parametrize(
    "text",
    [
        'Action: send_email\nAction Input: {"to": "x"}',  # unknown tool
        'Action: get_weather\nAction Input: {"city": "Paris"',  # cut off (max_tokens)
        'Action: get_weather\nAction Input: ["Paris"]',  # not an object
        "Action: get_weather\nAction Input: city=Paris",  # not JSON
        'Action: get_weather\nAction Input: {"x": NaN}',  # not strict JSON
        'Action: get_weather\nThe input is {"city": "Paris"}',  # no Action Input
        "Action: get_weather",  # nothing after the name
    ],
)
def test_invalid_first_call_returns_whole_output_as_content(text):
    out = parse_output("Sure. " + text, NAMES)
    assert out.tool_calls == []
    assert out.content == ("Sure. " + text).strip()


def test_invalid_later_block_is_dropped_as_trailing_text():
    text = 'Action: get_weather\nAction Input: {"city": "Paris"}\nAction: nope\nAction Input: {}'
    out = parse_output(text, NAMES)
    assert calls_of(out) == [("get_weather", '{"city": "Paris"}')]


def test_max_calls_keeps_only_the_first():
    text = 'Action: get_weather\nAction Input: {"city": "A"}\nAction: get_weather\nAction Input: {"city": "B"}'
    assert calls_of(parse_output(text, NAMES, max_calls=1)) == [("get_weather", '{"city": "A"}')]


def test_without_tools_text_is_returned_untouched():
    text = ' Action: get_weather\nAction Input: {"city": "Paris"}\n'
    out = parse_output(text, ())
    assert out.content == text and out.tool_calls == []


def test_plain_answer_with_tools_is_trimmed_content():
    out = parse_output("\n The weather is fine. \n", NAMES)
    assert out.content == "The weather is fine." and out.tool_calls == []


def test_streaming_events_shape_and_done():
    parser = StreamingParser(NAMES, max_calls=1)
    events = []
    for piece in ["I will", " check.\nAct", "ion: get_weather\nAction In", 'put: {"city": "Pa', 'ris"}\nObserv']:
        events += parser.feed(piece)
    assert parser.done
    events += parser.finish()
    assert events[0] == ContentDelta("I will")
    assert all("Act" not in e.text for e in events if isinstance(e, ContentDelta))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    args = [e for e in events if isinstance(e, ToolCallArguments)]
    assert [(s.index, s.name) for s in starts] == [(0, "get_weather")]
    assert "".join(a.fragment for a in args) == '{"city": "Paris"}'
    assert parser.result().content == "I will check."


def test_partial_marker_is_held_back_then_released():
    parser = StreamingParser(NAMES)
    assert parser.feed("Take Act") == [ContentDelta("Take")]
    assert parser.feed("ually nothing") == [ContentDelta(" Actually nothing")]
    assert parser.finish() == []


def test_new_call_ids_are_unique():
    assert len({new_call_id() for _ in range(1000)}) == 1000


# ---------------------------------------------------------------------------------------------
# Property: for any output and any split into deltas, assembled stream == non-streaming parse.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=3)
free_text = st.sampled_from(
    ["", " ", "\n", "Sure.", "好的,我来查一下。", "Act", "Action", "Action:", "Observation: 18C", "```", "`", "{", "}",
     "Action Input:", "get_weather", "x" * 3, "Thought: hmm\n", "👍🏽"]
)


@st.composite
def outputs(draw) -> str:
    pieces = [draw(st.lists(free_text, max_size=3).map("".join))]
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(NAMES + ("unknown", "get_weathe", "")))
        args = json.dumps(draw(json_objects), ensure_ascii=draw(st.booleans()))
        if draw(st.booleans()):
            args = args[: draw(st.integers(0, len(args)))]  # cut short
        fence_open, fence_close = draw(st.sampled_from([("", ""), ("```", "```"), ("```json\n", "\n```"), ("```", "")]))
        sep = draw(st.sampled_from(["\n", "\n\n", " \n", "\n  "]))
        pieces.append(f"Action: {name}{sep}Action Input: {fence_open}{args}{fence_close}")
        pieces.append(draw(st.lists(free_text, max_size=2).map("".join)))
    return "".join(pieces)


@st.composite
def splits(draw, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def assemble(deltas: list[str], names, max_calls):
    parser = StreamingParser(names, max_calls)
    events = [e for d in deltas for e in parser.feed(d)] + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.index for s in starts] == list(range(len(starts)))  # each call announced once, in order
    calls = [(s.name, "".join(a.fragment for a in events if isinstance(a, ToolCallArguments) and a.index == s.index))
             for s in starts]
    return content, calls, parser


@settings(max_examples=600, deadline=None)
@given(data=st.data(), max_calls=st.sampled_from([None, 1]), tools_offered=st.booleans())
def test_stream_equals_non_stream(data, max_calls, tools_offered):
    names = NAMES if tools_offered else ()
    text = data.draw(outputs())
    deltas = data.draw(splits(text))
    content, calls, parser = assemble(deltas, names, max_calls)
    expected = parse_output(text, names, max_calls)
    assert calls == calls_of(expected)
    assert (content if content or not calls else None) == expected.content
    for _, arguments in calls:
        assert isinstance(json.loads(arguments), dict)
    if not calls and names:
        assert content == text.strip()  # nothing lost
    # Stopping at `done` (as the engine does) changes nothing either.
    if parser.done:
        consumed = parser.text
        assert calls_of(parse_output(consumed, names, max_calls)) == calls


# ---------------------------------------------------------------------------------------------
# Constrained mode: output generated under a grammar (server/format/grammar.py).


def test_constrained_call_is_announced_at_its_name_and_arguments_stream():
    parser = StreamingParser(NAMES, constrained=True)
    events = parser.feed("Action: get_weather\nAction Input:")  # the forced prefix of a named call
    assert [type(e) for e in events] == [ToolCallStart]
    deltas = [' {"ci', 'ty": "Pa', 'ris"}']
    fragments = [e.fragment for d in deltas for e in parser.feed(d)]
    assert fragments == ['{"ci', 'ty": "Pa', 'ris"}']
    assert parser.finish() == [] and not parser.cut_in_call
    assert calls_of(parser.result()) == [("get_weather", '{"city": "Paris"}')]


def test_constrained_arguments_are_passed_through_as_written():
    out = parse_output('Action: get_weather\nAction Input: {"city": "\\u5317"}', NAMES, constrained=True)
    assert calls_of(out) == [("get_weather", '{"city": "\\u5317"}')]


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        ('Action: get_weather\nAction Input: {"city": "Pa', [("get_weather", '{"city": "Pa')]),
        ("Action: get_weather\nAction In", [("get_weather", "")]),
        ("Action: get_wea", []),
    ],
)
def test_constrained_cut_in_call_is_reported(text, calls):
    parser = StreamingParser(NAMES, constrained=True)
    parser.feed(text)
    parser.finish()
    assert parser.cut_in_call
    assert calls_of(parser.result()) == calls
    assert parser.result().content in (None, "")


def test_constrained_preamble_and_parallel_calls():
    text = 'Let me see.\nAction: get_weather\nAction Input: {"city": "Paris"}\nAction: get-time\nAction Input: {}'
    out = parse_output(text, NAMES, constrained=True)
    assert out.content == "Let me see."
    assert calls_of(out) == [("get_weather", '{"city": "Paris"}'), ("get-time", "{}")]
    assert calls_of(parse_output(text, NAMES, 1, constrained=True)) == [("get_weather", '{"city": "Paris"}')]


@st.composite
def constrained_outputs(draw) -> str:
    """What a grammar lets through (optionally cut short by max_tokens), or, rarely, anything."""
    if draw(st.integers(0, 9)) == 0:
        return draw(outputs())
    preamble = draw(st.sampled_from(["", "Sure.\n", "好的 \n", "Ac tion\n"]))
    calls = [
        f"Action: {draw(st.sampled_from(NAMES))}\nAction Input: "
        + json.dumps(draw(json_objects), ensure_ascii=draw(st.booleans()))
        for _ in range(draw(st.integers(1, 3)))
    ]
    text = preamble + "\n".join(calls)
    return text[: draw(st.integers(0, len(text)))] if draw(st.booleans()) else text


@settings(max_examples=400, deadline=None)
@given(data=st.data(), max_calls=st.sampled_from([None, 1]))
def test_constrained_stream_equals_non_stream(data, max_calls):
    text = data.draw(constrained_outputs())
    deltas = data.draw(splits(text))
    parser = StreamingParser(NAMES, max_calls, constrained=True)
    events = [e for d in deltas for e in parser.feed(d)] + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.index for s in starts] == list(range(len(starts)))
    calls = [(s.name, "".join(a.fragment for a in events if isinstance(a, ToolCallArguments) and a.index == s.index))
             for s in starts]
    expected = parse_output(text, NAMES, max_calls, constrained=True)
    assert calls == calls_of(expected)
    assert (content if content or not calls else None) == expected.content
    assert calls_of(parser.result()) == calls
    if not calls:
        assert content == text.strip() or ACTION in text  # nothing lost, unless a call header was cut
