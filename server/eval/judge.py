"""Judge one answer by BFCL's AST rules (pure: no I/O, no model).

A port of the Python path of ``bfcl_eval.eval_checker.ast_eval.ast_checker`` (bfcl-eval 2026.3.23)
and of its runner's relevance rules, kept rule for rule so the verdicts are BFCL's:

- the call count must match; parallel calls match in any order (greedy, as BFCL matches them);
- function name, required parameters present, no parameter outside the schema *or* the possible answer;
- types by BFCL's Python mapping (an ``int`` passes as ``float``; a value of the possible answer's own
  type passes as a "variable"); arrays check their item type one level deep;
- values must be among the possible answers; strings compare after BFCL's normalisation (drop spaces and
  ``,./-_*^``, lower-case, ``'`` -> ``"``), also inside lists and one level into dicts; ``""`` among a
  parameter's answers means it may be omitted;
- irrelevance: correct when no call decodes; relevance: correct when at least one call decodes.

``bfcl-eval`` itself is not imported: it cannot be installed without its model stack (see
``bfcl_types``).  Two extensions for JSON Schema data (glaive, ACEBench), which BFCL's mapping lacks:
``number`` is checked like ``float`` and ``object`` like ``dict``; a type outside the mapping is not
type-checked (BFCL would raise).

Beyond BFCL's pass/fail, every failure gets one ``outcome`` for the report: ``no_call``,
``unexpected_call``, ``invalid_call`` (arguments not a JSON object, a tool that was not offered, or a call
off its schema: missing required / unknown parameter / wrong type), ``wrong_tool``, ``wrong_count``,
``wrong_value``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from server.eval.cases import Expected, PossibleCall

#: ast_checker.PYTHON_TYPE_MAPPING, plus JSON Schema's ``number`` and ``object``.
PYTHON_TYPES: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "number": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "object": dict,
    "any": str,
}
_NESTED_TYPES = ("array", "tuple")  # PYTHON_NESTED_TYPE_CHECK_LIST
_FLOAT_TYPES = ("float", "number")

OUTCOMES = ("correct", "no_call", "unexpected_call", "invalid_call", "wrong_tool", "wrong_count", "wrong_value", "request_error")


class ToolCall(NamedTuple):
    """A call as the server returned it: the function name and its arguments as a JSON string."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Verdict:
    """``correct`` is BFCL's pass/fail; ``outcome`` is one of :data:`OUTCOMES`; ``detail`` says why."""

    correct: bool
    outcome: str
    detail: str = ""


class Check(NamedTuple):
    """One BFCL checker result: ``error`` and ``error_type`` as BFCL words them."""

    valid: bool
    error: str = ""
    error_type: str = ""


_OK = Check(True)


# ---------------------------------------------------------------------------------------------
# BFCL's checker, rule for rule


def standardize_string(text: str) -> str:
    """BFCL's normalisation, so ``April 1, 2024`` equals ``april 1 2024``."""
    return re.sub(r"[ \,\.\/\-\_\*\^]", "", text).lower().replace("'", '"')


def _standardize(value: Any) -> Any:
    return standardize_string(value) if type(value) is str else value


def _answer_type(possible: list[Any]) -> type | None:
    """The type of the first answer that is not the "may be omitted" marker ``""``."""
    for answer in possible:
        if answer != "":
            return type(answer)
    return None


def _check_type(
    param: str, value: Any, possible: list[Any], type_name: str, expected: type, nested: type | None
) -> tuple[Check, bool]:
    """ast_checker.type_checker: (result, is_variable).  A value of the possible answer's own type is a
    "variable" and passes; nested types are checked one level deep."""
    answer_type = _answer_type(possible)
    is_variable = answer_type is not None and answer_type != expected
    nested_error = ""
    if type(value) == expected:  # noqa: E721 - BFCL compares exact types (bool is not int)
        if nested is None:
            return _OK, is_variable
        for item in possible:
            if type(item) == list and not all(  # noqa: E721
                _check_type(param, element, item, str(nested), nested, None)[0].valid for element in value
            ):
                continue
            return _OK, is_variable
        nested_error = (
            f"Nested type checking failed for parameter {param!r}. Expected outer type {type_name} with inner "
            f"type {nested}. Parameter value: {value!r}. "
        )
    if answer_type is not None and type(value) == answer_type:  # noqa: E721
        return _OK, True
    return (
        Check(
            False,
            nested_error
            + f"Incorrect type for parameter {param!r}. Expected type {type_name}, got {type(value).__name__}. "
            f"Parameter value: {value!r}.",
            "type_error:simple",
        ),
        False,
    )


def _check_string(param: str, value: str, possible: list[Any]) -> Check:
    if standardize_string(value) in [standardize_string(a) for a in possible if type(a) is str]:
        return _OK
    return Check(False, f"Invalid value for parameter {param!r}: {value!r}. Expected one of {possible}. Case insensitive.", "value_error:string")


