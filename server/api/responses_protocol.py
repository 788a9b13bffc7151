"""OpenAI Responses API wire models (POST/GET/DELETE /v1/responses), and nothing else.

Requests are strict like the chat models (`server.api.protocol`); input items and tools are open
objects checked by `server.api.responses` when they are translated to chat messages, so that
every problem is a 400 naming the item (`input[2].call_id`) rather than a pydantic union error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.protocol import _INTEGRAL, NeutralFields, _Open


LOGPROBS_INCLUDE = "message.output_text.logprobs"


class ContentPartIn(_Open):
    """`input_text` / `output_text` (text), `refusal`; images, files and audio are refused."""

    type: str
    text: str | None = None


class InputItem(_Open):
    """A message (`type` "message" or absent), `function_call` or `function_call_output` item."""

    type: str | None = None
    role: str | None = None
    content: str | list[ContentPartIn] | None = None
    id: str | None = None
    status: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPartIn] | None = None


class FunctionToolIn(_Open):
    """A tool in the Responses shape: `name`, `description`, `parameters`, `strict` at the top."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(_Open):
    type: str
    name: str | None = None


class TextFormat(_Open):
    """`text`, `json_schema` (`name`, `schema`, `strict`, `description`) or `json_object`."""

    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Open):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponseRequest(NeutralFields):
    """POST /v1/responses. Accepted and ignored beyond the neutral fields:
    `reasoning` (no reasoning in this model), `include` entries for items this server never
    produces, `truncation` (the request is a 400 when it does not fit, whatever the mode),
    `stream_options`. Refused: `background`, `conversation`, `prompt` (server-side objects this
    server does not have), `max_tool_calls`. Logprobs: `include: ["message.output_text.logprobs"]`
    (with `top_logprobs` alternatives) puts them on `output_text` parts and text deltas."""

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, Field(ge=1), _INTEGRAL] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    previous_response_id: str | None = None
    text: TextConfig | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20), _INTEGRAL] | None = None
    max_tool_calls: Annotated[int, Field(ge=1), _INTEGRAL] | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or [])

    def unsupported_fields(self) -> list[str]:
        refused = super().unsupported_fields()
        if self.background:
            refused.append("background")
        if self.conversation is not None:
            refused.append("conversation")
        if self.prompt is not None:
            refused.append("prompt")
        if self.max_tool_calls is not None:
            refused.append("max_tool_calls")
        return refused


# ---------------------------------------------------------------------------------------------
# Output


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class MessageItem(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = MessageItem | FunctionCallItem


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(BaseModel):
    code: str
    message: str


class Response(BaseModel):
    """The response object, as POST returns it, GET reads it back and stream events carry it."""

    model_config = ConfigDict(populate_by_name=True)

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    store: bool = True
    temperature: float = 1.0
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float = 1.0
    top_logprobs: int | None = None
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    background: bool = False
    service_tier: str = "default"


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
