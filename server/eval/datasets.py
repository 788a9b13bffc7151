"""Loaders: ``bfcl:FILE``, ``glaive:FILE``, ``acebench:FILE`` -> a :class:`Dataset` of uniform :class:`Case`s.

Every malformed record raises :class:`DatasetError` naming the file and line, before any request is sent.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from server.eval.bfcl_types import bfcl_to_openai_tools, openai_name, with_python_hint
from server.eval.cases import Case, DatasetError, Expected, PossibleCall
from server.eval.judge import expected_call

KINDS = ("bfcl", "glaive", "acebench")


@dataclass(frozen=True)
class Dataset:
    """The cases of one data file; ``name`` is the file's stem, ``kind`` its format."""

    name: str
    kind: str
    path: str
    cases: list[Case]


# ---------------------------------------------------------------------------------------------
# Reading records with their line numbers


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(path, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(path, None, f"cannot read: {exc}") from None


def read_json_lines(path: pathlib.Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON Lines file (BFCL's and ACEBench's
    ``.json`` files are JSON Lines)."""
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(path, number, f"not valid JSON (column {exc.colno}): {exc.msg}") from None
        if not isinstance(record, dict):
            raise DatasetError(path, number, f"expected a JSON object, got {type(record).__name__}")
        yield number, record


def read_json_records(path: pathlib.Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number where it starts, object) for each element of a JSON array file, or of a JSON Lines
    file (LLaMA-Factory reads both)."""
    text = _read_text(path)
    start = len(text) - len(text.lstrip())
    if not text[start:].startswith("["):
        yield from read_json_lines(path)
        return
    decoder = json.JSONDecoder()
    index = start + 1
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        if index >= len(text):
            raise DatasetError(path, text.count("\n", 0, index) + 1, "the JSON array is not closed")
        if text[index] == "]":
            return
        line = text.count("\n", 0, index) + 1
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as exc:
            raise DatasetError(path, exc.lineno, f"not valid JSON (column {exc.colno}): {exc.msg}") from None
        if not isinstance(record, dict):
            raise DatasetError(path, line, f"expected a JSON object, got {type(record).__name__}")
        yield line, record


def _field(record: dict[str, Any], key: str, kind: type | tuple[type, ...], path: pathlib.Path, line: int) -> Any:
    if key not in record:
        raise DatasetError(path, line, f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DatasetError(path, line, f"field {key!r} should be {names}, got {type(value).__name__}")
    return value


def _check_functions(functions: list[Any], path: pathlib.Path, line: int) -> None:
    for function in functions:
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DatasetError(path, line, f"a function document without a name: {str(function)[:80]}")


def _check_names(answers: list[PossibleCall], functions: list[dict[str, Any]], path: pathlib.Path, line: int) -> None:
    names = {f["name"] for f in functions}
    for answer in answers:
        if not isinstance(answer, dict) or len(answer) != 1:
            raise DatasetError(path, line, f"an expected call should be {{name: arguments}}, got {str(answer)[:80]}")
        ((name, params),) = answer.items()
        if name not in names:
            raise DatasetError(path, line, f"expected call {name!r} is not among the offered functions {sorted(names)}")
        if not isinstance(params, dict):
            raise DatasetError(path, line, f"arguments of expected call {name!r} should be an object")


def _openai_tools(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": f} for f in functions]


# ---------------------------------------------------------------------------------------------
# BFCL v4 single-turn


def _bfcl_category(path: pathlib.Path) -> str:
    match = re.fullmatch(r"BFCL_v\d+_(\w+)\.json", path.name)
    if not match:
        raise DatasetError(path, None, "a BFCL file is named BFCL_v<N>_<category>.json (the category picks the rules)")
    return match.group(1)


def _bfcl_answers(path: pathlib.Path) -> dict[str, tuple[int, list[Any]]]:
    answer_path = path.parent / "possible_answer" / path.name
    if not answer_path.exists():
        raise DatasetError(path, None, f"its possible answers are not at {answer_path} (BFCL's layout)")
    answers = {}
    for line, record in read_json_lines(answer_path):
        answers[str(_field(record, "id", (str, int), answer_path, line))] = (line, _field(record, "ground_truth", list, answer_path, line))
    return answers


def load_bfcl(path: pathlib.Path, *, language_hint: bool = True) -> list[Case]:
    """A BFCL v4 single-turn file; answers from ``possible_answer/<same name>`` unless (ir)relevance.
    ``language_hint`` is bfcl_eval's ``include_language_specific_hint`` (on in BFCL's own runs)."""
    category = _bfcl_category(path)
    if "irrelevance" in category:
        expect_kind = "no_call"
    elif "relevance" in category:
        expect_kind = "any_call"
    else:
        expect_kind = "calls"
    answers = _bfcl_answers(path) if expect_kind == "calls" else {}
    answer_path = path.parent / "possible_answer" / path.name
    cases = []
    for line, record in read_json_lines(path):
        case_id = str(_field(record, "id", (str, int), path, line))
        question = _field(record, "question", list, path, line)
        if len(question) != 1 or not isinstance(question[0], list):
            raise DatasetError(path, line, f"{case_id}: only single-turn entries (one list of messages) are supported")
        functions = _field(record, "function", list, path, line)
        _check_functions(functions, path, line)
        hinted = with_python_hint(functions) if language_hint else functions
        judged = [{**f, "name": openai_name(f["name"])} for f in hinted]
        expected = Expected(expect_kind)
        if expect_kind == "calls":
            if case_id not in answers:
                raise DatasetError(answer_path, None, f"no possible answer for {case_id!r} ({path}:{line})")
            answer_line, ground_truth = answers[case_id]
            calls = [{openai_name(name): params for name, params in call.items()} if isinstance(call, dict) else call for call in ground_truth]
            _check_names(calls, judged, answer_path, answer_line)
            expected = Expected("calls", [calls])
        cases.append(Case(case_id, path.stem, category, question[0], bfcl_to_openai_tools(hinted), judged, expected))
    return cases


# ---------------------------------------------------------------------------------------------
# LLaMA-Factory sharegpt tool data (glaive)


def _glaive_calls(value: Any, path: pathlib.Path, line: int) -> list[tuple[str, dict[str, Any]]]:
    """A ``function_call`` turn's value: ``{"name", "arguments"}`` (or a list of them), arguments an
    object or a JSON string of one."""
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as exc:
        raise DatasetError(path, line, f"a function_call value is not JSON: {exc.msg}") from None
    calls = []
    for call in parsed if isinstance(parsed, list) else [parsed]:
        arguments = call.get("arguments") if isinstance(call, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
            raise DatasetError(path, line, f"a function_call should be {{\"name\", \"arguments\": {{...}}}}, got {str(value)[:80]}")
        calls.append((call["name"], arguments))
    return calls


def load_glaive(path: pathlib.Path) -> list[Case]:
    """Every ``function_call`` turn is a case: the conversation before it -> the expected call(s)."""
    cases = []
    for row, (line, record) in enumerate(read_json_records(path)):
        conversations = _field(record, "conversations", list, path, line)
        tools_field = record.get("tools") or "[]"
        try:
            functions = json.loads(tools_field) if isinstance(tools_field, str) else tools_field
        except json.JSONDecodeError as exc:
            raise DatasetError(path, line, f"field 'tools' is not JSON: {exc.msg}") from None
        if not isinstance(functions, list):
            raise DatasetError(path, line, "field 'tools' should be a JSON list of functions")
        _check_functions(functions, path, line)
        by_name = {f["name"]: f for f in functions}
        messages: list[dict[str, Any]] = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        last_call_id = None
        for turn_index, turn in enumerate(conversations):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise DatasetError(path, line, f"turn {turn_index} should be {{\"from\", \"value\": string}}")
            role, value = turn.get("from"), turn["value"]
            if role == "human":
                messages.append({"role": "user", "content": value})
            elif role == "gpt":
                messages.append({"role": "assistant", "content": value})
            elif role == "observation":
                messages.append({"role": "tool", "content": value, **({"tool_call_id": last_call_id} if last_call_id else {})})
            elif role == "function_call":
                calls = _glaive_calls(value, path, line)
                unknown = [name for name, _ in calls if name not in by_name]
                if unknown:
                    raise DatasetError(path, line, f"turn {turn_index} calls {unknown}, not among the row's tools")
                answers = [expected_call(by_name[name], arguments) for name, arguments in calls]
                cases.append(
                    Case(f"{path.stem}_{row}_{turn_index}", path.stem, "glaive", list(messages), _openai_tools(functions), functions, Expected("calls", [answers]))
                )
                tool_calls = [
                    {"id": f"call_{row}_{turn_index}_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
                    for i, (name, arguments) in enumerate(calls)
                ]
                last_call_id = tool_calls[-1]["id"]
                messages.append({"role": "assistant", "content": None, "tool_calls": tool_calls})
            else:
                raise DatasetError(path, line, f"turn {turn_index} has unknown role {role!r} (human, gpt, function_call, observation)")
    return cases


# ---------------------------------------------------------------------------------------------
# ACEBench


_ACEBENCH_CATEGORIES = re.compile(r"normal_single_turn_single_function|normal_single_turn_parallel_function|normal_similar_api|normal_atom_\w+|special_irrelevant")


def _acebench_category(path: pathlib.Path) -> str:
    match = re.fullmatch(r"data_(\w+)\.json", path.name)
    if not match or not _ACEBENCH_CATEGORIES.fullmatch(match.group(1)):
        raise DatasetError(
            path, None, "supported ACEBench files: data_normal_single_turn_*, data_normal_similar_api, data_normal_atom_*, data_special_irrelevant"
        )
    return match.group(1)


def _acebench_messages(question: str, time: str, path: pathlib.Path, line: int) -> list[dict[str, Any]]:
    """ACEBench writes the dialogue as ``user: ...`` / ``system: ...`` lines (``system`` is the
    assistant speaking); a turn runs until the next such prefix.  ``time`` becomes a system message."""
    parts = re.split(r"(?m)^(user|system):\s?", question)
    if parts[0].strip() or len(parts) < 3:
        raise DatasetError(path, line, "'question' should start with 'user: '")
    messages: list[dict[str, Any]] = [{"role": "system", "content": time}] if time else []
    for speaker, text in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": "user" if speaker == "user" else "assistant", "content": text.strip()})
    return messages


def _acebench_function(function: dict[str, Any]) -> dict[str, Any]:
    """ACEBench names the schema ``parameters`` in most files and ``arguments`` in some atom files."""
    schema = function.get("parameters") or function.get("arguments") or function.get("_arguments") or {"type": "object", "properties": {}}
    return {"name": function["name"], "description": function.get("description", ""), "parameters": schema}


def _acebench_answers(ground_truth: Any, functions: list[dict[str, Any]], path: pathlib.Path, line: int) -> list[list[PossibleCall]]:
    """``{name: args, ...}`` (a repeated function as ``name_1``, ``name_2``) or a list of such
    alternatives -> alternatives of expected calls."""
    by_name = {f["name"]: f for f in functions}
    alternatives = []
    for option in ground_truth if isinstance(ground_truth, list) else [ground_truth]:
        if not isinstance(option, dict) or not option:
            raise DatasetError(path, line, f"ground_truth should be {{name: arguments}}, got {str(option)[:80]}")
        calls = []
        for key, arguments in option.items():
            name = key if key in by_name else re.sub(r"_\d+$", "", key)
            if name not in by_name or not isinstance(arguments, dict):
                raise DatasetError(path, line, f"expected call {key!r} is not among the offered functions {sorted(by_name)}")
            calls.append(expected_call(by_name[name], arguments))
        alternatives.append(calls)
    return alternatives


def load_acebench(path: pathlib.Path) -> list[Case]:
    """An ACEBench single-turn file with ``possible_answer/<same name>`` beside it (special_irrelevant:
    the ground truth is a refusal, so the expectation is no call)."""
    category = _acebench_category(path)
    answer_path = path.parent / "possible_answer" / path.name
    answers: dict[str, tuple[int, Any]] = {}
    if category != "special_irrelevant":
        if not answer_path.exists():
            raise DatasetError(path, None, f"its possible answers are not at {answer_path} (ACEBench's layout)")
        answers = {str(_field(r, "id", (str, int), answer_path, n)): (n, _field(r, "ground_truth", (dict, list), answer_path, n)) for n, r in read_json_lines(answer_path)}
    cases = []
    for line, record in read_json_lines(path):
        case_id = str(_field(record, "id", (str, int), path, line))
        messages = _acebench_messages(_field(record, "question", str, path, line), str(record.get("time") or ""), path, line)
        raw_functions = _field(record, "function", list, path, line)
        _check_functions(raw_functions, path, line)
        functions = [_acebench_function(f) for f in raw_functions]
        if category == "special_irrelevant":
            expected = Expected("no_call")
        else:
            if case_id not in answers:
                raise DatasetError(answer_path, None, f"no possible answer for {case_id!r} ({path}:{line})")
            answer_line, ground_truth = answers[case_id]
            expected = Expected("calls", _acebench_answers(ground_truth, functions, answer_path, answer_line))
        cases.append(Case(case_id, path.stem, category, messages, _openai_tools(functions), functions, expected))
    return cases


# ---------------------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[[pathlib.Path], list[Case]]] = {"glaive": load_glaive, "acebench": load_acebench}


def load_dataset(spec: str, *, bfcl_language_hint: bool = True) -> Dataset:
    """``KIND:PATH`` -> its cases (KIND is one of :data:`KINDS`)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in KINDS or not path:
        raise ValueError(f"--dataset {spec!r}: expected KIND:PATH with KIND one of {', '.join(KINDS)}")
    file = pathlib.Path(path)
    if not file.is_file():
        raise DatasetError(file, None, "no such file")
    cases = load_bfcl(file, language_hint=bfcl_language_hint) if kind == "bfcl" else _LOADERS[kind](file)
    return Dataset(file.stem, kind, path, cases)
