"""The prompt formats the server can render, as data.

Each format is one TOML file beside this module; `load_format` reads it into a frozen
`PromptFormat`. Keeping the text out of the code means a person can read (and diff) the
whole training format in one place, and the renderer stays a small template filler.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from functools import cache
from importlib import resources

DEFAULT_FORMAT = "qwen_react_v0.6.3"


@dataclass(frozen=True)
class PromptFormat:
    """The pieces of one training format; field names match the TOML keys."""

    default_system: str
    system: str
    user: str
    observation: str
    assistant: str
    separator: str
    function_call: str
    call_separator: str
    content_separator: str
    tool_prompt: str
    tool_names_separator: str
    tool_entry: str
    tool_arg: str
    tool_arg_required: str
    tool_arg_enum: str
    tool_arg_enum_separator: str
    tool_arg_items: str
    forced_required: str
    forced_named: str


def available_formats() -> list[str]:
    """Names of the formats shipped in this package."""
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in resources.files(__package__).iterdir()
        if entry.name.endswith(".toml")
    )


@cache
def load_format(name: str = DEFAULT_FORMAT) -> PromptFormat:
    """Read format `name` from the package data (works from a non-editable install)."""
    if name not in available_formats():
        raise ValueError(f"unknown prompt format {name!r}; available: {available_formats()}")
    data = tomllib.loads(resources.files(__package__).joinpath(f"{name}.toml").read_text("utf-8"))
    expected = {f.name for f in fields(PromptFormat)}
    if set(data) != expected:
        raise ValueError(f"prompt format {name!r}: keys differ from PromptFormat: {sorted(set(data) ^ expected)}")
    return PromptFormat(**data)
