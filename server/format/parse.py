"""The model's text -> OpenAI `content` + `tool_calls`, all at once or incrementally.

Pure functions, no I/O. One scanner, `_scan(text, final)`, reads the ReAct blocks
(`Action: NAME` / `Action Input: {json}`) and reports what is *decided* so far. The
non-streaming parse is the scan of the whole text; the streaming parser rescans the text
it has seen after each delta and emits only the difference between two decided states. A
decided state never changes when more text arrives, so streaming and non-streaming agree by
construction, for any split of the text into deltas.

Rules (FORMAT.md): text before the first `Action:` is the content (trimmed, null when empty).
A call's JSON may be wrapped in ``` fences; text after the last call is dropped (models go on to
invent an `Observation:`). If the *first* block names an unknown tool or carries invalid or
non-object JSON (also when `max_tokens` cut it short), the whole output is content: never invalid
JSON in `arguments`, never lost text. A call is streamed once its JSON is complete and valid (one
announcement chunk, then its arguments): a call announced earlier could not be taken back.

Constrained mode (`constrained=True`, for output generated under a grammar from
`server.format.grammar`): the grammar guarantees the exact call syntax and valid arguments, so a
call is announced as soon as the line with its name ends and its arguments are streamed as they
are generated (the JSON text as written, never re-serialized). JSON under the grammar has no raw
newline, so the arguments are the rest of the line. Only a `max_tokens` cut can leave a call
unfinished: `StreamingParser.cut_in_call` says so, and the API reports `finish_reason: "length"`.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import Enum

ACTION = "Action:"
ACTION_INPUT = "Action Input:"
FENCE = "```"
_ID_ALPHABET = string.ascii_letters + string.digits


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def new_call_id() -> str:
    """`call_` + 24 random alphanumerics, like OpenAI's ids."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, re-serialized with ensure_ascii=False


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    index: int
    fragment: str


StreamEvent = ContentDelta | ToolCallStart | ToolCallArguments


class _Block(Enum):
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"  # more text could still make it a call
    INVALID = "invalid"  # no continuation makes it a call


@dataclass(frozen=True)
class _Scan:
    content: str
    calls: tuple[tuple[str, str], ...]  # (name, arguments); in constrained mode the last may still grow
    done: bool  # no further text can change the result
    cut_in_call: bool = False  # constrained mode: the text ends inside a call (header or arguments)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest proper prefix of `marker` that `text` ends with."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _undecided(final: bool) -> _Block:
    return _Block.INVALID if final else _Block.INCOMPLETE


def _block(
    text: str, pos: int, names: Collection[str], final: bool
) -> tuple[_Block, str, str, int, bool]:
    """Read one block at `pos` (where `Action:` starts).

    Returns (status, name, arguments, end, closed): `end` is just past the JSON (and its closing
    fence), `closed` is False while a closing fence may still be arriving.
    """
    fail = (_Block.INVALID, "", "", pos, True)
    i = pos + len(ACTION)
    newline = text.find("\n", i)
    if newline < 0:
        partial = text[i:].strip()
        if not final and any(n.startswith(partial) for n in names):
            return (_Block.INCOMPLETE, "", "", pos, True)
        return fail
    name = text[i:newline].strip()
    if name not in names:
        return fail
    j = _skip_ws(text, newline + 1)
    head = text[j : j + len(ACTION_INPUT)]
    if head != ACTION_INPUT:
        if len(head) < len(ACTION_INPUT) and ACTION_INPUT.startswith(head):
            return (_undecided(final), "", "", pos, True)
        return fail
    j = _skip_ws(text, j + len(ACTION_INPUT))
    fenced = text.startswith(FENCE, j)
    if fenced:
        j += len(FENCE)
        while j < len(text) and text[j].isalpha():  # ```json
            j += 1
        j = _skip_ws(text, j)
    elif FENCE.startswith(text[j:]):  # nothing yet, or a fence arriving
        return (_undecided(final), "", "", pos, True)
    if j >= len(text):
        return (_undecided(final), "", "", pos, True)
    if text[j] != "{":
        return fail
    try:
        value, end = _DECODER.raw_decode(text, j)
    except ValueError:  # JSONDecodeError, or NaN/Infinity
        return (_undecided(final), "", "", pos, True)
    arguments = json.dumps(value, ensure_ascii=False)
    closed = True
    if fenced:
        k = _skip_ws(text, end)
        if text.startswith(FENCE, k):
            end = k + len(FENCE)
        elif not final and FENCE.startswith(text[k:]):
            closed = False
    return (_Block.COMPLETE, name, arguments, end, closed)