def _check_list(param: str, value: list[Any], possible: list[Any]) -> Check:
    got = [_standardize(v) for v in value]
    if got in [[_standardize(v) for v in answer] for answer in possible if isinstance(answer, list)]:
        return _OK
    return Check(False, f"Invalid value for parameter {param!r}: {value!r}. Expected one of {possible}.", "value_error:list/tuple")


def _check_dict(param: str, value: dict[str, Any], possible: list[Any]) -> Check:
    """ast_checker.dict_checker: one of the possible dicts (each ``{key: [acceptable values]}``) must
    accept every key of ``value`` and miss none of its non-optional keys."""
    result = Check(False, f"Invalid value for parameter {param!r}: {value!r}.", "dict_checker:unclear")
    for answer in possible:
        if answer == "":
            continue
        if not isinstance(answer, dict):
            result = Check(False, f"Invalid value for parameter {param!r}: {value!r}. Expected one of {possible}.", "value_error:dict_value")
            continue
        result = _OK
        for key, item in value.items():
            if key not in answer:
                result = Check(False, f"Unexpected dict key parameter: {key!r}.", "value_error:dict_key")
                break
            accepted = [_standardize(a) for a in answer[key]]
            if _standardize(item) not in accepted:
                result = Check(False, f"Invalid value for parameter {key!r}: {item!r}. Expected one of {accepted}.", "value_error:dict_value")
                break
        if result.valid:
            for key, accepted in answer.items():
                if key not in value and "" not in accepted:
                    result = Check(False, f"Missing dict key parameter: {key!r}.", "value_error:dict_key")
                    break
        if result.valid:
            return _OK
    return result


def _check_list_of_dicts(param: str, value: list[Any], possible: list[Any]) -> Check:
    """ast_checker.list_dict_checker: same length and each dict matching, in order."""
    result = Check(False, f"Invalid value for parameter {param!r}: {value!r}.", "list_dict_checker:unclear")
    for answer in possible:
        expected_dicts = answer if isinstance(answer, list) else []  # BFCL takes len("") == 0
        if len(value) != len(expected_dicts):
            result = Check(False, "Wrong number of dictionaries in the list.", "value_error:list_dict_count")
            continue
        checks = (_check_dict(param, item, [expected]) for item, expected in zip(value, expected_dicts, strict=True))
        result = next((check for check in checks if not check.valid), _OK)
        if result.valid:
            return _OK
    return result


