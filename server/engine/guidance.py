"""llguidance in the built-in engine: one tokenizer per process, one matcher per sequence.

The llguidance tokenizer costs ~2 s and ~240 MB to build (measured, see
../shared/notes/constrained-decoding.md), so it is built on the first request with a grammar,
never at start-up. Matchers are cheap (~1-4 ms). The token set is the lm_head's (151936 for
Qwen1.5, larger than the tokenizer's 151646 ids: the padding ids are never allowed), and the
end of a constrained answer is `<|im_end|>`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import torch

__all__ = ["GrammarCompiler", "SequenceGrammar"]

log = logging.getLogger("agent_server.engine")


class SequenceGrammar:
    """A matcher following one sequence: feed it the generated tokens, get the allowed next ones.

    Masking goes on until the EOS token itself is generated: llguidance reports "stopped" as soon
    as only EOS is possible, and a sequence left unmasked then would write free text after the
    JSON.
    """

    def __init__(self, matcher: Any, vocab_size: int, eos_id: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._eos_id = eos_id
        self._fed = 0

    def allowed(self, generated: list[int]) -> torch.Tensor:
        """Bool mask over the vocabulary for the token after `generated` (all tokens so far)."""
        new = generated[self._fed :]
        self._fed = len(generated)
        if new and not self._matcher.consume_tokens(new):
            # Cannot happen while every token was sampled under this mask; end the answer cleanly.
            log.error("grammar rejected a generated token: %s", self._matcher.get_error())
        if self._matcher.is_error():
            mask = torch.zeros(self._vocab_size, dtype=torch.bool)
            mask[self._eos_id] = True
            return mask
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little", count=self._vocab_size).view(np.bool_))


class GrammarCompiler:
    """Makes `SequenceGrammar`s for one model; thread-safe, the tokenizer built on first use."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_id: int) -> None:
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_id
                )
            return self._tokenizer

    def compile(self, grammar: str) -> SequenceGrammar:
        """A fresh matcher for `grammar` (an llguidance Lark string, checked by the API layer)."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid grammar: {matcher.get_error()}")
        return SequenceGrammar(matcher, self.vocab_size, self.eos_id)