def _no_call_yet(text: str, final: bool) -> _Scan:
    """Text without `Action:`: all content, except a partial marker at the end while streaming."""
    if final:
        return _Scan(text.strip(), (), True)
    safe = len(text) - _partial_suffix(text, ACTION)
    return _Scan(text[:safe].strip(), (), False)


def _scan(text: str, names: Collection[str], max_calls: int | None, final: bool, constrained: bool) -> _Scan:
    """The decided part of the parse of `text` (all of it when `final`); `constrained` for text
    whose calls follow a grammar."""
    if not names:  # tools not offered: plain text, passed through untouched
        return _Scan(text, (), final)
    start = text.find(ACTION)
    if start < 0:
        return _no_call_yet(text, final)
    scan_calls = _scan_constrained_calls if constrained else _scan_calls
    return scan_calls(text, start, text[:start].strip(), names, max_calls, final)


def _scan_calls(text: str, pos: int, preamble: str, names: Collection[str], max_calls: int | None, final: bool) -> _Scan:
    """The calls from the first `Action:` at `pos` on, each block read by `_block`."""
    calls: list[tuple[str, str]] = []
    while True:
        status, name, arguments, end, closed = _block(text, pos, names, final)
        if status is _Block.INCOMPLETE:
            return _Scan(preamble, tuple(calls), False)
        if status is _Block.INVALID:
            if not calls:  # not a call after all: everything is content
                return _Scan(text.strip(), (), final)
            return _Scan(preamble, tuple(calls), True)  # trailing text after the calls: dropped
        calls.append((name, arguments))
        if max_calls is not None and len(calls) >= max_calls:
            return _Scan(preamble, tuple(calls), True)
        if not closed:
            return _Scan(preamble, tuple(calls), False)
        nxt = _skip_ws(text, end)
        if text.startswith(ACTION, nxt):
            pos = nxt
            continue
        if not final and ACTION.startswith(text[nxt:]):
            return _Scan(preamble, tuple(calls), False)
        return _Scan(preamble, tuple(calls), True)


def _scan_constrained_calls(
    text: str, pos: int, preamble: str, names: Collection[str], max_calls: int | None, final: bool
) -> _Scan:
    """Like `_scan_calls`, for text whose calls follow a grammar: a call counts from the end of its
    name's line, with the arguments written so far. Text breaking the format (the grammar rules
    that out) is handled like `_scan_calls` does: an unknown first name makes everything content,
    later ones are dropped."""
    calls: list[tuple[str, str]] = []
    while True:
        newline = text.find("\n", pos + len(ACTION))
        if newline < 0:  # the name is still being written
            return _Scan(preamble, tuple(calls), final, cut_in_call=True)
        name = text[pos + len(ACTION) : newline].strip()
        if name not in names:
            if not calls:
                return _Scan(text.strip(), (), final)
            return _Scan(preamble, tuple(calls), True)
        body = newline + 1
        if not text.startswith(ACTION_INPUT, body):
            calls.append((name, ""))
            header_arriving = ACTION_INPUT.startswith(text[body:])
            return _Scan(preamble, tuple(calls), final or not header_arriving, cut_in_call=True)
        j = body + len(ACTION_INPUT)
        j += text.startswith(" ", j)
        end = text.find("\n", j)
        if end < 0:
            arguments = text[j:]
            calls.append((name, arguments))
            return _Scan(preamble, tuple(calls), final, cut_in_call=not _is_json_object(arguments))
        calls.append((name, text[j:end]))
        if max_calls is not None and len(calls) >= max_calls:
            return _Scan(preamble, tuple(calls), True)
        pos = end + 1
        if text.startswith(ACTION, pos):
            continue
        if not final and ACTION.startswith(text[pos:]):
            return _Scan(preamble, tuple(calls), False)
        return _Scan(preamble, tuple(calls), True)


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(_DECODER.decode(text), dict)
    except (ValueError, RecursionError):
        return False


