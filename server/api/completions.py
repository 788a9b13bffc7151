"""POST /v1/completions: the raw-prompt API on the chat layer's engine path, without tool parsing.

The caller wrote the whole model input, template included, so a prompt string is tokenized as the
model's tokenizer reads it: control-token strings in it (`<|im_start|>`, `<|im_end|>`) ARE control
tokens (unlike chat content, which can never produce one). A list of token ids is used as is.
Generation, stop strings, `n`, seeds and logprobs are the chat layer's (`ChatService.events`);
the output is plain text.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

import pydantic_core

from server.api.chat import ChatService, ChoiceDone, PreparedChat, TokenLogprobs, new_id
from server.api.errors import APIError
from server.api.protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from server.api.sse import TextChunks
from server.engine.base import EngineError, Generation, TokenLogprob
from server.format.parse import ContentDelta
from server.format.render import RenderedPrompt, RenderError, ToolChoice, check_unicode


@dataclass(frozen=True)
class PreparedCompletion:
    chat: PreparedChat
    echo: str  # the prompt text when `echo` is set, else ""


class CompletionService:
    """Text completions on the chat service's engine and event path."""

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    def prompt_ids(self, prompt: str | list[int] | list[str] | list[list[int]], param: str = "prompt") -> list[int]:
        """The prompt as token ids (see the module docstring); one prompt per request."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "This server takes one prompt per request; send the prompts as separate requests.",
                               param=param, code="invalid_value")
            prompt = prompt[0]
        tokenizer = self.chat.engine.tokenizer
        if isinstance(prompt, str):
            try:
                check_unicode(prompt, param)
            except RenderError as exc:
                raise APIError(400, exc.message, param=exc.param, code="invalid_value") from None
            ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        else:
            ids = list(prompt)  # type: ignore[arg-type]
            vocab = len(tokenizer)
            bad = next((i for i in ids if i >= vocab), None)
            if bad is not None:
                raise APIError(400, f"Token id {bad} is out of the vocabulary (0 to {vocab - 1}).", param=param,
                               code="invalid_value")
        if not ids:
            raise APIError(400, "The prompt is empty.", param=param, code="invalid_value")
        return ids

    def prepare(self, req: CompletionRequest) -> PreparedCompletion:
        service = self.chat
        service.check_request(req)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs needs the prompt's logprobs, which this server does not compute.",
                           param="echo", code="unsupported_parameter")
        ids = self.prompt_ids(req.prompt)
        text = service.engine.tokenizer.decode(ids)
        params = service.sampling(req, len(ids), req.max_tokens, "max_tokens", logprobs=req.logprobs,
                                  prompt_param="prompt")
        prompt = RenderedPrompt(text=text, ids=ids, forced_prefix="", tool_names=(),
                                tool_choice=ToolChoice("none"))
        chat = PreparedChat(
            id=new_id("cmpl-"),
            created=int(time.time()),
            model=service.model_name,
            prompt=prompt,
            params=params,
            stops=req.stop_sequences(),
            max_calls=None,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            legacy_functions=False,
            started=time.perf_counter(),
            n=req.n or 1,
        )
        return PreparedCompletion(chat, text if req.echo else "")

    def submit(self, prepared: PreparedCompletion) -> list[Generation]:
        return self.chat.submit(prepared.chat)

    def _logprobs(self, prepared: PreparedCompletion, entries: list[TokenLogprob], offset: int) -> CompletionLogprobs | None:
        if prepared.chat.params.logprobs is None:
            return None
        return self.chat.token_texts.completion(entries, offset)

    async def complete(self, prepared: PreparedCompletion, generations: list[Generation]) -> Completion:
        chat = prepared.chat
        results = await self.chat.collect(chat, generations)
        choices = [
            CompletionChoice(index=i, text=prepared.echo + r.text, finish_reason=r.finish_reason,  # type: ignore[arg-type]
                             logprobs=self._logprobs(prepared, r.logprobs, len(prepared.echo)))
            for i, r in enumerate(results)
        ]
        return Completion(id=chat.id, created=chat.created, model=chat.model, choices=choices,
                          usage=self.chat.usage(chat, sum(r.completion_tokens for r in results)))

    async def stream(self, prepared: PreparedCompletion, generations: list[Generation]) -> AsyncGenerator[str, None]:
        """SSE payloads: text chunks per choice (logprobs on the next chunk of their choice), a final
        chunk per choice with its finish_reason, optional usage chunk, [DONE]."""
        chat = prepared.chat
        pending: list[list[TokenLogprob]] = [[] for _ in generations]
        offsets = [len(prepared.echo)] * len(generations)

        def chunk(index: int, text: str, finish_reason: str | None = None) -> str:
            logprobs = None
            if chat.params.logprobs is not None and (pending[index] or finish_reason is not None):
                logprobs = self._logprobs(prepared, pending[index], offsets[index])
                offsets[index] += sum(len(t) for t in logprobs.tokens) if logprobs else 0
                pending[index] = []
            body = Completion(id=chat.id, created=chat.created, model=chat.model, choices=[
                CompletionChoice(index=index, text=text, finish_reason=finish_reason, logprobs=logprobs)])  # type: ignore[arg-type]
            return body.model_dump_json(exclude={"usage"})

        spliced = TextChunks(chunk, lambda t: pydantic_core.to_json(t).decode())  # the per-token chunks

        if prepared.echo:
            for index in range(len(generations)):
                yield chunk(index, prepared.echo)
        completion_tokens = 0
        try:
            async with aclosing(self.chat.events(chat, generations)) as events:
                async for index, event in events:
                    if isinstance(event, TokenLogprobs):
                        pending[index].extend(event.entries)
                    elif isinstance(event, ContentDelta):
                        yield chunk(index, event.text) if pending[index] else spliced(index, event.text)
                    elif isinstance(event, ChoiceDone):
                        completion_tokens += event.completion_tokens
                        yield chunk(index, "", event.finish_reason)
        except EngineError as exc:  # headers are sent: report in-band, as OpenAI does
            yield json.dumps(APIError(503, f"Generation failed: {exc}.", type="server_error").body())
            return
        if chat.include_usage:
            usage = Completion(id=chat.id, created=chat.created, model=chat.model, choices=[],
                               usage=self.chat.usage(chat, completion_tokens))
            yield usage.model_dump_json()
        yield "[DONE]"
