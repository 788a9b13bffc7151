"""Loading BFCL, glaive and ACEBench files into cases; malformed files name their file and line."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from server.eval.bfcl_types import PYTHON_HINT
from server.eval.cases import DatasetError
from server.eval.datasets import load_dataset
from server.eval.judge import ToolCall, judge

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"

BFCL_FUNCTION = {
    "name": "math.factorial",
    "description": "Calculate the factorial of a given number.",
    "parameters": {"type": "dict", "properties": {"number": {"type": "integer", "description": "The number."}}, "required": ["number"]},
}


def write_lines(path: pathlib.Path, records: list[Any]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def bfcl_file(tmp_path: pathlib.Path, category: str = "simple_python", answers: list[Any] | None = None) -> pathlib.Path:
    entry = {"id": f"{category}_0", "question": [[{"role": "user", "content": "5!?"}]], "function": [BFCL_FUNCTION]}
    path = write_lines(tmp_path / f"BFCL_v4_{category}.json", [entry])
    if answers is not None:
        write_lines(tmp_path / "possible_answer" / path.name, answers)
    return path


# ---------------------------------------------------------------------------------------------
# BFCL


def test_bfcl_case_is_what_bfcls_openai_handler_sends(tmp_path: pathlib.Path) -> None:
    path = bfcl_file(tmp_path, answers=[{"id": "simple_python_0", "ground_truth": [{"math.factorial": {"number": [5]}}]}])
    dataset = load_dataset(f"bfcl:{path}")
    (case,) = dataset.cases
    assert (dataset.name, dataset.kind, case.id, case.category) == ("BFCL_v4_simple_python", "bfcl", "simple_python_0", "simple_python")
    assert case.messages == [{"role": "user", "content": "5!?"}]
    assert case.tools == [
        {
            "type": "function",
            "function": {
                "name": "math_factorial",
                "description": BFCL_FUNCTION["description"] + PYTHON_HINT,
                "parameters": {"type": "object", "properties": {"number": {"type": "integer", "description": "The number."}}, "required": ["number"]},
            },
        }
    ]
    assert case.functions[0]["name"] == "math_factorial" and case.functions[0]["parameters"]["type"] == "dict"
    assert (case.expected.kind, case.expected.alternatives) == ("calls", [[{"math_factorial": {"number": [5]}}]])


def test_bfcl_without_the_language_hint_sends_descriptions_as_written(tmp_path: pathlib.Path) -> None:
    path = bfcl_file(tmp_path, answers=[{"id": "simple_python_0", "ground_truth": [{"math.factorial": {"number": [5]}}]}])
    (case,) = load_dataset(f"bfcl:{path}", bfcl_language_hint=False).cases
    assert case.tools[0]["function"]["description"] == BFCL_FUNCTION["description"]


@pytest.mark.parametrize(("category", "kind"), [("irrelevance", "no_call"), ("live_irrelevance", "no_call"), ("live_relevance", "any_call")])
def test_bfcl_relevance_files_need_no_answers(tmp_path: pathlib.Path, category: str, kind: str) -> None:
    (case,) = load_dataset(f"bfcl:{bfcl_file(tmp_path, category)}").cases
    assert case.expected.kind == kind and case.category == category


def test_bfcl_without_possible_answer_dir(tmp_path: pathlib.Path) -> None:
    path = bfcl_file(tmp_path)
    with pytest.raises(DatasetError, match=r"BFCL_v4_simple_python\.json: its possible answers are not at .*possible_answer"):
        load_dataset(f"bfcl:{path}")


def test_bfcl_file_name_must_give_the_category(tmp_path: pathlib.Path) -> None:
    path = write_lines(tmp_path / "simple.json", [])
    with pytest.raises(DatasetError, match=r"simple\.json: a BFCL file is named BFCL_v<N>_<category>\.json"):
        load_dataset(f"bfcl:{path}")


def test_bfcl_bad_json_line_names_file_and_line(tmp_path: pathlib.Path) -> None:
    path = bfcl_file(tmp_path, answers=[{"id": "simple_python_0", "ground_truth": [{"math.factorial": {"number": [5]}}]}])
    path.write_text(path.read_text() + "\n{not json\n")
    with pytest.raises(DatasetError, match=rf"{path}:3: not valid JSON"):
        load_dataset(f"bfcl:{path}")


def test_bfcl_missing_field_names_file_and_line(tmp_path: pathlib.Path) -> None:
    path = write_lines(tmp_path / "BFCL_v4_irrelevance.json", [{"id": "a", "question": [[]], "function": []}, {"id": "b", "question": [[]]}])
    with pytest.raises(DatasetError, match=rf"{path}:2: missing field 'function'"):
        load_dataset(f"bfcl:{path}")


def test_bfcl_answer_naming_an_unoffered_function(tmp_path: pathlib.Path) -> None:
    path = bfcl_file(tmp_path, answers=[{"id": "simple_python_0", "ground_truth": [{"math.gamma": {"number": [5]}}]}])
    with pytest.raises(DatasetError, match=r"possible_answer/BFCL_v4_simple_python\.json:1: expected call 'math_gamma' is not among"):
        load_dataset(f"bfcl:{path}")


def test_bfcl_missing_answer_for_an_id(tmp_path: pathlib.Path) -> None:
    path = bfcl_file(tmp_path, answers=[{"id": "other", "ground_truth": []}])
    with pytest.raises(DatasetError, match=r"no possible answer for 'simple_python_0'"):
        load_dataset(f"bfcl:{path}")


def test_bfcl_multi_turn_entries_are_refused(tmp_path: pathlib.Path) -> None:
    entry = {"id": "x", "question": [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], "function": []}
    path = write_lines(tmp_path / "BFCL_v4_irrelevance.json", [entry])
    with pytest.raises(DatasetError, match=rf"{path}:1: x: only single-turn"):
        load_dataset(f"bfcl:{path}")


# ---------------------------------------------------------------------------------------------
# glaive (LLaMA-Factory sharegpt)

GLAIVE_TOOLS = [{"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def glaive_row(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"conversations": [{"from": f, "value": v} for f, v in turns], "tools": json.dumps(GLAIVE_TOOLS)}


def test_glaive_every_function_call_turn_is_a_case_with_its_history(tmp_path: pathlib.Path) -> None:
    call = lambda city: json.dumps({"name": "get_weather", "arguments": {"city": city}})  # noqa: E731
    row = glaive_row(("human", "Paris?"), ("function_call", call("Paris")), ("observation", "18C"), ("gpt", "18C."), ("human", "Tokyo?"), ("function_call", call("Tokyo")))
    path = tmp_path / "g.json"
    path.write_text(json.dumps([glaive_row(("human", "hi"), ("gpt", "hello")), row], indent=2))
    first, second = load_dataset(f"glaive:{path}").cases
    assert first.messages == [{"role": "user", "content": "Paris?"}]
    assert first.expected.alternatives == [[{"get_weather": {"city": ["Paris"]}}]]
    assert first.tools == [{"type": "function", "function": GLAIVE_TOOLS[0]}]
    assert [m["role"] for m in second.messages] == ["user", "assistant", "tool", "assistant", "user"]
    assert second.messages[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert second.messages[2]["tool_call_id"] == second.messages[1]["tool_calls"][0]["id"]
    assert second.expected.alternatives == [[{"get_weather": {"city": ["Tokyo"]}}]]


def test_glaive_json_lines_are_accepted_too(tmp_path: pathlib.Path) -> None:
    path = write_lines(tmp_path / "g.jsonl", [glaive_row(("human", "Paris?"), ("function_call", '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}'))])
    (case,) = load_dataset(f"glaive:{path}").cases
    assert case.expected.alternatives == [[{"get_weather": {"city": ["Paris"]}}]]


def test_glaive_bad_row_names_the_line_it_starts_on(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "g.json"
    good = glaive_row(("human", "hi"), ("gpt", "hello"))
    path.write_text(json.dumps([good, {"tools": "[]"}], indent=2))
    start = [n for n, line in enumerate(path.read_text().splitlines(), start=1) if line == "  {"][1]  # the second row's brace
    with pytest.raises(DatasetError, match=rf"{path}:{start}: missing field 'conversations'"):
        load_dataset(f"glaive:{path}")


@pytest.mark.parametrize(
    ("turn", "message"),
    [
        (("function_call", "{oops"), "a function_call value is not JSON"),
        (("function_call", '{"name": "get_weather"}'), "a function_call should be"),
        (("function_call", '{"name": "nope", "arguments": {}}'), r"calls \['nope'\], not among the row's tools"),
        (("robot", "x"), "unknown role 'robot'"),
    ],
)
def test_glaive_malformed_turns(tmp_path: pathlib.Path, turn: tuple[str, str], message: str) -> None:
    path = write_lines(tmp_path / "g.json", [glaive_row(("human", "hi"), ("gpt", "hello")), glaive_row(("human", "x"), turn)])
    with pytest.raises(DatasetError, match=rf"{path}:2: .*{message}"):
        load_dataset(f"glaive:{path}")


def test_glaive_truncated_array(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "g.json"
    path.write_text('[\n {"conversations": []},\n {"conversations": [\n')
    with pytest.raises(DatasetError, match=rf"{path}:4: not valid JSON"):
        load_dataset(f"glaive:{path}")


# ---------------------------------------------------------------------------------------------
# ACEBench

ACE_FUNCTION = {"name": "get_weather", "description": "天气", "arguments": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def acebench_file(tmp_path: pathlib.Path, category: str, question: str, ground_truth: Any) -> pathlib.Path:
    path = write_lines(tmp_path / f"data_{category}.json", [{"id": f"{category}_0", "question": question, "function": [ACE_FUNCTION], "time": "今天是2024-01-01。"}])
    write_lines(tmp_path / "possible_answer" / path.name, [{"id": f"{category}_0", "ground_truth": ground_truth}])
    return path


def test_acebench_dialogue_tools_and_parallel_suffixes(tmp_path: pathlib.Path) -> None:
    question = "user: 巴黎天气?\nsystem: 好的。\n还要别的吗?\nuser: 还有东京。\n"
    path = acebench_file(tmp_path, "normal_single_turn_parallel_function", question, {"get_weather_1": {"city": "巴黎"}, "get_weather_2": {"city": "东京"}})
    (case,) = load_dataset(f"acebench:{path}").cases
    assert case.messages == [
        {"role": "system", "content": "今天是2024-01-01。"},
        {"role": "user", "content": "巴黎天气?"},
        {"role": "assistant", "content": "好的。\n还要别的吗?"},
        {"role": "user", "content": "还有东京。"},
    ]
    assert case.tools[0]["function"]["parameters"] == ACE_FUNCTION["arguments"]
    assert case.expected.alternatives == [[{"get_weather": {"city": ["巴黎"]}}, {"get_weather": {"city": ["东京"]}}]]


def test_acebench_list_ground_truth_is_alternatives(tmp_path: pathlib.Path) -> None:
    path = acebench_file(tmp_path, "normal_atom_bool", "user: 天气?\n", [{"get_weather": {"city": "A"}}, {"get_weather": {"city": "B"}}])
    (case,) = load_dataset(f"acebench:{path}").cases
    assert case.expected.alternatives == [[{"get_weather": {"city": ["A"]}}], [{"get_weather": {"city": ["B"]}}]]


def test_acebench_irrelevant_expects_no_call(tmp_path: pathlib.Path) -> None:
    path = write_lines(tmp_path / "data_special_irrelevant.json", [{"id": "i0", "question": "user: 讲个笑话\n", "function": [ACE_FUNCTION], "time": ""}])
    (case,) = load_dataset(f"acebench:{path}").cases
    assert case.expected.kind == "no_call" and case.messages == [{"role": "user", "content": "讲个笑话"}]


def test_acebench_unsupported_category(tmp_path: pathlib.Path) -> None:
    path = write_lines(tmp_path / "data_agent_multi_step.json", [])
    with pytest.raises(DatasetError, match=r"data_agent_multi_step\.json: supported ACEBench files"):
        load_dataset(f"acebench:{path}")


def test_acebench_question_without_speaker(tmp_path: pathlib.Path) -> None:
    path = acebench_file(tmp_path, "normal_atom_enum", "天气?", {"get_weather": {"city": "A"}})
    with pytest.raises(DatasetError, match=rf"{path}:1: 'question' should start with 'user: '"):
        load_dataset(f"acebench:{path}")


def test_acebench_answer_naming_an_unoffered_function(tmp_path: pathlib.Path) -> None:
    path = acebench_file(tmp_path, "normal_atom_enum", "user: 天气?\n", {"get_time": {"city": "A"}})
    with pytest.raises(DatasetError, match=r"possible_answer/data_normal_atom_enum\.json:1: expected call 'get_time'"):
        load_dataset(f"acebench:{path}")


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["bfcl", "csv:x.csv", "bfcl:"])
def test_bad_dataset_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="expected KIND:PATH"):
        load_dataset(spec)


def test_missing_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(DatasetError, match=r"nothere\.json: no such file"):
        load_dataset(f"glaive:{tmp_path / 'nothere.json'}")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside this checkout")
def test_every_shared_data_file_loads() -> None:
    """The licensed sets in ../shared/data load in full (the README's run uses them)."""
    counts = {}
    for kind, folder in (("bfcl", "bfcl"), ("glaive", "glaive"), ("acebench", "acebench_zh")):
        for path in sorted((SHARED_DATA / folder).glob("*.json")):
            counts[path.stem] = len(load_dataset(f"{kind}:{path}").cases)
    assert counts["BFCL_v4_simple_python"] == 400 and counts["BFCL_v4_live_irrelevance"] == 884
    assert counts["glaive_toolcall_zh_demo"] == 216  # function_call turns; rows 197 and 293 have none
    assert counts["data_normal_single_turn_parallel_function"] == 100 and counts["data_special_irrelevant"] == 50


def _first(values: list[Any]) -> Any:
    return next((v for v in values if v != ""), "")


def _replay(answers: list[dict[str, Any]]) -> list[ToolCall]:
    """The calls a perfect model would make for one alternative: each parameter's first acceptable
    value (dict answers one level deep, as the possible-answer shape has them); optional ones left out."""

    def value(values: list[Any]) -> Any:
        v = _first(values)
        if isinstance(v, dict):
            return {k: _first(x) for k, x in v.items() if _first(x) != ""}
        if isinstance(v, list) and v and all(isinstance(i, dict) and all(isinstance(x, list) for x in i.values()) for i in v):
            return [{k: _first(x) for k, x in i.items() if _first(x) != ""} for i in v]
        return v

    return [
        ToolCall(name, json.dumps({p: value(v) for p, v in params.items() if _first(v) != ""}, ensure_ascii=False))
        for answer in answers
        for name, params in answer.items()
    ]


#: Published answers that break their own function's schema (a required parameter left out, or a
#: parameter the function does not have): BFCL's rules fail them too.
_SELF_INCONSISTENT = {
    "live_multiple_507-149-4",
    "live_multiple_862-181-3",
    "live_multiple_964-207-0",
    "live_simple_106-63-0",
    "live_simple_112-68-0",
    "parallel_multiple_12",
    "parallel_multiple_26",
    "glaive_toolcall_en_demo_188_1",
    "glaive_toolcall_zh_demo_21_5",
    "glaive_toolcall_zh_demo_144_5",
    "normal_atom_object_short_1",
}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside this checkout")
def test_published_answers_replayed_are_judged_correct() -> None:
    """Every published expected answer (BFCL, glaive, ACEBench), sent back as the model's calls, passes
    the judge; the only exceptions are answers that violate their own schema."""
    failing = {}
    for kind, folder in (("bfcl", "bfcl"), ("glaive", "glaive"), ("acebench", "acebench_zh")):
        for path in sorted((SHARED_DATA / folder).glob("*.json")):
            for case in load_dataset(f"{kind}:{path}").cases:
                if case.expected.kind == "calls":
                    result = judge(case.functions, case.expected, _replay(case.expected.alternatives[0]))
                    if not result.correct:
                        failing[case.id] = result.outcome
    assert failing == dict.fromkeys(_SELF_INCONSISTENT, "invalid_call")
