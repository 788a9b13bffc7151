"""Training files -> OpenAI-style chats, read as LLaMA-Factory v0.6.3 read them.

Two formats, detected per file (JSON array or JSON Lines):

* **sharegpt with tools** (glaive_toolcall): `conversations` of `{"from", "value"}` with `human`,
  `gpt`, `function_call` (value: JSON `{"name", "arguments"}`), `observation` and an optional leading
  `system`; `tools` is a JSON string (or list) of `{"name", "description", "parameters"}`.
* **alpaca** (alpaca_gpt4_en/zh, oaast_sft_zh): `instruction`, optional `input`, `output`, optional
  `history` as `[[user, assistant], ...]`, optional `system`.

Each usable row becomes a :class:`Chat`: OpenAI `messages` ending with an assistant message and
OpenAI `tools`, i.e. exactly what the server renders at serving time, so training goes through the
same renderer. v0.6.3's alignment rules are kept: a sharegpt row is cut to an even number of turns
(a trailing user turn is dropped), user/observation and assistant/function turns must alternate,
`--max-samples` takes the first N rows of each file before any row is checked, and files are
concatenated in the order given. Where v0.6.3 crashed the whole run (a misplaced role) or trained
garbage silently (an unreadable call or tool list) the row is reported as a :class:`BadRow` with its
file and row number and left out.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["BadRow", "Chat", "DataError", "DatasetFile", "read_dataset", "read_datasets"]

Format = Literal["sharegpt", "alpaca"]

#: sharegpt tags (LLaMA-Factory's defaults) -> OpenAI roles; even turns are prompts, odd turns answers.
_PROMPT_TAGS = {"human": "user", "observation": "tool"}
_ANSWER_TAGS = ("gpt", "function_call")


class DataError(ValueError):
    """A training file that cannot be used at all (unreadable, unknown format, no usable row)."""


class _RowError(ValueError):
    """Why one row is left out."""


@dataclass(frozen=True)
class Chat:
    """One training conversation: what the server would be sent, plus the answers to learn.

    `messages` ends with an assistant message; every assistant message is trained. `source` is
    `file[row]` for error messages.
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    source: str


@dataclass(frozen=True)
class BadRow:
    """A row left out, with where it is and why."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass(frozen=True)
class DatasetFile:
    """One file as read: its format, usable chats and the rows left out."""

    path: pathlib.Path
    format: Format
    chats: list[Chat]
    bad_rows: list[BadRow]


def _load_rows(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
    """(`file[i]` or `file:line`, row) for a JSON array or JSON Lines file."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, list):
        for i, row in enumerate(data):
            yield f"{path}[{i}]", row
        return
    if isinstance(data, dict):  # a one-line JSON Lines file
        yield f"{path}:1", data
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: neither a JSON array nor JSON Lines: {exc}") from None


