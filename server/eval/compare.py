"""Two reports side by side (before/after a fine-tune): a table and a bar chart of accuracy per dataset."""

from __future__ import annotations

import json
import pathlib
from typing import Any


class ReportError(ValueError):
    """A file that is not an `agent-server eval` report; the message names the file."""


def load_report(path: str | pathlib.Path) -> dict[str, Any]:
    """A report written by `agent-server eval --report`, checked for the fields a comparison reads."""
    try:
        report = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not a JSON report ({exc})") from None
    try:
        for entry in [*report["datasets"], report["overall"]]:
            entry["total"], entry["correct"], entry["accuracy"]  # noqa: B018 - presence check
        for entry in report["datasets"]:
            entry["name"]  # noqa: B018
    except (KeyError, TypeError):
        raise ReportError(f"{path}: not an agent-server eval report (needs datasets[].name/total/correct/accuracy and overall)") from None
    return report


def _rows(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]]:
    """(name, entry in A, entry in B) for every dataset in either report, in A's order then B's, then overall."""
    by_a = {e["name"]: e for e in a["datasets"]}
    by_b = {e["name"]: e for e in b["datasets"]}
    names = list(by_a) + [n for n in by_b if n not in by_a]
    return [(n, by_a.get(n), by_b.get(n)) for n in names] + [("overall", a["overall"], b["overall"])]


def _cell(entry: dict[str, Any] | None) -> str:
    return "-" if entry is None else f"{100 * entry['accuracy']:.1f}% ({entry['correct']}/{entry['total']})"


def compare_table(a: dict[str, Any], b: dict[str, Any], labels: tuple[str, str]) -> str:
    """A Markdown table: accuracy (correct/total) in A and B and the change in points."""
    lines = [f"| dataset | {labels[0]} | {labels[1]} | change |", "| --- | --- | --- | --- |"]
    for name, ea, eb in _rows(a, b):
        change = "-" if ea is None or eb is None else f"{100 * (eb['accuracy'] - ea['accuracy']):+.1f} pt"
        lines.append(f"| {name} | {_cell(ea)} | {_cell(eb)} | {change} |")
    return "\n".join(lines)


def compare_chart(a: dict[str, Any], b: dict[str, Any], labels: tuple[str, str], out: str | pathlib.Path) -> None:
    """A grouped horizontal bar chart of accuracy per dataset (and overall), written as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = _rows(a, b)
    names = [name for name, _, _ in rows]
    height = 0.4
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(rows)))
    for offset, label, side in ((-height / 2, labels[0], 1), (height / 2, labels[1], 2)):
        values = [100 * (row[side]["accuracy"] if row[side] is not None else 0.0) for row in rows]
        bars = ax.barh([i + offset for i in range(len(rows))], values, height=height, label=label)
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("accuracy (%)")
    ax.set_title("agent-server eval: function-calling accuracy")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out_path = pathlib.Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", dpi=120)
    plt.close(fig)
