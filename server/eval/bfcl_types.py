"""BFCL function documents -> the OpenAI ``tools`` BFCL's own OpenAI function-calling handler sends.

A port of ``bfcl_eval`` (2026.3.23): ``utils.add_language_specific_hint_to_function_doc`` (Python
categories) and ``model_handler.utils.convert_to_tool`` with ``GORILLA_TO_OPENAPI`` for
``ModelStyle.OPENAI_COMPLETIONS``.  The ``bfcl-eval`` package itself is not a dependency: importing
it pulls its whole model stack (vllm extras aside: anthropic, cohere, mistralai, google-genai,
sentence-transformers, faiss, ``numpy==1.26.4``).  Ported so the served prompt is exactly what an
OpenAI client running BFCL would produce.
"""

from __future__ import annotations

import copy
from typing import Any

#: bfcl_eval.constants.type_mappings.GORILLA_TO_OPENAPI
GORILLA_TO_OPENAPI: dict[str, str] = {
    "integer": "integer",
    "number": "number",
    "float": "number",
    "string": "string",
    "boolean": "boolean",
    "bool": "boolean",
    "array": "array",
    "list": "array",
    "dict": "object",
    "object": "object",
    "tuple": "array",
    "any": "string",
    "byte": "integer",
    "short": "integer",
    "long": "integer",
    "double": "number",
    "char": "string",
    "ArrayList": "array",
    "Array": "array",
    "HashMap": "object",
    "Hashtable": "object",
    "Queue": "array",
    "Stack": "array",
    "Any": "string",
    "String": "string",
    "Bigint": "integer",
}

#: What BFCL appends to every Python-category function description before sending or judging.
PYTHON_HINT = " Note that the provided function is in Python 3 syntax."


def openai_name(name: str) -> str:
    """OpenAI allows ``^[a-zA-Z0-9_-]{1,64}$``; BFCL sends ``math.factorial`` as ``math_factorial``
    and judges the answer against the converted name (``ast_checker.convert_func_name``)."""
    return name.replace(".", "_")


def with_python_hint(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``functions`` with BFCL's Python hint appended to each description."""
    hinted = copy.deepcopy(functions)
    for function in hinted:
        function["description"] = function.get("description", "") + PYTHON_HINT
    return hinted


def _openapi_type(bfcl_type: Any) -> str:
    return GORILLA_TO_OPENAPI.get(bfcl_type, "string")


def _cast_properties(properties: dict[str, Any]) -> dict[str, Any]:
    """``_cast_to_openai_type``: types mapped (unknown or missing -> string), floats flagged in the
    description, nested ``properties`` and ``items`` (list of any/list/dict, dict of any) converted."""
    for schema in properties.values():
        if "type" not in schema:
            schema["type"] = "string"
        else:
            if schema["type"] == "float":
                schema["format"] = "float"
                schema["description"] = schema.get("description", "") + " This is a float type value."
            schema["type"] = _openapi_type(schema["type"])
        if schema["type"] in ("array", "object"):
            if "properties" in schema:
                schema["properties"] = _cast_properties(schema["properties"])
            elif "items" in schema:
                items = schema["items"]
                items["type"] = _openapi_type(items.get("type"))
                if items["type"] == "array" and "items" in items:
                    items["items"]["type"] = _openapi_type(items["items"].get("type"))
                elif items["type"] == "object" and "properties" in items:
                    items["properties"] = _cast_properties(items["properties"])
    return properties


def bfcl_to_openai_tools(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``convert_to_tool(functions, GORILLA_TO_OPENAPI, ModelStyle.OPENAI_COMPLETIONS)``."""
    tools = []
    for function in copy.deepcopy(functions):
        function["name"] = openai_name(function["name"])
        parameters = function.setdefault("parameters", {})
        parameters["type"] = "object"
        parameters["properties"] = _cast_properties(parameters.get("properties", {}))
        tools.append({"type": "function", "function": function})
    return tools
