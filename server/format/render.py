"""OpenAI chat requests -> the exact prompt the model was trained on (text and token ids).

Pure functions, no I/O: the format comes in as a `prompts.PromptFormat`, the tokenizer as a
`PromptEncoder`. The rules are those of FORMAT.md (LLaMA-Factory v0.6.3, `--template qwen`).

Two details decide whether the ids match training, not just the text:

* LLaMA-Factory tokenized each turn (and each separator) on its own, so the prompt is built as a
  list of *items* encoded one by one, never as one big string.
* Control tokens come only from the template. Inside an item, template text is split on the
  control-token strings; message content (and tool text, which comes from the request) is always
  encoded as ordinary text, so a user typing `<|im_end|>` cannot close a turn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from prompts import PromptFormat

TOOL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_SURROGATE = re.compile("[\ud800-\udfff]")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_SYSTEM_ROLES = ("system", "developer")


class RenderError(ValueError):
    """A request that cannot be rendered; `param` names the offending field OpenAI-style."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# ---------------------------------------------------------------------------------------------
# Normalised request pieces


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class ToolChoice:
    """`mode` is none/auto/required/named; `name` is set for named."""

    mode: Literal["none", "auto", "required", "named"]
    name: str | None = None


@dataclass
class _UserTurn:
    texts: list[str]


@dataclass
class _AssistantTurn:
    contents: list[str]
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, serialized arguments)


# A piece of an item: (text, is_template). Only template text may contain control tokens.
Piece = tuple[str, bool]
Item = tuple[Piece, ...]


@dataclass(frozen=True)
class RenderedPrompt:
    """What the engine needs: ids to feed (forced prefix included) and how to parse the answer.

    `text` is the prompt as one string (control tokens spelled out), without the forced prefix.
    `forced_prefix` is assistant text imposed by `tool_choice`; it is already at the end of `ids`
    and counts as model output when parsing (what follows it under `required`/named is held by the
    grammar, server.format.grammar). `tool_names` are the names a call may use (empty when
    tools are not offered or `tool_choice` is none: then no output is parsed as a call).
    """

    text: str
    ids: list[int]
    forced_prefix: str
    tool_names: tuple[str, ...]
    tool_choice: ToolChoice


class PromptEncoder:
    """Adapts a tokenizer for rendering: control-token ids, plus text encoding that never
    produces a control token (the `encode_text` callable must treat `<|im_end|>` as text)."""

    def __init__(self, control_ids: Mapping[str, int], encode_text: Callable[[str], list[int]]) -> None:
        self.control_ids = dict(control_ids)
        self.encode_text = encode_text
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(control_ids, key=len, reverse=True))) + ")")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> PromptEncoder:
        """Build from a transformers fast tokenizer.

        A private copy of the backend tokenizer with `encode_special_tokens` on is used for text, so
        content is never split into special tokens and no shared tokenizer state is toggled per call
        (the server encodes from several threads).
        """
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.encode_special_tokens = True
        controls = {
            tok: tokenizer.convert_tokens_to_ids(tok)
            for tok in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
        }
        return cls(controls, lambda text: backend.encode(text, add_special_tokens=False).ids)

    def encode_item(self, item: Item) -> list[int]:
        """Encode one item: runs of text between control tokens are encoded whole."""
        ids: list[int] = []
        run: list[str] = []

        def flush() -> None:
            if run:
                ids.extend(self.encode_text("".join(run)))
                run.clear()

        for text, is_template in item:
            if not is_template:
                run.append(text)
                continue
            for part in self._split.split(text):
                if part in self.control_ids:
                    flush()
                    ids.append(self.control_ids[part])
                elif part:
                    run.append(part)
        flush()
        return ids


# ---------------------------------------------------------------------------------------------
# Small helpers


def fill(template: str, **values: str) -> str:
    """Replace `{name}` placeholders in one pass (values are never re-scanned)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _fill_item(template: str, content: str) -> Item:
    """A turn template with `{content}` filled, content marked as ordinary text."""
    before, sep, after = template.partition("{content}")
    if not sep:
        return ((template, True),)
    return tuple(p for p in ((before, True), (content, False), (after, True)) if p[0])


def _content_text(content: Any, param: str, *, allow_none: bool = False) -> str | None:
    """Message content as text: a string, or a list whose text parts are concatenated."""
    if content is None:
        if allow_none:
            return None
        raise RenderError("content must not be null for this message", param)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            part_param = f"{param}[{j}]"
            if not isinstance(part, Mapping):
                raise RenderError("each content part must be an object", part_param)
            kind = part.get("type")
            if kind in ("text", "refusal"):
                text = part.get(kind)
                if not isinstance(text, str):
                    raise RenderError(f"content part of type {kind!r} needs a string {kind!r}", f"{part_param}.{kind}")
                texts.append(text)
            elif kind in ("image_url", "input_audio", "file", "image"):
                raise RenderError(f"content parts of type {kind!r} are not supported: this model reads text only", f"{part_param}.type")
            else:
                raise RenderError(f"unknown content part type {kind!r}", f"{part_param}.type")
        return "".join(texts)
    raise RenderError("content must be a string or a list of content parts", param)


def serialize_arguments(arguments: Any, param: str) -> str:
    """Arguments as the model saw them in training: `json.dumps(obj, ensure_ascii=False)`."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise RenderError(f"arguments is not valid JSON: {exc}", param) from None
        except RecursionError:  # "[[[[..." from a client must be a 400, not a 500
            raise RenderError("arguments is nested too deeply", param) from None
    try:
        return json.dumps(arguments, ensure_ascii=False)
    except RecursionError:
        raise RenderError("arguments is nested too deeply", param) from None