def parse_output(
    text: str,
    tool_names: Collection[str],
    max_calls: int | None = None,
    id_factory: Callable[[], str] = new_call_id,
    *,
    constrained: bool = False,
) -> ParsedOutput:
    """Parse a whole generation. With no `tool_names` the text is returned as content."""
    scan = _scan(text, tool_names, max_calls, final=True, constrained=constrained)
    calls = [ToolCall(id_factory(), name, args) for name, args in scan.calls]
    return ParsedOutput(content=scan.content if scan.content or not calls else None, tool_calls=calls)


class StreamingParser:
    """Incremental parser: feed text deltas, get OpenAI-style stream events.

    Explicit state: the text seen, the content already emitted and the calls already announced
    (with the arguments already sent). `done` turns true once nothing the model could still say
    changes the result (after the last call, or after the single call allowed by
    `parallel_tool_calls: false`), so the engine can stop generating. `constrained` selects the
    mode for grammar-constrained output (see the module docstring).
    """

    def __init__(
        self,
        tool_names: Collection[str],
        max_calls: int | None = None,
        id_factory: Callable[[], str] = new_call_id,
        *,
        constrained: bool = False,
    ) -> None:
        self._names = frozenset(tool_names)
        self._max_calls = max_calls
        self._id_factory = id_factory
        self._constrained = constrained
        self._text = ""
        self._content = ""
        self._calls: list[ToolCall] = []
        self._done = False
        self._finished = False
        self._cut_in_call = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def text(self) -> str:
        return self._text

    def feed(self, delta: str) -> list[StreamEvent]:
        if self._done or not delta:
            return []
        self._text += delta
        return self._advance(_scan(self._text, self._names, self._max_calls, False, self._constrained))

    def finish(self) -> list[StreamEvent]:
        """End of generation: decide everything still open."""
        if self._finished:
            return []
        self._finished = True
        return self._advance(_scan(self._text, self._names, self._max_calls, True, self._constrained))

    @property
    def cut_in_call(self) -> bool:
        """After `finish`: constrained output ended inside a call (a `max_tokens` cut)."""
        return self._cut_in_call

    def result(self) -> ParsedOutput:
        """The assembled result so far (the final one after `finish`)."""
        content = self._content if self._content or not self._calls else None
        return ParsedOutput(content=content, tool_calls=list(self._calls))

    def _advance(self, scan: _Scan) -> list[StreamEvent]:
        if self._done:
            return []
        known = scan.calls[: len(self._calls)]
        if (
            not scan.content.startswith(self._content)
            or len(known) < len(self._calls)
            or any(
                name != c.name or not arguments.startswith(c.arguments) or (arguments != c.arguments and i < len(known) - 1)
                for i, ((name, arguments), c) in enumerate(zip(known, self._calls))
            )
        ):
            raise AssertionError("parser emitted a state it later revised")  # a bug, never input
        events: list[StreamEvent] = []
        if len(scan.content) > len(self._content):
            events.append(ContentDelta(scan.content[len(self._content) :]))
            self._content = scan.content
        if self._calls and len(known[-1][1]) > len(self._calls[-1].arguments):  # constrained: arguments grew
            last = self._calls[-1]
            events.append(ToolCallArguments(len(self._calls) - 1, known[-1][1][len(last.arguments) :]))
            self._calls[-1] = ToolCall(last.id, last.name, known[-1][1])
        for name, arguments in scan.calls[len(self._calls) :]:
            call = ToolCall(self._id_factory(), name, arguments)
            index = len(self._calls)
            self._calls.append(call)
            events.append(ToolCallStart(index, call.id, name))
            if arguments:
                events.append(ToolCallArguments(index, arguments))
        self._done = scan.done
        self._cut_in_call = scan.cut_in_call
        return events
