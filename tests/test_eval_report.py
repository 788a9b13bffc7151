"""Report and comparison arithmetic, without a model."""

from __future__ import annotations

import json
import pathlib

import pytest

from server.eval.cases import Case, Expected
from server.eval.compare import ReportError, compare_table, load_report
from server.eval.datasets import Dataset
from server.eval.judge import Verdict
from server.eval.report import build_report, format_table, write_report
from server.eval.runner import Result


def result(outcome: str, latency: float | None) -> Result:
    case = Case(outcome, "d", "simple", [{"role": "user", "content": "q"}], [], [], Expected("no_call"))
    return Result(case, Verdict(outcome == "correct", outcome, "why"), [], "text", latency)


def test_summary_rates_latency_and_failures(tmp_path: pathlib.Path) -> None:
    results = [result("correct", 1.0), result("correct", 2.0), result("no_call", 3.0), result("request_error", None), result("correct", 4.0)]
    dataset = Dataset("d", "glaive", "d.json", [r.case for r in results])
    report = build_report([(dataset, results)], {"model": "m"})
    (entry,) = report["datasets"]
    assert (entry["name"], entry["kind"], entry["total"], entry["correct"], entry["accuracy"]) == ("d", "glaive", 5, 3, 0.6)
    assert entry["rates"]["no_call"] == 0.2 and entry["rates"]["request_error"] == 0.2 and entry["rates"]["wrong_tool"] == 0.0
    assert entry["latency_s"] == {"p50": 2.5, "p95": 3.85}  # numpy-style linear interpolation over 1, 2, 3, 4
    assert report["overall"]["total"] == 5 and report["overall"]["accuracy"] == 0.6
    assert [(f["id"], f["outcome"], f["expected"], f["got"]["content"]) for f in report["failures"]] == [
        ("no_call", "no_call", "no call", "text"),
        ("request_error", "request_error", "no call", "text"),
    ]
    table = format_table(report)
    assert "| d | glaive | 5 | 3 | 60.0% | 20.0% | 0.0% | 0.0% | 20.0% | 2.50 | 3.85 |" in table
    write_report(report, tmp_path / "out" / "r.json")
    assert load_report(tmp_path / "out" / "r.json")["overall"]["correct"] == 3


def test_empty_dataset_has_zero_accuracy_and_no_latency() -> None:
    report = build_report([(Dataset("e", "bfcl", "e.json", []), [])], {})
    assert report["datasets"][0]["accuracy"] == 0.0 and report["datasets"][0]["latency_s"] == {"p50": None, "p95": None}
    assert "| e | bfcl | 0 | 0 | 0.0% |" in format_table(report)


def test_compare_table_lists_datasets_of_either_report() -> None:
    a = {"datasets": [{"name": "x", "total": 10, "correct": 5, "accuracy": 0.5}], "overall": {"total": 10, "correct": 5, "accuracy": 0.5}}
    b = {"datasets": [{"name": "y", "total": 4, "correct": 4, "accuracy": 1.0}, {"name": "x", "total": 10, "correct": 7, "accuracy": 0.7}], "overall": {"total": 14, "correct": 11, "accuracy": 0.7857}}
    table = compare_table(a, b, ("before", "after"))
    assert table.splitlines()[2:] == [
        "| x | 50.0% (5/10) | 70.0% (7/10) | +20.0 pt |",
        "| y | - | 100.0% (4/4) | - |",
        "| overall | 50.0% (5/10) | 78.6% (11/14) | +28.6 pt |",
    ]


@pytest.mark.parametrize("content", ["not json", json.dumps({"datasets": [{"name": "x"}], "overall": {}})])
def test_a_file_that_is_not_a_report_is_refused_by_name(tmp_path: pathlib.Path, content: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ReportError, match=r"bad\.json: not"):
        load_report(path)
