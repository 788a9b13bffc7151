"""The uniform test case every data format is loaded into, and what the judge expects of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

#: One acceptable call in BFCL's possible-answer shape: ``{function_name: {param: [acceptable values]}}``.
#: An empty string among a parameter's values means "may be omitted" (BFCL's convention).
PossibleCall = dict[str, dict[str, list[Any]]]

#: ``calls``: the answer must match one of ``alternatives`` (each a set of calls, any order);
#: ``no_call``: the model must not call a tool (irrelevance); ``any_call``: at least one call (relevance).
ExpectKind = Literal["calls", "no_call", "any_call"]


@dataclass(frozen=True)
class Expected:
    """What a correct answer looks like."""

    kind: ExpectKind
    alternatives: list[list[PossibleCall]] = field(default_factory=list)


@dataclass(frozen=True)
class Case:
    """One request to send and how to judge its answer.

    ``tools`` is what an OpenAI client sends (``{"type": "function", "function": {...}}``, JSON Schema);
    ``functions`` are the function documents the judge checks types against, in the dataset's own type
    spelling (BFCL's ``dict``/``float``/``tuple`` ...), with names as sent (BFCL turns ``a.b`` into ``a_b``).
    """

    id: str
    dataset: str
    category: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    functions: list[dict[str, Any]]
    expected: Expected


class DatasetError(ValueError):
    """A data file that cannot be read as the format it was given as; the message names file and line."""

    def __init__(self, path: object, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
