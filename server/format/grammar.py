"""The grammar a constrained answer must match, as an llguidance Lark string. Pure, no I/O.

One grammar serves both engines: the built-in engine runs it in llguidance matchers
(`server.engine.sampling`), vLLM's `guidance` structured-output backend *is* llguidance. The
grammar covers only what the model generates: the forced prefix (`RenderedPrompt.forced_prefix`)
is already in the prompt, so each shape starts where that prefix ends.

Shapes (see the README, "Constrained decoding"):

* named: `" "` + JSON of the tool's schema, then end;
* required: the rest of a call header (`" NAME\\nAction Input: "`) + JSON, for one of the offered
  tools, then further calls (`"\\n" + header + JSON`) unless `parallel_tool_calls` is false;
* auto with strict tools: free text without the trigger `Action:`, or such text followed by the
  trigger and calls as under required. Tools without `strict` are still callable there, with any
  JSON object as arguments, so that strictness of one tool never hides the others;
* response_format json_schema / json_object: JSON of the schema / any JSON object; with tools in
  auto mode the answer is that JSON or calls.

JSON whitespace is pinned to `json.dumps` (`", "`, `": "`, no newlines): that is what the model
saw in training, and a weak model cannot pad with whitespace forever. A schema keyword llguidance
cannot enforce is refused (its compiler reports "Unimplemented keys"): never a silent approximation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from llguidance import LLMatcher

from prompts import PromptFormat
from server.format.render import RenderError, ToolChoice, fill, normalize_tools

__all__ = ["Grammar", "GrammarError", "JSON_WHITESPACE", "build_grammar"]

# llguidance's JSON options: separators of `json.dumps`, no other whitespace.
JSON_WHITESPACE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[([^\]]*)\]")


class GrammarError(RenderError):
    """A schema the grammar library cannot enforce exactly (HTTP 400 naming keyword and field)."""


@dataclass(frozen=True)
class Grammar:
    """`lark`: the grammar text. `calls`: whether tool calls in the answer are constrained, so the
    parser may announce a call as soon as its name is written and stream its arguments."""

    lark: str
    calls: bool


@dataclass(frozen=True)
class _Tool:
    name: str
    schema: Mapping[str, Any]  # the arguments' JSON Schema, already checked


def _lit(text: str) -> str:
    """A Lark string literal (JSON string escapes are Lark's escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _json_rule(schema: Mapping[str, Any]) -> str:
    """`%json {...}` with whitespace pinned (the schema's own x-guidance options are overridden)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_WHITESPACE}, ensure_ascii=False)


@lru_cache(maxsize=512)
def _schema_error(schema_json: str) -> str:
    """llguidance's compile error for a schema ('' when it can enforce it); cached per schema text."""
    return LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema_json))


def _check_schema(schema: Mapping[str, Any], param: str, what: str) -> None:
    try:
        text = json.dumps({**schema, "x-guidance": JSON_WHITESPACE}, ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):
        raise GrammarError(f"{what}: the JSON Schema is not valid JSON", param) from None
    error = _schema_error(text)
    if not error:
        return
    keys = _UNIMPLEMENTED.search(error)
    if keys:
        names = ", ".join(k.strip().strip('"') for k in keys.group(1).split(","))
        raise GrammarError(
            f"{what}: JSON Schema keyword {names} cannot be enforced by constrained decoding; "
            "remove it (or the strict/tool_choice/response_format that asks for enforcement)",
            param,
        )
    first = error.strip().splitlines()[0] if error.strip() else error
    raise GrammarError(f"{what}: the JSON Schema cannot be enforced by constrained decoding: {first}", param)


def _arguments_schema(parameters: Mapping[str, Any], param: str, name: str) -> Mapping[str, Any]:
    """Arguments are always a JSON object: a schema without `type` gets `type: object`."""
    kind = parameters.get("type")
    if kind is None:
        return {**parameters, "type": "object"}
    if kind != "object":
        raise GrammarError(f"tool {name!r}: parameters must be a JSON Schema of type 'object'", param)
    return parameters


def _tools(
    raw_tools: Sequence[Any] | None, strict_all: bool, enforce: bool, only: str | None = None
) -> list[_Tool]:
    """Offered tools (or just `only`) with the schema their arguments are held to.

    `enforce`: every tool's schema is enforced (named / required); otherwise only strict ones,
    and the others take any JSON object.
    """
    specs = normalize_tools(raw_tools)
    tools = []
    for i, (spec, raw) in enumerate(zip(specs, raw_tools or ())):
        if only is not None and spec.name != only:
            continue
        if enforce or _strict(raw, strict_all):
            param = f"tools[{i}].function.parameters"
            schema = _arguments_schema(spec.parameters, param, spec.name)
            _check_schema(schema, param, f"tool {spec.name!r}")
        else:
            schema = {"type": "object"}
        tools.append(_Tool(spec.name, schema))
    return tools


