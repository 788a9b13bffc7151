"""Engine logprobs (`TokenLogprob`) in OpenAI's two response shapes.

Chat (`choices[].logprobs.content[]`): `token`, `logprob`, `bytes` and `top_logprobs` per
generated token. Completions (`choices[].logprobs`): parallel lists `tokens`, `token_logprobs`,
`top_logprobs` (a dict per token: the alternatives and the chosen token) and `text_offset`.

`bytes` is the token's own UTF-8 bytes, exact even when a token holds part of a character; the
`token` string is those bytes decoded, with an incomplete character written as `\\xNN` escapes
(OpenAI's convention), so it is always valid JSON and never silently loses bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.api.protocol import CompletionLogprobs, TokenLogprobOut, TopLogprob
from server.engine.base import TokenLogprob
from server.format.detokenize import token_bytes


class TokenTexts:
    """Token id -> (text, bytes), cached per tokenizer (one per service)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            data = token_bytes(self._tokenizer, token_id)
            cached = self._cache[token_id] = (data.decode("utf-8", errors="backslashreplace"), list(data))
        return cached

    def chat(self, entries: Sequence[TokenLogprob]) -> list[TokenLogprobOut]:
        """The chat shape for a run of tokens."""
        out = []
        for entry in entries:
            text, data = self(entry.token_id)
            top = [TopLogprob(token=self(t)[0], logprob=lp, bytes=self(t)[1]) for t, lp in entry.top]
            out.append(TokenLogprobOut(token=text, logprob=entry.logprob, bytes=data, top_logprobs=top))
        return out

    def completion(self, entries: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
        """The completions shape for a run of tokens whose text starts at character `offset`."""
        result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for entry in entries:
            text = self(entry.token_id)[0]
            top = {self(t)[0]: lp for t, lp in entry.top}
            top.setdefault(text, entry.logprob)
            result.tokens.append(text)
            result.token_logprobs.append(entry.logprob)
            result.top_logprobs.append(top)
            result.text_offset.append(offset)
            offset += len(text)
        return result