def _detect_format(path: pathlib.Path, rows: Sequence[tuple[str, Any]]) -> Format:
    keys = set().union(*(row.keys() for _, row in rows if isinstance(row, Mapping)))
    if "conversations" in keys and "instruction" not in keys:
        return "sharegpt"
    if "instruction" in keys and "conversations" not in keys:
        return "alpaca"
    raise DataError(
        f"{path}: cannot tell the format: expected rows with `conversations` (sharegpt) or "
        f"`instruction` (alpaca), found keys {sorted(keys)[:10]}"
    )


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _optional_text(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    return "" if value is None else _text(value, key)


def _function_call(value: str, where: str) -> dict[str, Any]:
    """A sharegpt `function_call` value as an OpenAI assistant message with tool_calls.

    The value is one `{"name", "arguments"}` object (v0.6.3) or a list of them (parallel calls, as
    later LLaMA-Factory versions write them). `arguments` is serialized back to a JSON string: the
    renderer then writes `json.dumps(arguments, ensure_ascii=False)`, as v0.6.3 did.
    """
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise _RowError(f"{where}: function_call is not JSON: {exc}") from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    tool_calls = []
    for call in calls:
        if not isinstance(call, Mapping) or not isinstance(call.get("name"), str) or "arguments" not in call:
            raise _RowError(f'{where}: function_call must be {{"name": ..., "arguments": ...}}')
        arguments = json.dumps(call["arguments"], ensure_ascii=False)
        tool_calls.append({"type": "function", "function": {"name": call["name"], "arguments": arguments}})
    if not tool_calls:
        raise _RowError(f"{where}: function_call has no call")
    return {"role": "assistant", "content": None, "tool_calls": tool_calls}


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """sharegpt `tools` (a JSON string or a list of functions) as OpenAI tools; None when absent/empty."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _RowError(f"tools is not JSON: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(tool, Mapping) for tool in value):
        raise _RowError("tools must be a JSON list of function objects")
    if not value:
        return None
    return [{"type": "function", "function": dict(tool)} for tool in value]


def _sharegpt_chat(row: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    if not isinstance(row, Mapping) or not isinstance(row.get("conversations"), list):
        raise _RowError("a sharegpt row needs a `conversations` list")
    turns = row["conversations"]
    for turn in turns:
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise _RowError('each conversation turn needs "from" and "value"')
    system = _optional_text(row, "system")
    if turns and turns[0]["from"] == "system":
        system = _text(turns[0]["value"], "the system turn")
        turns = turns[1:]
    turns = turns[: len(turns) // 2 * 2]  # v0.6.3: a trailing prompt turn (no answer) is dropped
    if not turns:
        raise _RowError("no complete turn (a prompt followed by an answer)")
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(turns):
        tag, where = turn["from"], f"conversations turn {i}"
        value = _text(turn["value"], f"{where} value")
        if i % 2 == 0:
            if tag not in _PROMPT_TAGS:
                raise _RowError(f"{where}: expected human or observation, got {tag!r}")
            messages.append({"role": _PROMPT_TAGS[tag], "content": value})
        elif tag == "gpt":
            messages.append({"role": "assistant", "content": value})
        elif tag == "function_call":
            messages.append(_function_call(value, where))
        else:
            raise _RowError(f"{where}: expected {' or '.join(_ANSWER_TAGS)}, got {tag!r}")
    return messages, _tools(row.get("tools"))


def _alpaca_chat(row: Any) -> tuple[list[dict[str, Any]], None]:
    if not isinstance(row, Mapping):
        raise _RowError("an alpaca row must be an object")
    output = row.get("output")
    if isinstance(output, list):
        raise _RowError("output is a list (ranking data), not one answer")
    output = _text(output, "output")
    system = _optional_text(row, "system")
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    history = row.get("history")
    if isinstance(history, list):  # v0.6.3 ignores a history that is not a list
        for j, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise _RowError(f"history[{j}] must be a [user, assistant] pair")
            messages.append({"role": "user", "content": _text(pair[0], f"history[{j}][0]")})
            messages.append({"role": "assistant", "content": _text(pair[1], f"history[{j}][1]")})
    prompt = [text for text in (_optional_text(row, "instruction"), _optional_text(row, "input")) if text]
    messages.append({"role": "user", "content": "\n".join(prompt)})
    messages.append({"role": "assistant", "content": output})
    return messages, None


def read_dataset(path: str | pathlib.Path, max_samples: int | None = None) -> DatasetFile:
    """Read one training file: the first `max_samples` rows (all when None), format auto-detected.

    Raises :class:`DataError` when the file cannot be read, its format cannot be told, or no row is
    usable; bad rows are returned in `bad_rows`, not raised.
    """
    path = pathlib.Path(path)
    rows = list(_load_rows(path))
    if max_samples is not None:
        rows = rows[:max_samples]
    if not rows:
        raise DataError(f"{path}: no rows")
    fmt = _detect_format(path, rows)
    convert = _sharegpt_chat if fmt == "sharegpt" else _alpaca_chat
    chats, bad = [], []
    for source, row in rows:
        try:
            messages, tools = convert(row)
        except _RowError as exc:
            bad.append(BadRow(source, str(exc)))
            continue
        chats.append(Chat(messages, tools, source))
    if not chats:
        raise DataError(f"{path}: no usable row ({len(bad)} bad; first: {bad[0]})")
    return DatasetFile(path, fmt, chats, bad)


def read_datasets(paths: Sequence[str | pathlib.Path], max_samples: int | None = None) -> list[DatasetFile]:
    """Read several files; concatenating their chats in this order is v0.6.3's `concat` mix."""
    if not paths:
        raise DataError("no dataset given")
    return [read_dataset(path, max_samples) for path in paths]