def _strict(raw_tool: Any, strict_all: bool) -> bool:
    """`strict: true` on the tool (OpenAI's place: `function.strict`), or `--strict-tools`."""
    function = raw_tool.get("function") if isinstance(raw_tool, Mapping) else None
    return strict_all or (isinstance(function, Mapping) and function.get("strict") is True)


def _response_schema(response_format: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The JSON Schema `response_format` asks for, or None for text."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise GrammarError("response_format of type 'json_schema' needs a 'json_schema' object", "response_format")
        schema = spec.get("schema", {})
        if not isinstance(schema, Mapping):
            raise GrammarError("json_schema.schema must be a JSON Schema object", "response_format.json_schema.schema")
        _check_schema(schema, "response_format.json_schema.schema", "response_format")
        return schema
    raise GrammarError(
        f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'",
        "response_format.type",
    )


def _header(fmt: PromptFormat, name: str) -> str:
    """A call up to its arguments: `Action: NAME\\nAction Input: `."""
    head, sep, _ = fill(fmt.function_call, name=name).partition("{arguments}")
    assert sep, "function_call template has no {arguments}"
    return head


def _calls_rules(tools: Sequence[_Tool], fmt: PromptFormat, skip: str, parallel: bool) -> list[str]:
    """Rules for `calls`: a first call whose header starts after `skip`, then optional more."""
    rules = []
    first, full = [], []
    for i, tool in enumerate(tools):
        header = _header(fmt, tool.name)
        assert header.startswith(skip), (header, skip)
        rules.append(f"args_{i}: {_json_rule(tool.schema)}")
        first.append(f"{_lit(header[len(skip):])} args_{i}")
        full.append(f"{_lit(header)} args_{i}")
    rules.append("first_call: " + " | ".join(first))
    if parallel:
        rules.append("call: " + " | ".join(full))
        rules.append(f"calls: first_call ({_lit(fmt.call_separator)} call)*")
    else:
        rules.append("calls: first_call")
    return rules


def _trigger(fmt: PromptFormat) -> str:
    """The text that starts every call (`Action:`); in auto mode free text may not contain it."""
    return fmt.function_call.partition("{name}")[0].rstrip()


def _regex_literal(text: str) -> str:
    return re.sub(r"([\\.+*?()|\[\]{}^$/#&~-])", r"\\\1", text)


def build_grammar(
    *,
    tools: Sequence[Any] | None,
    tool_choice: ToolChoice,
    forced_prefix: str,
    response_format: Mapping[str, Any] | None,
    parallel_tool_calls: bool | None,
    fmt: PromptFormat,
    strict_tools: bool = False,
) -> Grammar | None:
    """The grammar for this request, or None when the answer is unconstrained.

    `tools` are the request's tools as plain JSON (already accepted by the renderer),
    `tool_choice` and `forced_prefix` come from `render_prompt`. Raises GrammarError (a
    RenderError: HTTP 400 with `param`) for a schema that cannot be enforced.
    """
    mode = tool_choice.mode
    parallel = parallel_tool_calls is not False
    if mode == "named":
        (tool,) = _tools(tools, strict_tools, enforce=True, only=tool_choice.name)
        rest = _header(fmt, tool.name)[len(forced_prefix):]
        return Grammar(f"start: {_lit(rest)} args\nargs: {_json_rule(tool.schema)}\n", calls=True)
    if mode == "required":
        rules = _calls_rules(_tools(tools, strict_tools, enforce=True), fmt, forced_prefix, parallel)
        return Grammar("start: calls\n" + "\n".join(rules) + "\n", calls=True)
    answer = _response_schema(response_format)
    if mode == "none":
        return None if answer is None else Grammar(f"start: answer\nanswer: {_json_rule(answer)}\n", calls=False)
    # auto
    strict = any(_strict(t, strict_tools) for t in tools or ())
    if answer is None and not strict:
        return None  # today's tolerant parse
    trigger = _trigger(fmt)
    rules = _calls_rules(_tools(tools, strict_tools, enforce=False), fmt, trigger, parallel)
    if answer is not None:
        head = [f"start: answer | {_lit(trigger)} calls", f"answer: {_json_rule(answer)}"]
    else:
        # Free text never containing the trigger; or text up to the first trigger (lazy), then calls.
        anything = "/(?s:.*)/"
        head = [
            "start: TEXT | head calls",
            f"TEXT: {anything} & ~/(?s:.*){_regex_literal(trigger)}(?s:.*)/",
            f"head[lazy]: {anything} {_lit(trigger)}",
        ]
    return Grammar("\n".join(head + rules) + "\n", calls=True)
