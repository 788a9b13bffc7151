"""Send cases to any OpenAI-compatible server (`/v1/chat/completions` with tools) and judge the answers.

The official ``openai`` SDK is the client, so what is measured is what an OpenAI client gets.  Requests
run ``concurrency`` at a time; a failed request is recorded as a ``request_error`` result, never raised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import openai
from tqdm import tqdm

from server.eval.cases import Case
from server.eval.judge import ToolCall, Verdict, judge


@dataclass(frozen=True)
class Result:
    """One case's answer: the calls and text the server returned, BFCL's verdict and the request latency
    (``None`` when the request failed: then the verdict is ``request_error`` and its detail says why)."""

    case: Case
    verdict: Verdict
    calls: list[ToolCall]
    content: str | None
    latency_s: float | None


@dataclass(frozen=True)
class ClientOptions:
    """How to reach the server and sample; ``model=None`` asks the server's ``/v1/models`` for the first."""

    base_url: str
    api_key: str = "EMPTY"
    model: str | None = None
    temperature: float = 0.0
    max_tokens: int | None = None
    timeout_s: float = 600.0
    max_retries: int = 2


def request_body(case: Case, model: str, options: ClientOptions) -> dict[str, Any]:
    """The `chat.completions.create` arguments for one case (``tools`` only when there are some)."""
    body: dict[str, Any] = {"model": model, "messages": case.messages, "temperature": options.temperature}
    if case.tools:
        body["tools"] = case.tools
    if options.max_tokens is not None:
        body["max_tokens"] = options.max_tokens
    return body


async def resolve_model(client: openai.AsyncOpenAI, model: str | None) -> str:
    """``model`` if given, else the first model the server lists (this server lists the one it serves)."""
    if model:
        return model
    listed = await client.models.list()
    if not listed.data:
        raise RuntimeError("the server lists no models; pass --model")
    return listed.data[0].id


async def _run_one(client: openai.AsyncOpenAI, case: Case, model: str, options: ClientOptions) -> Result:
    started = time.perf_counter()
    try:
        response = await client.chat.completions.create(**request_body(case, model, options))
    except openai.OpenAIError as exc:
        return Result(case, Verdict(False, "request_error", f"{type(exc).__name__}: {exc}"), [], None, None)
    latency = time.perf_counter() - started
    if not response.choices:
        return Result(case, Verdict(False, "request_error", "no choices in the response"), [], None, latency)
    message = response.choices[0].message
    calls = [ToolCall(c.function.name, c.function.arguments) for c in message.tool_calls or [] if c.type == "function"]
    return Result(case, judge(case.functions, case.expected, calls), calls, message.content, latency)


async def run_cases(cases: Sequence[Case], options: ClientOptions, *, concurrency: int = 4, progress: bool = True) -> tuple[str, list[Result]]:
    """(model name used, one :class:`Result` per case in order), with a progress bar on stderr."""
    async with openai.AsyncOpenAI(
        base_url=options.base_url, api_key=options.api_key, timeout=options.timeout_s, max_retries=options.max_retries
    ) as client:
        model = await resolve_model(client, options.model)
        limiter = asyncio.Semaphore(concurrency)
        with tqdm(total=len(cases), desc="eval", unit="req", disable=not progress) as bar:

            async def bounded(case: Case) -> Result:
                async with limiter:
                    result = await _run_one(client, case, model, options)
                bar.update()
                return result

            results = await asyncio.gather(*(bounded(case) for case in cases))
    return model, list(results)
