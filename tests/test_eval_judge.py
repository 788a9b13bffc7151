"""The judge's BFCL AST rules, without a model.

Function documents and possible answers are BFCL v4 entries (simple_python_0, parallel_multiple_179) or
modelled on them, and each test states what BFCL's checker (ported rule for rule) decides.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.eval.bfcl_types import PYTHON_HINT, bfcl_to_openai_tools, openai_name, with_python_hint
from server.eval.cases import Expected
from server.eval.judge import ToolCall, Verdict, expected_call, judge, standardize_string

# BFCL_v4_simple_python.json, simple_python_0 (and its possible answer).
TRIANGLE = {
    "name": "calculate_triangle_area",
    "description": "Calculate the area of a triangle given its base and height.",
    "parameters": {
        "type": "dict",
        "properties": {
            "base": {"type": "integer", "description": "The base of the triangle."},
            "height": {"type": "integer", "description": "The height of the triangle."},
            "unit": {"type": "string", "description": "The unit of measure (defaults to 'units' if not specified)"},
        },
        "required": ["base", "height"],
    },
}
TRIANGLE_ANSWER = {"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}

# A float, a boolean, a tuple and a list parameter in BFCL's spelling (shapes from simple_python entries).
PHYSICS = {
    "name": "calculate_final_velocity",
    "description": "Calculate the final velocity of a free falling object.",
    "parameters": {
        "type": "dict",
        "properties": {
            "height": {"type": "float", "description": "The height in meters."},
            "initial_velocity": {"type": "integer", "description": "Initial velocity in m/s."},
            "gravity": {"type": "float", "description": "Gravity in m/s^2."},
            "metric": {"type": "boolean", "description": "Use metric units."},
            "point": {"type": "tuple", "items": {"type": "integer"}, "description": "A point."},
            "cities": {"type": "array", "items": {"type": "string"}, "description": "City names."},
        },
        "required": ["height"],
    },
}
PHYSICS_ANSWER = {
    "calculate_final_velocity": {
        "height": [150.0],
        "initial_velocity": [0, ""],
        "gravity": [9.81, ""],
        "metric": [True, ""],
        "point": [[1, 2], ""],
        "cities": [["New York City", "Los Angeles"], ["NYC", "LA"], ""],
    }
}

# BFCL_v4_parallel_multiple-style pair of functions (a dict parameter and a list of dicts).
USER_INFO = {
    "name": "update_user_info",
    "description": "Update user information in the database.",
    "parameters": {
        "type": "dict",
        "properties": {
            "user_id": {"type": "integer", "description": "The user ID of the customer."},
            "update_info": {
                "type": "dict",
                "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                "description": "The new information.",
            },
            "database": {"type": "string", "description": "The database."},
        },
        "required": ["user_id", "update_info"],
    },
}
DECK = {
    "name": "find_card_in_deck",
    "description": "Locate a particular card in a deck based on rank and suit.",
    "parameters": {
        "type": "dict",
        "properties": {
            "rank": {"type": "string", "description": "Rank of the card."},
            "suit": {"type": "string", "description": "Suit of the card."},
            "deck": {"type": "array", "items": {"type": "dict", "properties": {"rank": {"type": "string"}, "suit": {"type": "string"}}}},
        },
        "required": ["rank", "suit"],
    },
}
USER_ANSWER = {"update_user_info": {"user_id": [12345], "update_info": [{"name": ["John Doe"], "email": ["johndoe@example.com"]}], "database": ["CustomerInfo", ""]}}
DECK_ANSWER = {"find_card_in_deck": {"rank": ["Ace"], "suit": ["Spades"], "deck": [[], ""]}}

# BFCL_v4_parallel.json style: the same function twice.
WEATHER = {
    "name": "weather.get",
    "description": "Get the weather of a city.",
    "parameters": {"type": "dict", "properties": {"city": {"type": "string", "description": "City"}}, "required": ["city"]},
}


def call(name: str, **arguments: Any) -> ToolCall:
    return ToolCall(name, json.dumps(arguments))


def verdict(functions: list[dict[str, Any]], answers: list[dict[str, Any]], *calls: ToolCall) -> Verdict:
    return judge(functions, Expected("calls", [answers]), list(calls))


# ---------------------------------------------------------------------------------------------
# One call: names, required and optional parameters


def test_exact_answer_is_correct() -> None:
    assert verdict([TRIANGLE], [TRIANGLE_ANSWER], call("calculate_triangle_area", base=10, height=5, unit="units")) == Verdict(True, "correct")


def test_optional_parameter_marked_with_empty_string_may_be_omitted() -> None:
    assert verdict([TRIANGLE], [TRIANGLE_ANSWER], call("calculate_triangle_area", base=10, height=5)).correct


def test_optional_parameter_with_a_value_outside_the_answers_fails() -> None:
    result = verdict([TRIANGLE], [TRIANGLE_ANSWER], call("calculate_triangle_area", base=10, height=5, unit="cm"))
    assert (result.correct, result.outcome) == (False, "wrong_value")
    assert "unit" in result.detail


def test_parameter_not_marked_optional_must_be_given() -> None:
    answer = {"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units"]}}
    result = verdict([TRIANGLE], [answer], call("calculate_triangle_area", base=10, height=5))
    assert not result.correct and "not provided and not marked as optional" in result.detail


def test_missing_required_parameter_is_an_invalid_call() -> None:
    result = verdict([TRIANGLE], [TRIANGLE_ANSWER], call("calculate_triangle_area", base=10))
    assert (result.correct, result.outcome) == (False, "invalid_call")
    assert "height" in result.detail


def test_parameter_outside_the_schema_is_an_invalid_call() -> None:
    result = verdict([TRIANGLE], [TRIANGLE_ANSWER], call("calculate_triangle_area", base=10, height=5, colour="red"))
    assert (result.correct, result.outcome) == (False, "invalid_call")


def test_schema_parameter_absent_from_the_possible_answer_is_unexpected() -> None:
    answer = {"calculate_triangle_area": {"base": [10], "height": [5]}}
    result = verdict([TRIANGLE], [answer], call("calculate_triangle_area", base=10, height=5, unit="units"))
    assert (result.correct, result.outcome) == (False, "wrong_value")
    assert "Unexpected parameter: 'unit'" in result.detail


def test_wrong_value_fails() -> None:
    result = verdict([TRIANGLE], [TRIANGLE_ANSWER], call("calculate_triangle_area", base=10, height=6))
    assert (result.correct, result.outcome) == (False, "wrong_value")


def test_unoffered_function_is_an_invalid_call() -> None:
    result = verdict([TRIANGLE], [TRIANGLE_ANSWER], call("area_of_triangle", base=10, height=5))
    assert (result.correct, result.outcome) == (False, "invalid_call")
    assert "not an offered tool" in result.detail


@pytest.mark.parametrize("arguments", ['{"base": 10, "height": ', "[10, 5]", '"base=10"', ""])
def test_arguments_that_are_not_a_json_object_are_an_invalid_call(arguments: str) -> None:
    result = verdict([TRIANGLE], [TRIANGLE_ANSWER], ToolCall("calculate_triangle_area", arguments))
    assert (result.correct, result.outcome) == (False, "invalid_call")


def test_no_call_when_one_is_expected() -> None:
    assert verdict([TRIANGLE], [TRIANGLE_ANSWER]) == Verdict(False, "no_call", "expected a call, got none")


def test_more_calls_than_expected_is_a_wrong_count() -> None:
    c = call("calculate_triangle_area", base=10, height=5)
    result = verdict([TRIANGLE], [TRIANGLE_ANSWER], c, c)
    assert (result.correct, result.outcome) == (False, "wrong_count")


# ---------------------------------------------------------------------------------------------
# Types


def test_int_passes_as_float() -> None:
    assert verdict([PHYSICS], [PHYSICS_ANSWER], call("calculate_final_velocity", height=150)).correct


def test_float_does_not_pass_as_integer() -> None:
    result = verdict([PHYSICS], [PHYSICS_ANSWER], call("calculate_final_velocity", height=150.0, initial_velocity=0.0))
    assert (result.correct, result.outcome) == (False, "invalid_call")
    assert "Incorrect type for parameter 'initial_velocity'" in result.detail


def test_bool_is_not_an_integer_and_int_is_not_a_bool() -> None:
    assert not verdict([PHYSICS], [PHYSICS_ANSWER], call("calculate_final_velocity", height=150, initial_velocity=False)).correct
    assert not verdict([PHYSICS], [PHYSICS_ANSWER], call("calculate_final_velocity", height=150, metric=1)).correct
    assert verdict([PHYSICS], [PHYSICS_ANSWER], call("calculate_final_velocity", height=150, metric=True)).correct


def test_string_for_a_number_fails_unless_the_answer_is_a_string_variable() -> None:
    assert not verdict([PHYSICS], [PHYSICS_ANSWER], call("calculate_final_velocity", height="150")).correct
    variable = {"calculate_final_velocity": {"height": ["h"]}}  # BFCL's "variable": the answer's own type passes
    assert verdict([PHYSICS], [variable], call("calculate_final_velocity", height="h")).correct


def test_tuple_is_a_json_list_compared_by_value() -> None:
    assert verdict([PHYSICS], [PHYSICS_ANSWER], call("calculate_final_velocity", height=150, point=[1, 2])).correct
    # BFCL's item type check lets a list through as a "variable" of the answer's type (list), so a
    # wrong item type fails on value, as in BFCL.
    result = verdict([PHYSICS], [PHYSICS_ANSWER], call("calculate_final_velocity", height=150, point=[1, "2"]))
    assert (result.correct, result.outcome) == (False, "wrong_value")
    required_point = {"calculate_final_velocity": {"height": [150.0], "point": [[1, 2]]}}
    result = verdict([PHYSICS], [required_point], call("calculate_final_velocity", height=150, point=[1, "2"]))
    assert not result.correct and "Invalid value for parameter 'point'" in result.detail


def test_lists_compare_in_order_with_string_normalisation() -> None:
    f = "calculate_final_velocity"
    assert verdict([PHYSICS], [PHYSICS_ANSWER], call(f, height=150, cities=["new york city", "los-angeles"])).correct
    assert verdict([PHYSICS], [PHYSICS_ANSWER], call(f, height=150, cities=["NYC", "LA"])).correct
    assert not verdict([PHYSICS], [PHYSICS_ANSWER], call(f, height=150, cities=["Los Angeles", "New York City"])).correct
    assert not verdict([PHYSICS], [PHYSICS_ANSWER], call(f, height=150, cities=["New York City"])).correct


def test_json_schema_number_and_object_types_are_checked_like_float_and_dict() -> None:
    function = {
        "name": "f",
        "parameters": {"type": "object", "properties": {"x": {"type": "number"}, "o": {"type": "object"}}, "required": ["x"]},
    }
    answer = expected_call(function, {"x": 2, "o": {"k": "Value"}})
    assert answer == {"f": {"x": [2], "o": [{"k": ["Value"]}]}}
    assert verdict([function], [answer], call("f", x=2.0, o={"k": "value"})).correct
    assert verdict([function], [answer], call("f", x=2, o={"k": "Value"})).correct
    assert verdict([function], [answer], call("f", x="2", o={"k": "Value"})).outcome == "invalid_call"


# ---------------------------------------------------------------------------------------------
# String normalisation


@pytest.mark.parametrize(
    ("given", "expected"),
    [("April 1, 2024", "april12024"), ("New-York_City.", "newyorkcity"), ("a*b^c/d", "abcd"), ("It's", 'it"s'), ("鸡蛋壳", "鸡蛋壳")],
)
def test_standardize_string(given: str, expected: str) -> None:
    assert standardize_string(given) == expected


def test_strings_match_after_normalisation_only() -> None:
    answer = {"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["square meters"]}}
    f = "calculate_triangle_area"
    assert verdict([TRIANGLE], [answer], call(f, base=10, height=5, unit="Square-Meters")).correct
    assert not verdict([TRIANGLE], [answer], call(f, base=10, height=5, unit="square metres")).correct


# ---------------------------------------------------------------------------------------------
# Dicts and lists of dicts


def test_dict_parameter_checks_keys_and_normalised_values() -> None:
    f = "update_user_info"
    functions = [USER_INFO]
    good = {"name": "john doe", "email": "JohnDoe@example.com"}
    assert verdict(functions, [USER_ANSWER], call(f, user_id=12345, update_info=good)).correct
    assert not verdict(functions, [USER_ANSWER], call(f, user_id=12345, update_info={"name": "John Doe"})).correct  # missing key
    extra = {**good, "phone": "1"}
    assert "Unexpected dict key" in verdict(functions, [USER_ANSWER], call(f, user_id=12345, update_info=extra)).detail
    assert not verdict(functions, [USER_ANSWER], call(f, user_id=12345, update_info={**good, "name": "Jane"})).correct


def test_list_of_dicts_matches_in_order_and_empty_list_matches() -> None:
    f = "find_card_in_deck"
    assert verdict([DECK], [DECK_ANSWER], call(f, rank="ace", suit="spades", deck=[])).correct
    assert verdict([DECK], [DECK_ANSWER], call(f, rank="Ace", suit="Spades")).correct
    answer = {f: {"rank": ["Ace"], "suit": ["Spades"], "deck": [[{"rank": ["Ace"], "suit": ["Spades"]}, {"rank": ["Two"], "suit": ["Hearts"]}]]}}
    cards = [{"rank": "Ace", "suit": "Spades"}, {"rank": "Two", "suit": "Hearts"}]
    assert verdict([DECK], [answer], call(f, rank="Ace", suit="Spades", deck=cards)).correct
    assert not verdict([DECK], [answer], call(f, rank="Ace", suit="Spades", deck=cards[::-1])).correct
    assert not verdict([DECK], [answer], call(f, rank="Ace", suit="Spades", deck=cards[:1])).correct


# ---------------------------------------------------------------------------------------------
# Multiple and parallel


def test_multiple_picks_the_expected_function_among_several() -> None:
    functions = [USER_INFO, DECK]
    assert verdict(functions, [DECK_ANSWER], call("find_card_in_deck", rank="Ace", suit="Spades")).correct
    result = verdict(functions, [DECK_ANSWER], call("update_user_info", user_id=1, update_info={}))
    assert (result.correct, result.outcome) == (False, "wrong_tool")


def test_parallel_calls_match_in_any_order() -> None:
    functions = [USER_INFO, DECK]
    user = call("update_user_info", user_id=12345, update_info={"name": "John Doe", "email": "johndoe@example.com"})
    deck = call("find_card_in_deck", rank="Ace", suit="Spades")
    assert verdict(functions, [USER_ANSWER, DECK_ANSWER], user, deck).correct
    assert verdict(functions, [USER_ANSWER, DECK_ANSWER], deck, user).correct
    assert verdict(functions, [USER_ANSWER, DECK_ANSWER], deck).outcome == "wrong_count"


def test_parallel_same_function_each_answer_used_once() -> None:
    name = openai_name(WEATHER["name"])
    functions = [{**WEATHER, "name": name}]
    answers = [{name: {"city": ["Paris"]}}, {name: {"city": ["Tokyo"]}}]
    assert verdict(functions, answers, call(name, city="Tokyo"), call(name, city="paris")).correct
    result = verdict(functions, answers, call(name, city="Paris"), call(name, city="Paris"))
    assert (result.correct, result.outcome) == (False, "wrong_value")


def test_any_alternative_may_match() -> None:
    f = "calculate_triangle_area"
    alternatives = [[{f: {"base": [10], "height": [5]}}], [{f: {"base": [5], "height": [10]}}]]
    assert judge([TRIANGLE], Expected("calls", alternatives), [call(f, base=5, height=10)]).correct
    assert not judge([TRIANGLE], Expected("calls", alternatives), [call(f, base=5, height=5)]).correct


# ---------------------------------------------------------------------------------------------
# Irrelevance and relevance


def test_irrelevance_wants_no_call() -> None:
    expected = Expected("no_call")
    assert judge([TRIANGLE], expected, []) == Verdict(True, "correct")
    result = judge([TRIANGLE], expected, [call("calculate_triangle_area", base=1, height=2)])
    assert (result.correct, result.outcome) == (False, "unexpected_call")


def test_irrelevance_counts_an_undecodable_call_as_no_call_like_bfcl() -> None:
    assert judge([TRIANGLE], Expected("no_call"), [ToolCall("calculate_triangle_area", "not json")]).correct


def test_relevance_wants_any_decodable_call() -> None:
    expected = Expected("any_call")
    assert judge([TRIANGLE], expected, [call("calculate_triangle_area", base=99)]).correct
    assert judge([TRIANGLE], expected, []).outcome == "no_call"
    assert judge([TRIANGLE], expected, [ToolCall("calculate_triangle_area", "{")]).outcome == "invalid_call"


# ---------------------------------------------------------------------------------------------
# BFCL spelling -> OpenAI tools


def test_bfcl_types_convert_like_bfcls_openai_handler() -> None:
    (tool,) = bfcl_to_openai_tools([PHYSICS])
    params = tool["function"]["parameters"]
    assert tool["type"] == "function" and params["type"] == "object"
    assert params["properties"]["height"] == {"type": "number", "format": "float", "description": "The height in meters. This is a float type value."}
    assert params["properties"]["point"]["type"] == "array" and params["properties"]["point"]["items"] == {"type": "integer"}
    assert params["properties"]["metric"]["type"] == "boolean"
    (deck,) = bfcl_to_openai_tools([DECK])
    assert deck["function"]["parameters"]["properties"]["deck"]["items"] == {
        "type": "object",
        "properties": {"rank": {"type": "string"}, "suit": {"type": "string"}},
    }
    (user,) = bfcl_to_openai_tools([USER_INFO])
    assert user["function"]["parameters"]["properties"]["update_info"]["type"] == "object"
    assert PHYSICS["parameters"]["type"] == "dict"  # the input is not mutated


def test_bfcl_any_and_unknown_types_become_string_and_dots_become_underscores() -> None:
    function = {"name": "math.hypot", "description": "d", "parameters": {"type": "dict", "properties": {"x": {"type": "any"}, "y": {"type": "weird"}, "z": {}}}}
    (tool,) = bfcl_to_openai_tools(with_python_hint([function]))
    assert tool["function"]["name"] == "math_hypot"
    assert tool["function"]["description"] == "d" + PYTHON_HINT
    assert {k: v["type"] for k, v in tool["function"]["parameters"]["properties"].items()} == {"x": "string", "y": "string", "z": "string"}
