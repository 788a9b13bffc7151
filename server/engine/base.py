"""The engine interface: what the chat layer needs from whatever generates tokens.

The request logic (`server.api`) renders prompts to token ids, submits them with per-request
sampling, reads new token ids back asynchronously and closes the handle to cancel. It never
knows which engine it talks to: the built-in transformers engine (`server.engine.builtin`) and
vLLM over HTTP (`server.engine.vllm`) implement the same two classes below.

Admission control lives here, shared by both: at most `max_running + max_queued` requests are
in flight; beyond that `submit` raises `EngineOverloaded` (HTTP 429) before any stream starts.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Engine",
    "EngineError",
    "EngineOverloaded",
    "EngineUnavailable",
    "Generation",
    "SamplingParams",
    "StepOutput",
    "TokenLogprob",
]


class EngineOverloaded(Exception):
    """No room for another request right now (HTTP 429 with Retry-After)."""


class EngineError(Exception):
    """Generation failed inside the engine (not the request's fault)."""


class EngineUnavailable(EngineError):
    """The engine cannot be reached right now (HTTP 503); service resumes when it is back."""


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of generation; both engines honour every field."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Additive bias per token id (OpenAI `logit_bias`).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Return the chosen token's logprob and this many alternatives per token (None: no logprobs).
    logprobs: int | None = None
    # An llguidance grammar (Lark with %json) the output must match; None: unconstrained.
    grammar: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_p == 0


@dataclass(frozen=True)
class TokenLogprob:
    """The logprob of a generated token and the `top` alternatives (id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StepOutput:
    """New tokens of one sequence (stop token removed); `finish_reason` on the last one.

    `logprobs` (when the request asked for them) has one entry per token of `token_ids`, in order;
    the built-in engine reports the distribution after penalties, bias and masks, before
    temperature/top-p (README "Logprobs").
    """

    token_ids: list[int]
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: list[TokenLogprob] | None = field(default=None)


class Engine(abc.ABC):
    """Generates for many requests at once; `submit` is the only way in."""

    #: Label for metrics and logs ("builtin", "vllm").
    name: str = "engine"
    tokenizer: Any
    max_model_len: int

    def __init__(self, *, max_running: int, max_queued: int) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self.admitted = 0  # running + waiting, counted by `Generation`
        self.running = 0

    @property
    def queued(self) -> int:
        return self.admitted - self.running

    @property
    def supports_grammar(self) -> bool:
        """Whether `SamplingParams.grammar` is enforced; requests that need one are refused otherwise,
        never answered unconstrained."""
        return True

    @property
    def available(self) -> bool:
        """Whether requests can be served now (`/health`); engines that can go away override it."""
        return True

    async def start(self) -> None:
        """Get ready to serve (load, connect, check); called once from the app's lifespan."""

    async def stop(self) -> None:
        """Release threads, connections and child processes."""

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """Admit a request now (or raise EngineOverloaded / EngineUnavailable); tokens come from the handle."""
        if len(prompt_ids) + params.max_new_tokens > self.max_model_len:
            raise ValueError("prompt + max_new_tokens exceeds max_model_len")  # callers check first
        if not self.available:
            raise EngineUnavailable(f"the {self.name} engine is not available")
        if self.admitted >= self.max_running + self.max_queued:
            raise EngineOverloaded(f"{self.running} requests running and {self.queued} queued")
        generation = self._generation(list(prompt_ids), params)
        self.admitted += 1
        return generation

    @abc.abstractmethod
    def _generation(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """A handle for an admitted request; it starts generating when first iterated."""


class Generation(abc.ABC):
    """One sequence: an async iterator of `StepOutput`; `aclose()` cancels it.

    It holds its admission until it finishes or is closed; a handle dropped unused releases it
    when garbage-collected. Subclasses call `_mark_running()` once the sequence holds a running
    slot and implement `_next()` / `_cancel()`.
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams) -> None:
        self._engine = engine
        self.prompt_ids = prompt_ids
        self.params = params
        self._running = False
        self._done = False

    def __aiter__(self) -> AsyncIterator[StepOutput]:
        return self

    async def __anext__(self) -> StepOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            output = await self._next()
        except BaseException:
            await self.aclose()
            raise
        if output.finish_reason is not None:
            self._release(finished=True)
        return output

    async def aclose(self) -> None:
        """Cancel the sequence if it is still in the engine, and give back its admission."""
        self._release(finished=False)

    def _mark_running(self) -> None:
        self._running = True
        self._engine.running += 1

    def _release(self, *, finished: bool) -> None:
        if self._done:
            return
        self._done = True
        self._cancel(finished=finished)
        if self._running:
            self._engine.running -= 1
            self._on_slot_released()
        self._engine.admitted -= 1

    @abc.abstractmethod
    async def _next(self) -> StepOutput:
        """The next tokens; raises EngineError when the engine fails."""

    @abc.abstractmethod
    def _cancel(self, *, finished: bool) -> None:
        """Drop the sequence from the engine (unless `finished`) and forget per-request state."""

    def _on_slot_released(self) -> None:
        """Hook for engines that gate running slots themselves."""

    def __del__(self) -> None:
        if not self._done:
            self._release(finished=False)
