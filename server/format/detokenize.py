"""Incremental (streaming) detokenization.

Why this exists: when streaming a completion we get one token id at a time, but a single UTF-8
character (Chinese, emoji, ...) is often split across several byte-level BPE tokens.  Decoding each
token on its own yields U+FFFD replacement characters and, joined up, text that differs from
``tokenizer.decode(all_ids)``.  :class:`IncrementalDetokenizer` emits text only once it is complete.

Guarantees (for tokenizers whose :meth:`decode` is a pure function of the ids, as Qwen's is):

* ``"".join(d.push(i) for i in ids) + d.flush() == tokenizer.decode(ids, skip_special_tokens=...)``
  with ``skip_special_tokens=False`` by default, i.e. control tokens such as ``<|im_end|>`` come out
  as their literal text (the caller decides what to do with them; pass ``skip_special_tokens=True``
  to drop them, matching ``decode(..., skip_special_tokens=True)``);
* a chunk never contains U+FFFD caused by a character that is split across tokens.  U+FFFD only
  appears where the full decode has it too (genuinely invalid bytes, or a literal U+FFFD in the
  text); an incomplete character still pending at the end comes out of :meth:`flush` as U+FFFD,
  exactly as ``decode`` renders it;
* constant work per token.

Two strategies, picked automatically:

``"bytes"`` (byte-level BPE tokenizers such as Qwen's, GPT-2's, Llama 3's)
    Each token id is mapped to its raw bytes exactly as the ``tokenizers`` ByteLevel decoder does,
    and the bytes are fed to Python's incremental UTF-8 decoder (``errors="replace"``), which holds
    back an incomplete trailing sequence and replaces invalid bytes the same way Rust's
    ``String::from_utf8_lossy`` does.  Strictly O(1) per token, and exact even when a token both
    completes one character and starts the next.

``"window"`` (any other tokenizer)
    The usual prefix-offset scheme (as in TGI / vLLM): decode ``ids[prefix_offset:]`` and
    ``ids[prefix_offset:read_offset]`` and emit the difference once the newer text does not end in
    U+FFFD; then advance the offsets.  Decoding from a prefix offset (rather than from the new token)
    keeps tokenizers that drop a leading space at the start of a decode (SentencePiece) correct.
    Ids before the prefix offset are dropped, so each step decodes a small window; the window only
    grows while the text keeps ending in U+FFFD (e.g. a run of tokens each ending mid-character).
"""

from __future__ import annotations

import codecs
from typing import Any, Literal

from transformers.convert_slow_tokenizer import bytes_to_unicode

__all__ = ["IncrementalDetokenizer", "token_bytes"]

Strategy = Literal["auto", "bytes", "window"]


# Inverse of GPT-2's byte -> printable-character map used by byte-level BPE.
_BYTE_DECODER = {char: byte for byte, char in bytes_to_unicode().items()}


def _is_byte_level(tokenizer: Any) -> bool:
    """True when ``tokenizer.decode`` is "ByteLevel-decode the token strings, then UTF-8 lossy"."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    try:
        from tokenizers import decoders
    except ImportError:  # pragma: no cover - tokenizers is a hard dependency
        return False
    return isinstance(backend.decoder, decoders.ByteLevel)


def byte_level_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes the tokenizers ByteLevel decoder produces for one token of a byte-level tokenizer."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token is None:  # unknown id: tokenizers' decode skips it
        return b""
    try:
        return bytes(_BYTE_DECODER[char] for char in token)
    except KeyError:  # a token with characters outside the byte map is kept as UTF-8 text
        return token.encode("utf-8")


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """One token's own bytes (OpenAI's logprob `bytes`): exact for byte-level BPE, where a token
    may hold part of a UTF-8 character; the token decoded alone for other tokenizers."""
    if _is_byte_level(tokenizer):
        return byte_level_bytes(tokenizer, token_id)
    return tokenizer.decode([token_id]).encode("utf-8")


class IncrementalDetokenizer:
    """Turn a stream of token ids into text chunks that never split a UTF-8 character.

    >>> detok = IncrementalDetokenizer(tokenizer)          # doctest: +SKIP
    >>> chunks = [detok.push(i) for i in ids] + [detok.flush()]  # doctest: +SKIP
    >>> "".join(chunks) == tokenizer.decode(ids)            # doctest: +SKIP
    True

    Not thread-safe; use one instance per generated sequence.  Pure: no I/O.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        skip_special_tokens: bool = False,
        strategy: Strategy = "auto",
    ) -> None:
        """Args:
        tokenizer: a Hugging Face tokenizer (``decode`` and ``convert_ids_to_tokens``).
        skip_special_tokens: drop special tokens, as ``decode(..., skip_special_tokens=True)``.
        strategy: ``"bytes"``, ``"window"`` or ``"auto"`` (bytes when the tokenizer's decoder is
            byte-level, else window).  See the module docstring.
        """
        if strategy == "auto":
            strategy = "bytes" if _is_byte_level(tokenizer) else "window"
        if strategy not in ("bytes", "window"):
            raise ValueError(f"unknown strategy {strategy!r}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.strategy: Literal["bytes", "window"] = strategy
        self._special_ids: frozenset[int] = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        # "bytes" state
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._token_bytes: dict[int, bytes] = {}
        # "window" state: ids[prefix_offset:]; text up to read_offset has been emitted.
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly ``""``)."""
        token_id = int(token_id)
        if self.skip_special_tokens and token_id in self._special_ids:
            return ""
        if self.strategy == "bytes":
            return self._utf8.decode(self._bytes_of(token_id))
        return self._push_window(token_id)

    def flush(self) -> str:
        """Return whatever is still pending (an incomplete character comes out as U+FFFD) and reset."""
        if self.strategy == "bytes":
            return self._utf8.decode(b"", final=True)
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._ids.clear()
        self._prefix_offset = self._read_offset = 0
        return new_text[len(prefix_text) :]

    # -- bytes strategy -------------------------------------------------------------------------

    def _bytes_of(self, token_id: int) -> bytes:
        """The bytes the tokenizers ByteLevel decoder produces for one token (cached per id)."""
        cached = self._token_bytes.get(token_id)
        if cached is None:
            cached = self._token_bytes[token_id] = byte_level_bytes(self.tokenizer, token_id)
        return cached

    # -- window strategy ------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _push_window(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            # Drop ids nobody needs any more so that the window stays small.
            del self._ids[: self._read_offset]
            self._prefix_offset = 0
            self._read_offset = len(self._ids)
            return delta
        return ""
