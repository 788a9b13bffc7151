"""The report: per dataset and overall accuracy, failure rates and latency; a table and a JSON file.

JSON shape (``REPORT_VERSION`` 1)::

    {"version": 1, "meta": {...},
     "datasets": [{"name", "kind", "path", "categories", "total", "correct", "accuracy",
                   "rates": {outcome: fraction}, "latency_s": {"p50", "p95"}}],
     "overall": {"total", "correct", "accuracy", "rates", "latency_s"},
     "failures": [{"dataset", "id", "category", "outcome", "detail", "request", "expected", "got"}]}
"""

from __future__ import annotations

import json
import pathlib
import statistics
from collections.abc import Sequence
from typing import Any

from server.eval.cases import Case
from server.eval.datasets import Dataset
from server.eval.judge import OUTCOMES
from server.eval.runner import Result

REPORT_VERSION = 1

#: Report columns for the failure outcomes a person asks about first (all are in ``rates``).
TABLE_RATES = {"no_call": "no call", "wrong_tool": "wrong tool", "invalid_call": "invalid", "request_error": "req err"}


def _percentiles(latencies: Sequence[float]) -> dict[str, float | None]:
    """Linear interpolation between closest ranks (numpy's default percentile)."""
    if not latencies:
        return {"p50": None, "p95": None}
    if len(latencies) == 1:
        return {"p50": round(latencies[0], 4), "p95": round(latencies[0], 4)}
    cuts = statistics.quantiles(latencies, n=20, method="inclusive")  # 5%, 10%, ..., 95%
    return {"p50": round(cuts[9], 4), "p95": round(cuts[18], 4)}


def summarize(results: Sequence[Result]) -> dict[str, Any]:
    """total, correct, accuracy, the rate of every outcome, latency p50/p95 (successful requests only)."""
    total = len(results)
    correct = sum(r.verdict.correct for r in results)
    return {
        "total": total,
        "correct": correct,
        "accuracy": round(correct / total, 4) if total else 0.0,
        "rates": {o: round(sum(r.verdict.outcome == o for r in results) / total, 4) if total else 0.0 for o in OUTCOMES},
        "latency_s": _percentiles([r.latency_s for r in results if r.latency_s is not None]),
    }


def _expected(case: Case) -> Any:
    if case.expected.kind == "no_call":
        return "no call"
    if case.expected.kind == "any_call":
        return "at least one call"
    return case.expected.alternatives


def _failure(result: Result) -> dict[str, Any]:
    case = result.case
    return {
        "dataset": case.dataset,
        "id": case.id,
        "category": case.category,
        "outcome": result.verdict.outcome,
        "detail": result.verdict.detail,
        "request": {"messages": case.messages, "tools": case.tools},
        "expected": _expected(case),
        "got": {"content": result.content, "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in result.calls]},
    }


def build_report(runs: Sequence[tuple[Dataset, Sequence[Result]]], meta: dict[str, Any]) -> dict[str, Any]:
    """The report of each dataset with its results, and overall."""
    entries = []
    for dataset, results in runs:
        categories = sorted({r.case.category for r in results})
        entries.append({"name": dataset.name, "kind": dataset.kind, "path": dataset.path, "categories": categories, **summarize(results)})
    every = [r for _, results in runs for r in results]
    return {
        "version": REPORT_VERSION,
        "meta": meta,
        "datasets": entries,
        "overall": summarize(every),
        "failures": [_failure(r) for r in every if not r.verdict.correct],
    }


def write_report(report: dict[str, Any], path: str | pathlib.Path) -> None:
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table (readable in a terminal, pasteable into a README)."""
    header = ["dataset", "kind", "total", "correct", "accuracy", *TABLE_RATES.values(), "p50 s", "p95 s"]
    rows = []
    for entry in [*report["datasets"], {**report["overall"], "name": "**overall**", "kind": ""}]:
        rows.append(
            [
                entry["name"],
                entry["kind"],
                str(entry["total"]),
                str(entry["correct"]),
                _pct(entry["accuracy"]),
                *(_pct(entry["rates"][key]) for key in TABLE_RATES),
                _seconds(entry["latency_s"]["p50"]),
                _seconds(entry["latency_s"]["p95"]),
            ]
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
