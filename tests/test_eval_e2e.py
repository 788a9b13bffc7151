"""`agent-server eval` end to end: the real CLI against the trained demo model served by the real server.

The data files are written here, in each format, from chats the demo model answers
(``server.demo.DEMO_EXAMPLES``): with the right expected calls every case must score, with wrong
expected values none may.  The demo model knows its chats' prompts byte for byte, so the runs pass
``--no-bfcl-hint`` (BFCL's hint sentence in each description would make them prompts it never saw;
the hinted conversion itself is tested in test_eval_judge.py and test_eval_datasets.py).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest

from server.demo import DEMO_SYSTEM, DEMO_TOOLS, WEATHER_TOOLS
from server.launcher import REPO_ROOT

RUBBISH = "鸡蛋壳属于哪种类型的垃圾?"
SONG = "爱在西元前是谁唱的,来自哪张专辑?"
PARIS = "What's the weather in Paris?"
COMPARE = "Compare the weather in Paris and Tokyo."

#: (question, system prompt, tools, expected calls, the same calls with wrong values)
CHATS: list[tuple[str, str | None, list[dict[str, Any]], list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]]]] = [
    (RUBBISH, DEMO_SYSTEM, DEMO_TOOLS, [("get_rubbish_category", {"keyword": "鸡蛋壳"})], [("get_rubbish_category", {"keyword": "鸭蛋壳"})]),
    (SONG, DEMO_SYSTEM, DEMO_TOOLS, [("get_song_information", {"keyword": "爱在西元前"})], [("get_song_information", {"keyword": "七里香"})]),
    (PARIS, None, WEATHER_TOOLS, [("get_weather", {"city": "Paris"})], [("get_weather", {"city": "London"})]),
    (
        COMPARE,
        None,
        WEATHER_TOOLS,
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo"})],
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Berlin"})],
    ),
]


def _functions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [tool["function"] for tool in tools]


def _lines(path: pathlib.Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def write_glaive(folder: pathlib.Path, wrong: bool) -> pathlib.Path:
    rows = []
    for question, system, tools, right_calls, wrong_calls in CHATS:
        calls = [{"name": name, "arguments": args} for name, args in (wrong_calls if wrong else right_calls)]
        row = {
            "conversations": [{"from": "human", "value": question}, {"from": "function_call", "value": json.dumps(calls if len(calls) > 1 else calls[0], ensure_ascii=False)}],
            "tools": json.dumps(_functions(tools), ensure_ascii=False),
        }
        if system:
            row["system"] = system
        rows.append(row)
    path = folder / "demo_glaive.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def write_bfcl(folder: pathlib.Path, wrong: bool) -> pathlib.Path:
    """One BFCL file; ``parallel_multiple`` judges single and parallel answers alike (count + any order)."""
    entries, answers = [], []
    for i, (question, system, tools, right_calls, wrong_calls) in enumerate(CHATS):
        case_id = f"parallel_multiple_{i}"
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        functions = [{**f, "parameters": {**f["parameters"], "type": "dict"}} for f in _functions(tools)]  # BFCL spelling
        entries.append({"id": case_id, "question": [messages], "function": functions})
        calls = wrong_calls if wrong else right_calls
        answers.append({"id": case_id, "ground_truth": [{name: {k: [v] for k, v in args.items()}} for name, args in calls]})
    path = folder / "BFCL_v4_parallel_multiple.json"
    _lines(path, entries)
    _lines(folder / "possible_answer" / path.name, answers)
    return path


def write_acebench(folder: pathlib.Path, wrong: bool) -> pathlib.Path:
    entries, answers = [], []
    for i, (question, system, tools, right_calls, wrong_calls) in enumerate(CHATS):
        case_id = f"normal_single_turn_parallel_function_{i}"
        entries.append({"id": case_id, "question": f"user: {question}\n", "function": _functions(tools), "time": system or ""})
        calls = wrong_calls if wrong else right_calls
        answers.append({"id": case_id, "ground_truth": {f"{name}_{n}" if len(calls) > 1 else name: args for n, (name, args) in enumerate(calls, start=1)}})
    path = folder / "data_normal_single_turn_parallel_function.json"
    _lines(path, entries)
    _lines(folder / "possible_answer" / path.name, answers)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", "eval", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def run_eval(base_url: str, folder: pathlib.Path, wrong: bool, report: pathlib.Path) -> dict[str, Any]:
    datasets = [
        f"glaive:{write_glaive(folder / 'glaive', wrong)}",
        f"bfcl:{write_bfcl(folder / 'bfcl', wrong)}",
        f"acebench:{write_acebench(folder / 'acebench', wrong)}",
    ]
    args = ["--base-url", base_url + "/v1", "--report", str(report), "--concurrency", "2", "--no-progress", "--no-bfcl-hint"]
    done = run_cli(*args, *(a for spec in datasets for a in ("--dataset", spec)))
    assert done.returncode == 0, done.stderr
    assert "| **overall** |" in done.stdout
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def reports(trained_server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """The eval CLI run twice on the trained model: right and wrong expectations."""
    folder = tmp_path_factory.mktemp("eval")
    paths = {"right": folder / "right.json", "wrong": folder / "wrong.json"}
    for name, path in paths.items():
        run_eval(trained_server.url, folder / name, name == "wrong", path)
    return paths


def test_known_chats_score_full_marks_in_every_format(reports: dict[str, pathlib.Path]) -> None:
    report = json.loads(reports["right"].read_text())
    assert [(d["kind"], d["total"], d["correct"]) for d in report["datasets"]] == [("glaive", 4, 4), ("bfcl", 4, 4), ("acebench", 4, 4)], report["failures"]
    assert report["overall"] == {**report["overall"], "total": 12, "correct": 12, "accuracy": 1.0}
    assert report["overall"]["rates"]["request_error"] == 0.0
    assert report["overall"]["latency_s"]["p50"] > 0 and report["overall"]["latency_s"]["p95"] >= report["overall"]["latency_s"]["p50"]
    assert report["failures"] == []
    assert report["meta"]["temperature"] == 0.0 and report["meta"]["model"]


def test_wrong_expected_values_score_zero(reports: dict[str, pathlib.Path]) -> None:
    report = json.loads(reports["wrong"].read_text())
    assert [(d["total"], d["correct"]) for d in report["datasets"]] == [(4, 0)] * 3
    assert {f["outcome"] for f in report["failures"]} == {"wrong_value"}
    failure = next(f for f in report["failures"] if f["id"] == "parallel_multiple_2")
    assert failure["request"]["messages"] == [{"role": "user", "content": PARIS}]
    assert failure["expected"] == [[{"get_weather": {"city": ["London"]}}]]
    assert [(c["name"], json.loads(c["arguments"])) for c in failure["got"]["tool_calls"]] == [("get_weather", {"city": "Paris"})]


def test_compare_prints_both_reports_and_draws_a_png(reports: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    chart = tmp_path / "chart.png"
    done = run_cli("--compare", str(reports["right"]), str(reports["wrong"]), "--chart", str(chart))
    assert done.returncode == 0, done.stderr
    assert "| overall | 100.0% (12/12) | 0.0% (0/12) | -100.0 pt |" in done.stdout
    data = chart.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_unreachable_server_is_counted_as_request_errors_not_fatal(tmp_path: pathlib.Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = write_glaive(tmp_path, wrong=False)
    report = tmp_path / "r.json"
    done = run_cli("--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m", "--dataset", f"glaive:{data}", "--report", str(report), "--no-progress")
    assert done.returncode == 0, done.stderr
    overall = json.loads(report.read_text())["overall"]
    assert (overall["total"], overall["correct"], overall["rates"]["request_error"]) == (4, 0, 1.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--base-url", "http://x/v1", "--report", "r.json"], "--dataset required"),
        (["--base-url", "http://x/v1", "--report", "r.json", "--dataset", "bfcl:/nonexistent/BFCL_v4_simple.json"], "BFCL_v4_simple.json: no such file"),
        (["--compare", "/nonexistent/a.json", "/nonexistent/b.json"], "a.json: no such file"),
        (["--base-url", "http://x/v1", "--report", "r.json", "--dataset", "glaive:x.json", "--concurrency", "0"], "--concurrency must be at least 1"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(args: list[str], message: str) -> None:
    done = run_cli(*args)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
