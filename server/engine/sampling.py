"""Per-request sampling for transformers' continuous batching.

transformers 5.24's continuous-batching manager has one `do_sample` and one seed for all
requests, and no per-request logits processors. This processor plugs into its logits-processor
list and handles each row of the batch with that row's own request settings:

* OpenAI presence/frequency penalties (additive, over the tokens generated so far);
* a grammar (`SamplingParams.grammar`): an llguidance matcher per sequence
  (`server.engine.guidance`) is fed the sequence's new tokens in `prepare_tensor_args` and masks
  its row before anything else, so top-p never sees a disallowed token (an all -inf row would be
  NaN);
* OpenAI `logit_bias` (additive, per token id);
* temperature/top-p sampling with a per-request `torch.Generator` (so `seed` is reproducible
  whatever else is in the batch). The sampled token is returned as a one-hot row and the
  manager, which runs greedy, picks it with its argmax. Temperature 0 stays greedy;
* logprobs (when asked): `log_softmax` of the row after penalties, bias and masks and before
  temperature/top-p, i.e. the model's distribution as this request shaped it, at temperature 1
  (what OpenAI reports). The chosen token's logprob and the top-k alternatives are recorded per
  step and handed to the request's `Generation` by `take_logprobs`. Masked tokens (grammar)
  have logprob -inf, reported as -9999.0 like OpenAI does for impossible tokens.

The manager calls `prepare_tensor_args` with the batch's requests (those getting a new token) in
the same order as the score rows, right before `__call__`, on its own thread.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from server.engine.base import SamplingParams, TokenLogprob
from server.engine.guidance import SequenceGrammar

#: OpenAI's stand-in for the logprob of a token that cannot be chosen (JSON has no -inf).
MIN_LOGPROB = -9999.0


class _RequestSampler:
    def __init__(self, params: SamplingParams, grammar: SequenceGrammar | None = None) -> None:
        self.params = params
        self.grammar = grammar
        self.mask: torch.Tensor | None = None  # allowed tokens for the coming step, under `grammar`
        self.generator: torch.Generator | None = None
        self.logprobs: list[TokenLogprob] = []  # recorded by `process`, taken by the request
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias)
            self._bias = torch.tensor(ids, dtype=torch.long), torch.tensor(values)
        if not params.greedy:
            self.generator = torch.Generator()
            if params.seed is not None:
                self.generator.manual_seed(params.seed % (2**63))
            else:
                self.generator.seed()

    def process(self, row: torch.Tensor, generated: list[int]) -> torch.Tensor:
        p = self.params
        if self.mask is not None:
            row = torch.where(self.mask.to(row.device), row, float("-inf"))  # 2x faster than masked_fill(~mask)
        if (p.presence_penalty or p.frequency_penalty) and generated:
            ids = torch.tensor(generated, dtype=torch.long, device=row.device)
            counts = torch.bincount(ids, minlength=row.numel())[: row.numel()].to(row.dtype)
            row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
        if self._bias is not None:
            ids, values = self._bias
            keep = ids < row.numel()  # ids past the model's rows (tokenizer padding) cannot be chosen anyway
            row = row.index_add(0, ids[keep].to(row.device), values[keep].to(row.device, row.dtype))
        if p.greedy:
            if p.logprobs is not None:
                self._record(row, int(row.argmax().item()))  # the manager's argmax picks the same token
            return row
        probs = torch.softmax(row.float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            drop = (sorted_probs.cumsum(-1) - sorted_probs) > p.top_p
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        # Inverse-CDF with one uniform draw: torch.multinomial draws per vocabulary entry (8 ms a
        # row on CPU over Qwen's 151936 tokens, measured), this is ~0.7 ms and equally exact.
        cdf = probs.cpu().cumsum(-1)
        draw = torch.rand(1, generator=self.generator) * cdf[-1]
        token = int(torch.searchsorted(cdf, draw).clamp(max=cdf.numel() - 1).item())
        if p.logprobs is not None:
            self._record(row, token)
        onehot = torch.full_like(row, float("-inf"))
        onehot[token] = 0
        return onehot


    def _record(self, row: torch.Tensor, token: int) -> None:
        """Note the logprob of `token` and the top alternatives under `row` (temperature 1)."""
        logprobs = torch.log_softmax(row.float(), dim=-1).clamp(min=MIN_LOGPROB)
        top: tuple[tuple[int, float], ...] = ()
        if self.params.logprobs:
            values, ids = logprobs.topk(min(self.params.logprobs, logprobs.numel()))
            top = tuple(zip(ids.tolist(), values.tolist()))
        self.logprobs.append(TokenLogprob(token, float(logprobs[token].item()), top))


class PerRequestSampler(ContinuousBatchingLogitsProcessor):
    """The processor installed into the manager; requests register by id."""

    supported_kwargs: dict[str, type] = {}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samplers: dict[str, _RequestSampler] = {}
        self._rows: list[Any] = []

    def register(self, request_id: str, params: SamplingParams, grammar: SequenceGrammar | None = None) -> None:
        plain = not (params.presence_penalty or params.frequency_penalty
                     or params.logit_bias or params.logprobs is not None or grammar)
        if params.greedy and plain:
            return  # plain greedy: the manager's own argmax
        with self._lock:
            self._samplers[request_id] = _RequestSampler(params, grammar)

    def take_logprobs(self, request_id: str, count: int) -> list[TokenLogprob]:
        """The logprobs of the request's next `count` generated tokens, in order.

        `process` runs on the manager's thread before the tokens it picks are reported, so by the
        time a request sees `count` new tokens their entries are recorded.
        """
        with self._lock:
            sampler = self._samplers.get(request_id)
            if sampler is None:
                return []
            taken, sampler.logprobs[:count] = sampler.logprobs[:count], []
            return taken

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._samplers.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._samplers)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        self._rows = [r.state for r in requests_with_new_token]
        with self._lock:
            constrained = [(s, self._samplers.get(s.request_id)) for s in self._rows]
        for state, sampler in constrained:
            if sampler is not None and sampler.grammar is not None:
                sampler.mask = sampler.grammar.allowed(list(state.generated_tokens))
        return torch.zeros(len(requests_with_new_token), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        with self._lock:
            samplers = [self._samplers.get(state.request_id) for state in self._rows[: scores.size(0)]]
        if not any(samplers):
            return scores
        out = scores.clone()
        for i, sampler in enumerate(samplers):
            if sampler is not None:
                out[i] = sampler.process(scores[i], list(self._rows[i].generated_tokens))
        return out


def install(manager: Any, sampler: PerRequestSampler) -> None:
    """Attach `sampler` to a manager before `start()` (its I/O tensors are sized at start).

    This touches private fields of transformers' `ContinuousBatchingLogitsProcessorList`; the
    project pins transformers 5.24.x and tests/test_engine.py guards the behaviour.
    """
    processors = manager.logit_processor
    processors.logits_processor.append(sampler)
    processors.tensors_required += 1
    processors._retrieve_processors_kwargs()
    processors.do_processing = True