def _schema_of(function: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    parameters = function.get("parameters") or {}
    return parameters.get("properties") or {}, list(parameters.get("required") or [])


def check_call(function: dict[str, Any], output: dict[str, dict[str, Any]], answer: PossibleCall) -> Check:
    """ast_checker.simple_function_checker: one decoded call ``{name: params}`` against one possible call."""
    possible = next(iter(answer.values()))
    name = function["name"]
    if name not in output:
        return Check(False, f"Function name {name!r} not found in model output.", "simple_function_checker:wrong_func_name")
    params = output[name]
    properties, required = _schema_of(function)
    for param in required:
        if param not in params:
            return Check(False, f"Missing required parameter: {param!r}.", "simple_function_checker:missing_required")
    for param, value in params.items():
        if param not in properties or param not in possible:
            return Check(False, f"Unexpected parameter: {param!r}.", "simple_function_checker:unexpected_param")
        schema = properties[param]
        type_name = schema.get("type")
        expected = PYTHON_TYPES.get(type_name, type(value))  # outside the mapping: not type-checked
        nested = PYTHON_TYPES.get((schema.get("items") or {}).get("type")) if type_name in _NESTED_TYPES else None
        if type_name in _FLOAT_TYPES and type(value) is int:
            value = float(value)  # Python's int -> float promotion
        type_check, is_variable = _check_type(param, value, possible[param], str(type_name), expected, nested)
        if not type_check.valid:
            return type_check
        if not is_variable:
            if expected is dict:
                check = _check_dict(param, value, possible[param])
            elif expected is list and nested is dict:
                check = _check_list_of_dicts(param, value, possible[param])
            elif expected is str:
                check = _check_string(param, value, possible[param])
            elif expected is list:
                check = _check_list(param, value, possible[param])
            else:
                check = None
            if check is not None:
                if not check.valid:
                    return check
                continue
        if value not in possible[param]:
            return Check(False, f"Invalid value for parameter {param!r}: {value!r}. Expected one of {possible[param]}.", "value_error:others")
    for param, accepted in possible.items():
        if param not in params and "" not in accepted:
            return Check(False, f"Optional parameter {param!r} not provided and not marked as optional.", "simple_function_checker:missing_optional")
    return _OK


def _find_function(functions: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
    for function in functions:
        if function["name"] == name:
            return function
    raise KeyError(f"possible answer names {name!r}, which is not among the case's functions")


def check_calls(functions: Sequence[dict[str, Any]], outputs: list[dict[str, dict[str, Any]]], answers: list[PossibleCall]) -> Check:
    """ast_checker's simple / multiple / parallel checkers in one: they all require the same count and
    (for one call) reduce to matching it; parallel answers match the outputs in any order, greedily."""
    if len(outputs) != len(answers):
        return Check(False, f"Wrong number of functions: expected {len(answers)}, got {len(outputs)}.", "wrong_count")
    matched: set[int] = set()
    for i, answer in enumerate(answers):
        function = _find_function(functions, next(iter(answer)))
        errors = []
        for index, output in enumerate(outputs):
            if index in matched:
                continue
            check = check_call(function, output, answer)
            if check.valid:
                matched.add(index)
                break
            errors.append(f"[output {index}] {check.error}")
        else:
            return Check(False, f"No output matches possible answer {i}: " + " ".join(errors), "cannot_find_match")
    return _OK


# ---------------------------------------------------------------------------------------------
# Decoding the server's answer and classifying failures


def decode_calls(calls: Sequence[ToolCall]) -> tuple[list[dict[str, dict[str, Any]]] | None, str]:
    """BFCL's FC decoding (``json.loads`` of each call's arguments) into ``[{name: params}]``;
    ``None`` and the reason when any call's arguments are not a JSON object."""
    decoded = []
    for call in calls:
        try:
            params = json.loads(call.arguments)
        except (json.JSONDecodeError, TypeError) as exc:
            return None, f"arguments of {call.name!r} are not JSON: {exc}"
        if not isinstance(params, dict):
            return None, f"arguments of {call.name!r} are not a JSON object: {call.arguments!r}"
        decoded.append({call.name: params})
    return decoded, ""


def _off_schema(function: dict[str, Any], params: dict[str, Any]) -> str:
    """Why a call does not fit its own function's schema ("" when it fits), whatever the answer."""
    properties, required = _schema_of(function)
    missing = [p for p in required if p not in params]
    if missing:
        return f"{function['name']}: missing required {missing}"
    unknown = [p for p in params if p not in properties]
    if unknown:
        return f"{function['name']}: unknown parameters {unknown}"
    for param, value in params.items():
        type_name = properties[param].get("type")
        expected = PYTHON_TYPES.get(type_name)
        if expected is None or type(value) is expected or (type_name in _FLOAT_TYPES and type(value) is int):
            continue
        return f"{function['name']}: {param!r} should be {type_name}, got {type(value).__name__}"
    return ""


def _classify(functions: Sequence[dict[str, Any]], outputs: list[dict[str, dict[str, Any]]], answers: list[PossibleCall]) -> tuple[str, str]:
    """The outcome of a failed check, and for an invalid call the reason (else "")."""
    by_name = {f["name"]: f for f in functions}
    for output in outputs:
        ((name, params),) = output.items()
        if name not in by_name:
            return "invalid_call", f"{name!r} is not an offered tool"
        if reason := _off_schema(by_name[name], params):
            return "invalid_call", reason
    got = {next(iter(o)) for o in outputs}
    if not got <= {next(iter(a)) for a in answers}:
        return "wrong_tool", ""
    if len(outputs) != len(answers):
        return "wrong_count", ""
    return "wrong_value", ""


def judge(functions: Sequence[dict[str, Any]], expected: Expected, calls: Sequence[ToolCall]) -> Verdict:
    """BFCL's verdict on the calls a server returned for one case, with the failure's outcome."""
    decoded, decode_error = decode_calls(calls)
    if expected.kind == "no_call":
        # BFCL: irrelevance passes when nothing decodes as a call (an undecodable call counts as none).
        if not decoded:
            return Verdict(True, "correct")
        return Verdict(False, "unexpected_call", f"expected no call, got {[next(iter(d)) for d in decoded]}")
    if not calls:
        return Verdict(False, "no_call", "expected a call, got none")
    if decoded is None:
        return Verdict(False, "invalid_call", decode_error)
    if expected.kind == "any_call":
        return Verdict(True, "correct")
    errors = []
    for answers in expected.alternatives:
        check = check_calls(functions, decoded, answers)
        if check.valid:
            return Verdict(True, "correct")
        errors.append(check.error)
    outcome, reason = _classify(functions, decoded, expected.alternatives[0])
    return Verdict(False, outcome, "; ".join(filter(None, [reason, *errors])))


def expected_call(function: dict[str, Any], arguments: dict[str, Any]) -> PossibleCall:
    """One exact expected call (glaive, ACEBench) in BFCL's possible-answer shape, so that
    :func:`check_call` takes the path BFCL takes for the parameter's type: a dict becomes one possible
    ``{key: [value]}`` dict, a list of dicts one list of those, anything else the single answer."""
    properties, _ = _schema_of(function)
    possible: dict[str, list[Any]] = {}
    for param, value in arguments.items():
        schema = properties.get(param) or {}
        type_name = schema.get("type")
        expected = PYTHON_TYPES.get(type_name, type(value))
        nested = PYTHON_TYPES.get((schema.get("items") or {}).get("type")) if type_name in _NESTED_TYPES else None
        if expected is dict and isinstance(value, dict):
            possible[param] = [{key: [item] for key, item in value.items()}]
        elif expected is list and nested is dict and isinstance(value, list) and all(isinstance(v, dict) for v in value):
            possible[param] = [[{key: [item] for key, item in v.items()} for v in value]]
        else:
            possible[param] = [value]
    return {function["name"]: possible}