def _call(name: Any, arguments: Any, param: str, args_key: str = "arguments") -> tuple[str, str]:
    if not isinstance(name, str) or not name:
        raise RenderError("a function call needs a non-empty string name", f"{param}.name")
    if arguments is None:
        raise RenderError("a function call needs arguments", f"{param}.{args_key}")
    return name, serialize_arguments(arguments, f"{param}.{args_key}")


def _legacy_function_call(content: Any) -> tuple[Any, Any, str] | None:
    """The seed's `function` message: content is JSON {"name", "arguments"|"argument"}.

    Returns (name, arguments, key) or None when the content is not such a call (then the message
    is an OpenAI legacy function *result*).
    """
    if not isinstance(content, str):
        return None
    try:
        obj = json.loads(content)
    except (json.JSONDecodeError, RecursionError):  # too deep to be a call: an ordinary result
        return None
    if not isinstance(obj, dict) or "name" not in obj:
        return None
    for key in ("arguments", "argument"):
        if key in obj:
            return obj["name"], obj[key], key
    return None


# ---------------------------------------------------------------------------------------------
# Tools


def _or_default(value: Any, default: Any) -> Any:
    """JSON null means absent; an empty list where an object belongs is still an error."""
    return default if value is None else value


def normalize_tools(tools: Sequence[Any] | None) -> list[ToolSpec]:
    """Validate OpenAI `tools` and return them in order; unusual but valid schemas pass."""
    if tools is None:
        return []
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise RenderError("tools must be an array", "tools")
    specs: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise RenderError("each tool must be an object", param)
        if tool.get("type", "function") != "function":
            raise RenderError("only tools of type 'function' are supported", f"{param}.type")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise RenderError("a tool needs a 'function' object", f"{param}.function")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME_PATTERN.match(name):
            raise RenderError(
                "function name must be 1-64 characters of a-z, A-Z, 0-9, underscores and dashes",
                f"{param}.function.name",
            )
        if name in seen:
            raise RenderError(f"duplicate function name {name!r}", f"{param}.function.name")
        seen.add(name)
        description = _or_default(function.get("description"), "")
        if not isinstance(description, str):
            raise RenderError("description must be a string", f"{param}.function.description")
        parameters = _or_default(function.get("parameters"), {})
        if not isinstance(parameters, Mapping):
            raise RenderError("parameters must be a JSON Schema object", f"{param}.function.parameters")
        properties = _or_default(parameters.get("properties"), {})
        if not isinstance(properties, Mapping) or not all(isinstance(v, Mapping) for v in properties.values()):
            raise RenderError("properties must be an object of JSON Schemas", f"{param}.function.parameters.properties")
        required = _or_default(parameters.get("required"), [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise RenderError("required must be an array of strings", f"{param}.function.parameters.required")
        specs.append(ToolSpec(name, description, parameters))
    return specs


def _compact(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _type_text(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type", "")
    if isinstance(kind, list):  # ["string", "null"]: LLaMA-Factory never saw this; keep it readable
        return " or ".join(map(str, kind))
    return str(kind)


def render_tool_text(tools: Sequence[ToolSpec], fmt: PromptFormat) -> str:
    """The tool listing of FORMAT.md rule 2; a tool without parameters gets an empty arg list."""
    entries = []
    for tool in tools:
        properties = tool.parameters.get("properties") or {}
        required = set(tool.parameters.get("required") or [])
        args = []
        for pname, schema in properties.items():
            enum = schema.get("enum")
            items = schema.get("items")
            args.append(
                fill(
                    fmt.tool_arg,
                    name=pname,
                    type=_type_text(schema),
                    required=fmt.tool_arg_required if pname in required else "",
                    description=str(schema.get("description", "")),
                    enum=fill(fmt.tool_arg_enum, values=fmt.tool_arg_enum_separator.join(map(_compact, enum)))
                    if isinstance(enum, list)
                    else "",
                    items=fill(fmt.tool_arg_items, type=_type_text(items))
                    if isinstance(items, Mapping) and "type" in items
                    else "",
                )
            )
        entries.append(fill(fmt.tool_entry, name=tool.name, description=tool.description, args="".join(args)))
    names = fmt.tool_names_separator.join(t.name for t in tools)
    return fill(fmt.tool_prompt, tool_text="".join(entries), tool_names=names)


def normalize_tool_choice(tool_choice: Any, tools: Sequence[ToolSpec]) -> ToolChoice:
    """OpenAI `tool_choice` -> ToolChoice; default auto with tools, none without."""
    names = {t.name for t in tools}
    if tool_choice is None:
        return ToolChoice("auto" if tools else "none")
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not tools:
            raise RenderError("tool_choice 'required' needs at least one tool in tools", "tool_choice")
        if tool_choice == "auto" and not tools:
            return ToolChoice("none")
        return ToolChoice(tool_choice)
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise RenderError("tool_choice.function.name must be a string", "tool_choice")
        if name not in names:
            raise RenderError(f"tool_choice names {name!r}, which is not among the offered tools", "tool_choice")
        return ToolChoice("named", name)
    raise RenderError(
        "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        "tool_choice",
    )


# ---------------------------------------------------------------------------------------------
# Messages


def _collect_turns(
    messages: Sequence[Any], *, ends_with: Literal["user", "assistant"] = "user"
) -> tuple[list[str], list[_UserTurn | _AssistantTurn]]:
    """Split messages into leading system texts and merged user/assistant turns.

    A request ends with a user or tool turn; a training conversation (`ends_with="assistant"`) ends
    with the answer.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise RenderError("messages must be a non-empty array", "messages")
    systems: list[str] = []
    turns: list[_UserTurn | _AssistantTurn] = []

    def add_user(text: str) -> None:
        if turns and isinstance(turns[-1], _UserTurn):
            turns[-1].texts.append(text)
        else:
            turns.append(_UserTurn([text]))

    def add_assistant(content: str | None, calls: list[tuple[str, str]]) -> None:
        if not turns or not isinstance(turns[-1], _AssistantTurn):
            turns.append(_AssistantTurn([]))
        if content:
            turns[-1].contents.append(content)
        turns[-1].calls.extend(calls)

    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise RenderError("each message must be an object", param)
        role = message.get("role")
        content = message.get("content")
        if role in _SYSTEM_ROLES:
            if turns:
                raise RenderError(
                    f"{role} messages must come before the conversation: the model's format has one system turn",
                    f"{param}.role",
                )
            systems.append(_content_text(content, f"{param}.content") or "")
        elif role == "user":
            add_user(_content_text(content, f"{param}.content"))
        elif role == "tool":
            add_user(_content_text(content, f"{param}.content"))
        elif role == "function":
            legacy = _legacy_function_call(content)
            if legacy is None:  # an OpenAI legacy function result
                add_user(_content_text(content, f"{param}.content"))
            else:
                name, arguments, key = legacy
                add_assistant(None, [_call(name, arguments, f"{param}.content", key)])
        elif role == "assistant":
            calls = []
            tool_calls = message.get("tool_calls") or []
            if not isinstance(tool_calls, list):
                raise RenderError("tool_calls must be an array", f"{param}.tool_calls")
            for j, tool_call in enumerate(tool_calls):
                call_param = f"{param}.tool_calls[{j}]"
                if not isinstance(tool_call, Mapping) or tool_call.get("type", "function") != "function":
                    raise RenderError("each tool call must be an object of type 'function'", call_param)
                function = tool_call.get("function")
                if not isinstance(function, Mapping):
                    raise RenderError("a tool call needs a 'function' object", f"{call_param}.function")
                calls.append(_call(function.get("name"), function.get("arguments"), f"{call_param}.function"))
            function_call = message.get("function_call")
            if function_call is not None:
                if not isinstance(function_call, Mapping):
                    raise RenderError("function_call must be an object", f"{param}.function_call")
                calls.append(_call(function_call.get("name"), function_call.get("arguments"), f"{param}.function_call"))
            text = _content_text(content, f"{param}.content", allow_none=bool(calls))
            add_assistant(text, calls)
        else:
            raise RenderError(
                f"unknown role {role!r}; expected system, developer, user, assistant, tool or function",
                f"{param}.role",
            )
    if not turns or not isinstance(turns[0], _UserTurn):
        raise RenderError("the conversation must start with a user message (after any system messages)", "messages")
    if ends_with == "user" and not isinstance(turns[-1], _UserTurn):
        raise RenderError("the last message must be from the user or a tool result", "messages")
    if ends_with == "assistant" and not isinstance(turns[-1], _AssistantTurn):
        raise RenderError("a training conversation must end with an assistant message", "messages")
    return systems, turns


def _turn_items(
    messages: Sequence[Any],
    tools: Sequence[ToolSpec],
    choice: ToolChoice,
    fmt: PromptFormat,
    ends_with: Literal["user", "assistant"] = "user",
) -> list[tuple[Item, bool]]:
    """LLaMA-Factory's items in order, each flagged True when it is an assistant turn."""
    systems, turns = _collect_turns(messages, ends_with=ends_with)
    system = "\n\n".join(s for s in systems if s) or fmt.default_system
    if tools and choice.mode != "none":
        system += render_tool_text(tools, fmt)
    items = [(_fill_item(fmt.system, system), False)]
    first_user = True
    for turn in turns:
        if isinstance(turn, _UserTurn):
            if not first_user:
                items.append((((fmt.separator, True),), False))
            first_user = False
            items.append((_fill_item(fmt.user, "\n".join(turn.texts)), False))
        else:
            content = "\n".join(turn.contents)
            if turn.calls:
                calls = fmt.call_separator.join(
                    fill(fmt.function_call, name=name, arguments=args) for name, args in turn.calls
                )
                content = content + fmt.content_separator + calls if content else calls
            items.append((_fill_item(fmt.assistant, content), True))
    return items


def build_items(
    messages: Sequence[Any], tools: Sequence[ToolSpec], choice: ToolChoice, fmt: PromptFormat
) -> list[Item]:
    """The prompt as LLaMA-Factory's items: system turn, then each turn and separator."""
    return [item for item, _ in _turn_items(messages, tools, choice, fmt)]


def forced_prefix(choice: ToolChoice, fmt: PromptFormat) -> str:
    if choice.mode == "required":
        return fmt.forced_required
    if choice.mode == "named":
        return fill(fmt.forced_named, name=choice.name or "")
    return ""


def check_unicode(value: Any, param: str) -> None:
    """Reject lone UTF-16 surrogates anywhere in `value` (keys included).

    `"\\ud800"` is valid JSON but not text: no tokenizer can encode it (the fast tokenizer raises
    TypeError), so it must be a 400 naming the field. Iterative, so deep nesting cannot recurse.
    """
    stack: list[tuple[Any, str]] = [(value, param)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise RenderError("text must be valid Unicode: it contains a lone UTF-16 surrogate", where)
        elif isinstance(item, Mapping):
            for key, sub in reversed(list(item.items())):
                stack.append((sub, f"{where}.{key}"))
                stack.append((key, where))
        elif isinstance(item, (list, tuple)):
            stack.extend((sub, f"{where}[{i}]") for i, sub in reversed(list(enumerate(item))))


def render_prompt(
    messages: Sequence[Any],
    tools: Sequence[Any] | None,
    tool_choice: Any,
    fmt: PromptFormat,
    encoder: PromptEncoder,
) -> RenderedPrompt:
    """Render an OpenAI chat request (plain JSON values) into the training prompt."""
    check_unicode(messages, "messages")
    check_unicode(tools, "tools")
    specs = normalize_tools(tools)
    choice = normalize_tool_choice(tool_choice, specs)
    items = build_items(messages, specs, choice, fmt)
    ids = [i for item in items for i in encoder.encode_item(item)]
    prefix = forced_prefix(choice, fmt)
    if prefix:
        ids += encoder.encode_text(prefix)
    text = "".join(piece for item in items for piece, _ in item)
    names = tuple(t.name for t in specs) if choice.mode != "none" else ()
    return RenderedPrompt(text=text, ids=ids, forced_prefix=prefix, tool_names=names, tool_choice=choice)


def render_training_turns(
    messages: Sequence[Any], tools: Sequence[Any] | None, fmt: PromptFormat, encoder: PromptEncoder
) -> list[tuple[list[int], list[int]]]:
    """A training conversation (ending with an assistant message) as (prompt ids, answer ids) per
    assistant turn, tools offered as at serving time with `tool_choice` auto.

    This is LLaMA-Factory's `encode_multiturn` computed by the serving renderer: the prompt ids of
    turn k followed by its answer ids, concatenated over turns, are the whole conversation, and the
    prompt ids up to turn k are exactly `render_prompt(...).ids` for the messages before answer k.
    An answer is its text then `<|im_end|>`. Same `RenderError`s as `render_prompt`.
    """
    check_unicode(messages, "messages")
    check_unicode(tools, "tools")
    specs = normalize_tools(tools)
    turns: list[tuple[list[int], list[int]]] = []
    prompt: list[int] = []
    for item, is_answer in _turn_items(messages, specs, ToolChoice("auto" if specs else "none"), fmt, "assistant"):
        if is_answer:
            turns.append((prompt, encoder.encode_item(item)))
            prompt = []
        else:
            prompt += encoder.encode_item(item)
    return turns
