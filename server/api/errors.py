"""Every error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Handlers are installed on the app so that no FastAPI/Starlette default body (`{"detail": ...}`,
422 validation errors) ever reaches a client. 500 is reserved for real bugs.

Types and codes follow what api.openai.com answers: 401 and 404 (unknown model or URL) are
`invalid_request_error` too (the SDKs pick the exception class from the status, not the type);
a wrong JSON type is code `invalid_type`, a value out of range `invalid_value`; a body that is
not JSON (bad bytes, or a Content-Type other than application/json) is 400 `invalid_json`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("agent_server")

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered to the client as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return _ErrorJSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _ErrorJSONResponse(JSONResponse):
    """ASCII-escaped JSON: messages echo client input (model names, field names), and a lone
    surrogate such as "\\ud800" cannot be encoded as UTF-8; escaped, it is still valid JSON."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "none", "list", "dict", "literal"})


def internal_error() -> APIError:
    """What a client sees of a bug: OpenAI's 500, no details (they go to the log)."""
    return APIError(500, "The server had an error while processing your request.", type="server_error")


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 3, 'content') -> 'messages[3].content'.

    Pydantic puts the union branch it tried into the location ('messages', 0, 'content', 'str';
    'tool_choice', 'NamedToolChoice', 'function'); those labels are not request fields. Fields
    are snake_case, so labels are told apart by brackets, a type name, or a capital first letter.
    """
    parts = loc[1:] if loc[:1] == ("body",) else loc
    param = ""
    for part in parts:
        if isinstance(part, int):
            param += f"[{part}]"
        elif isinstance(part, str) and (
            "[" in part or "," in part or part.startswith("function-") or part in _TYPE_LABELS or part[:1].isupper()
        ):
            continue  # e.g. 'list[ContentPart]', 'str', 'NamedToolChoice'
        else:
            param += f".{part}" if param else str(part)
    return param or None


_NOT_JSON = "We could not parse the JSON body of your request. (HINT: send valid JSON.)"


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def validation_error(exc: RequestValidationError, content_type: str = "application/json") -> APIError:
    """The first pydantic error as OpenAI would word it; `content_type` is the request's header."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = tuple(first.get("loc", ()))
    param = _loc_to_param(loc)
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, _NOT_JSON, code="invalid_json")
    if param is None:  # the body as a whole: FastAPI only parses it as JSON for a JSON content type
        if not _is_json(content_type):
            shown = content_type or "none"
            return APIError(
                400, f"{_NOT_JSON} Send it with 'Content-Type: application/json' (got: {shown}).", code="invalid_json"
            )
        if kind == "missing":
            return APIError(400, "The request body is empty: send a JSON object.", code="missing_required_parameter")
        return APIError(400, "The request body must be a JSON object.", code="invalid_type")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    message = first.get("msg", "invalid value")
    if kind.endswith("_type") or kind.endswith("_parsing"):  # e.g. string_type, int_parsing
        return APIError(400, f"Invalid type for '{param}': {message}", param=param, code="invalid_type")
    return APIError(400, f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


def _openapi_without_422(app: FastAPI) -> None:
    """FastAPI documents a 422 on every route that validates input, but this server answers
    validation errors with 400 (OpenAI's status), so the schema must not promise a 422 body."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # cached by FastAPI after the first call; the edit is idempotent
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if isinstance(operation, dict):
                    operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    _openapi_without_422(app)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc, request.headers.get("content-type", "")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}."
            return APIError(404, message, code="unknown_url").response()
        if exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}."
            # Starlette's 405 carries the `Allow` header, which HTTP requires on a 405: keep it.
            return APIError(405, message, code="method_not_allowed", headers=exc.headers).response()
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            return APIError(400, _NOT_JSON, code="invalid_json").response()  # not UTF-8, or nested too deeply
        return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return internal_error().response()
