"""OpenAI wire models for /v1/chat/completions, /v1/completions, /v1/models and the vLLM-style
utility routes (/tokenize, /detokenize, render), and nothing else (Responses: responses_protocol.py).

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


#: Why each refused field is refused (the 400's message).
REFUSED_BECAUSE = {
    "audio": "this server answers with text only",
    "modalities": "this server answers with text only",
    "prediction": "predicted outputs are not implemented",
    "web_search_options": "this server has no web search",
    "suffix": "inserting text needs a fill-in-the-middle model",
    "best_of": "best_of must equal n (server-side ranking is not implemented)",
    "background": "background responses are not implemented",
    "conversation": "the Conversations API is not implemented; use previous_response_id",
    "prompt": "stored prompt templates are not implemented",
    "max_tool_calls": "limiting tool calls across a response is not implemented",
}


class NeutralFields(BaseModel):
    """Fields every generation request (chat, completions, responses) accepts and ignores: billing,
    caching and abuse-tracking labels that do not change the answer (README "Accepted and ignored")."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None

    def unsupported_fields(self) -> list[str]:
        """Fields set to something this server cannot honour (each is a 400 naming it)."""
        return []


class OpenAIRequest(NeutralFields):
    """Chat and text completions: the neutral fields, plus those OpenAI has on these routes.

    Neutral too: `reasoning_effort` and `verbosity` (hints for reasoning models; this model does not
    reason and its answers are as long as it was trained to make them), `modalities: ["text"]` (what
    the server answers anyway). Refused (400 naming the field, see `unsupported_fields`): `audio`
    and `modalities` with "audio" (the client expects audio back), `prediction` (the client expects
    a predicted-output diff and its token accounting), `web_search_options` (the client expects
    answers grounded in a web search, with citations).
    """

    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None

    def unsupported_fields(self) -> list[str]:
        refused = super().unsupported_fields()
        if self.audio is not None:
            refused.append("audio")
        if self.modalities and "audio" in self.modalities:
            refused.append("modalities")
        if self.prediction is not None:
            refused.append("prediction")
        if self.web_search_options is not None:
            refused.append("web_search_options")
        return refused


_STOP_SCHEMA = {"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
    {"type": "null"},
]}


def _check_stop(value: str | list[str] | None) -> str | list[str] | None:
    sequences = [value] if isinstance(value, str) else value or []
    if len(sequences) > 4:
        raise ValueError("at most 4 stop sequences")
    if any(not s for s in sequences):
        raise ValueError("stop sequences must be non-empty strings")
    return value


class SamplingRequest(OpenAIRequest):
    """Sampling fields shared by chat and text completions."""

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    # Checked by `_stop_sequences` (one clear message); the schema states the same limits.
    stop: str | list[str] | None = Field(default=None, json_schema_extra=_STOP_SCHEMA)
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1), _INTEGRAL] | None = None
    n: Annotated[int, Field(ge=1, le=128), _INTEGRAL] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # Token id (as a string, JSON keys are strings) -> bias in [-100, 100]; ids checked against the vocabulary.
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value: str | list[str] | None) -> str | list[str] | None:
        return _check_stop(value)

    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(SamplingRequest):
    """The request body. Fields OpenAI has but this server cannot honour are accepted by the
    schema and refused by `unsupported_fields` with a 400 that names them."""

    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    max_tokens: Annotated[int, Field(ge=1), _INTEGRAL] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), _INTEGRAL] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20), _INTEGRAL] | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: the raw-prompt API. `prompt` is the whole model input: a string in
    which control-token strings (`<|im_start|>`, ...) are control tokens, or token ids."""

    prompt: str | list[Annotated[int, Field(ge=0)]] | list[str] | list[list[Annotated[int, Field(ge=0)]]]
    max_tokens: Annotated[int, Field(ge=1), _INTEGRAL] | None = 16  # OpenAI's (and vLLM's) default
    logprobs: Annotated[int, Field(ge=0, le=5), _INTEGRAL] | None = None
    echo: bool | None = False
    best_of: Annotated[int, Field(ge=1, le=20), _INTEGRAL] | None = None
    suffix: str | None = None

    def unsupported_fields(self) -> list[str]:
        refused = super().unsupported_fields()
        if self.suffix:
            refused.append("suffix")  # insertion needs a fill-in-the-middle model
        if self.best_of is not None and self.best_of != (self.n or 1):
            refused.append("best_of")
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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


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
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ---------------------------------------------------------------------------------------------
# Utility routes (vLLM's shapes) and the prompt a chat request renders to


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: either `prompt` (raw text, control-token strings are control tokens) or a
    chat request's `messages` (+ `tools`), rendered exactly as /v1/chat/completions renders them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # Qwen adds none either way
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class RenderedChat(BaseModel):
    """POST /v1/chat/completions/render: what the model sees for a chat request."""

    prompt: str = Field(description="The exact model input as text (forced prefix included), control tokens spelled out")
    token_ids: list[int]
    count: int
    forced_prefix: str = Field(description="Assistant text imposed by tool_choice (already at the end of prompt)")
    tool_names: list[str] = Field(description="Tools whose calls are parsed from the output")


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
