"""OpenAI wire models for /v1/chat/completions and /v1/models, and nothing else.

Requests are validated for shape and ranges here (so FastAPI's OpenAPI schema is truthful);
what depends on the meaning of a conversation (roles, tool names, tool_choice) is checked by
the renderer, which knows the format. Unknown request fields are rejected like OpenAI does.

Request models are strict: OpenAI answers `"max_tokens": true`, `"temperature": "0.5"` or
`"stream": "yes"` with a 400 (`invalid_type`), and so do we; pydantic's lax mode would quietly
coerce them. Integers are still accepted where a number is expected, and a float with no
fractional part where an integer is (JSON has one number type; JSON Schema calls 2.0 an integer).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from server.format.render import TOOL_NAME_PATTERN


def _integral(value: Any) -> Any:
    """2.0 -> 2 (e.g. from a client that only has floats); 2.5 and true still fail as integers."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


_INTEGRAL = BeforeValidator(_integral)  # after the bounds in `Annotated`, or the schema loses them


class _Open(BaseModel):
    """Nested objects accept extra keys (clients send e.g. `strict`, `cache_control`)."""

    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(_Open):
    type: str
    text: str | None = None


class FunctionCall(_Open):
    name: str
    arguments: str | dict[str, Any]


class ToolCall(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None


class FunctionDefinition(_Open):
    # Checked by the renderer (with a clearer message); stated here so the schema is truthful.
    name: str = Field(json_schema_extra={"pattern": TOOL_NAME_PATTERN.pattern})
    description: str | None = None
    parameters: dict[str, Any] | None = None
    # True: auto-mode calls of this tool are held to `parameters` by a grammar (required/named always are).
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Open):
    include_usage: bool = False


class ResponseFormat(_Open):
    """`json_schema` is `{"name", "schema", "strict", "description"}`; server.format.grammar checks it."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(BaseModel):
    """The request body. Fields OpenAI has but this server cannot honour are accepted by the
    schema and refused by `unsupported_fields` with a 400 that names them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: Annotated[int, Field(ge=1), _INTEGRAL] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), _INTEGRAL] | None = None
    # Checked by `_stop_sequences` (one clear message); the schema states the same limits.
    stop: str | list[str] | None = Field(
        default=None,
        json_schema_extra={"anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
            {"type": "null"},
        ]},
    )
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1), _INTEGRAL] | None = None
    n: Annotated[int, Field(ge=1, le=128), _INTEGRAL] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None
    # Accepted for compatibility, no effect on generation.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # Known to OpenAI, refused unless neutral (see `unsupported_fields`).
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20), _INTEGRAL] | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value: str | list[str] | None) -> str | list[str] | None:
        sequences = [value] if isinstance(value, str) else value or []
        if len(sequences) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in sequences):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported_fields(self) -> list[str]:
        """Fields set to something this server does not implement (each is a 400)."""
        refused = []
        if self.logprobs:
            refused.append("logprobs")
        if self.top_logprobs:
            refused.append("top_logprobs")
        if self.logit_bias:
            refused.append("logit_bias")
        if self.n is not None and self.n > 1:
            refused.append("n")
        return refused


# ---------------------------------------------------------------------------------------------
# Responses

FinishReason = Literal["stop", "length", "tool_calls", "function_call"]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = Field(default=None, exclude_if=lambda v: v is None)
    # Only for requests that used the legacy `functions`, as OpenAI answers them.
    function_call: FunctionCallOut | None = Field(default=None, exclude_if=lambda v: v is None)


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionCallDelta | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "agent-server"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
