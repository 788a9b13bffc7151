"""Load the model and generate for many requests at once.

Generation runs in transformers' continuous-batching manager (paged KV cache, sequences join and
leave at step boundaries, its own background thread), so the event loop never blocks on the
model. This module adds what a server needs around it:

* per-request sampling, seeds, penalties, logit bias and logprobs
  (`server.engine.sampling`);
* grammars (`SamplingParams.grammar`): an llguidance matcher per sequence
  (`server.engine.guidance`), its tokenizer built on the first request that has one;
* admission control: at most `max_running` sequences in the batch and `max_queued` waiting;
  beyond that `EngineOverloaded` (the HTTP layer answers 429 with Retry-After);
* cancellation: closing a `Generation` (client gone, stop string, parser done) cancels the
  sequence in the manager, which drops it at the next step and frees its cache blocks;
* recovery: if the manager's thread dies, in-flight requests fail and the next request starts a
  fresh manager.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, ContinuousBatchingConfig, GenerationConfig

from server.engine.base import Engine, EngineError, Generation, SamplingParams, StepOutput
from server.engine.guidance import GrammarCompiler
from server.engine.sampling import PerRequestSampler, install

__all__ = ["BuiltinEngine", "load_model"]

log = logging.getLogger("agent_server.engine")

DEFAULT_MAX_MODEL_LEN = 4096


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto`: bf16 on CUDA when supported (fp16 otherwise), fp32 on CPU."""
    if dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(
    model_path: str, adapter_path: str | None = None, *, dtype: str = "auto", device: str = "auto"
) -> tuple[Any, Any]:
    """Model and tokenizer from a directory (or a hub id); a LoRA adapter is merged at load.

    Merging once makes serving as fast as a merged checkpoint and keeps the batching engine
    unaware of adapters; `agent-server merge` writes the same merge to disk.
    """
    device = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=resolve_dtype(dtype, device), attn_implementation="sdpa"
    )
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    return model.to(device).eval(), tokenizer


def stop_token_ids(tokenizer: Any, declared: int | list[int] | None) -> list[int]:
    """ChatML's `<|im_end|>` and `<|endoftext|>`, plus whatever the model declares as EOS.

    `declared` is the generation config's `eos_token_id`; both engines stop on the same ids.
    """
    ids: set[int] = set()
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    ids.update([declared] if isinstance(declared, int) else declared or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def end_of_turn_id(model: Any, tokenizer: Any) -> int:
    """The token that ends an assistant turn (`<|im_end|>` in ChatML): where a grammar ends."""
    token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
        return token_id
    return tokenizer.eos_token_id


class BuiltinEngine(Engine):
    """transformers' continuous batching over one model, in this process."""

    name = "builtin"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_model_len: int | None = None,
        max_running: int = 16,
        max_queued: int = 64,
        kv_cache_tokens: int | None = None,
        page_size: int = 32,
        max_batch_tokens: int = 512,
    ) -> None:
        super().__init__(max_running=max_running, max_queued=max_queued)
        self.model = model
        self.tokenizer = tokenizer
        context = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
        self.max_model_len = min(max_model_len or min(context, DEFAULT_MAX_MODEL_LEN), context)
        self.kv_cache_tokens = max(kv_cache_tokens or 4 * self.max_model_len, self.max_model_len)
        self.page_size = page_size
        self.max_batch_tokens = max_batch_tokens
        self.stop_ids = stop_token_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None))
        self.sampler = PerRequestSampler()
        self.grammars = GrammarCompiler(
            tokenizer, vocab_size=model.get_output_embeddings().weight.shape[0], eos_id=end_of_turn_id(model, tokenizer)
        )
        self._manager: Any = None
        self._slots: asyncio.Semaphore | None = None

    async def start(self) -> None:
        self.start_manager()

    async def stop(self) -> None:
        self.stop_manager()

    def start_manager(self) -> None:
        """Start the manager's thread (idempotent; also used to recover after a crash)."""
        if self._manager is not None and self._manager.is_running():
            return
        if self._manager is not None:
            log.error("generation thread died (%s); starting a new one", self._fatal_error())
            self._manager.destroy()
            self.model.destroy_cached_continuous_batching_manager()
            self.sampler = PerRequestSampler()
        generation_config = GenerationConfig(
            do_sample=False, max_new_tokens=self.max_model_len, eos_token_id=self.stop_ids
        )
        cb_config = ContinuousBatchingConfig(
            num_blocks=math.ceil(self.kv_cache_tokens / self.page_size),
            page_size=self.page_size,
            max_batch_tokens=self.max_batch_tokens,
            max_requests_per_batch=self.max_running,
            use_cuda_graph=False,  # per-request sampling runs Python per step (sync mode)
            use_async_batching=False,
        )
        self._manager = self.model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb_config
        )
        install(self._manager, self.sampler)
        self._manager.start()

    def stop_manager(self) -> None:
        """Stop the thread (it is not a daemon: without this the process cannot exit)."""
        if self._manager is not None:
            self._manager.stop(block=True, hard_stop=True)
            self.model.destroy_cached_continuous_batching_manager()
            self._manager = None

    def _fatal_error(self) -> Any:
        status = getattr(self._manager, "background_thread_status", None)
        return getattr(status, "fatal_error", None)

    def _generation(self, prompt_ids: list[int], params: SamplingParams) -> BuiltinGeneration:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_running)  # bound to the serving event loop
        return BuiltinGeneration(self, prompt_ids, params)


class BuiltinGeneration(Generation):
    """One sequence in the manager; its results arrive on an asyncio queue from the manager's thread."""

    _engine: BuiltinEngine

    def __init__(self, engine: BuiltinEngine, prompt_ids: list[int], params: SamplingParams) -> None:
        super().__init__(engine, prompt_ids, params)
        self._id = uuid.uuid4().hex
        self._queue: asyncio.Queue[Any] | None = None
        self._seen = 0

    async def _begin(self) -> None:
        engine = self._engine
        assert engine._slots is not None
        await engine._slots.acquire()
        self._mark_running()
        grammar = None
        if self.params.grammar is not None:  # first time: ~2 s of tokenizer set-up, off the event loop
            try:
                grammar = await asyncio.to_thread(engine.grammars.compile, self.params.grammar)
            except ValueError as exc:
                raise EngineError(str(exc)) from None
        engine.start_manager()  # no-op unless the manager died
        self._queue = asyncio.Queue()
        engine.sampler.register(self._id, self.params, grammar)
        engine._manager.register_result_handler(self._id, self._queue.put_nowait)
        accepted = engine._manager.add_request(
            self.prompt_ids,
            request_id=self._id,
            max_new_tokens=self.params.max_new_tokens,
            streaming=True,
            eos_token_id=engine.stop_ids,
        )
        if accepted is None:
            raise EngineError("the generation engine is not accepting requests")

    async def _next(self) -> StepOutput:
        if self._queue is None:
            await self._begin()
        assert self._queue is not None
        output = await self._queue.get()
        if output.error is not None:
            raise EngineError(str(output.error))
        tokens = list(output.generated_tokens[self._seen :])
        self._seen = len(output.generated_tokens)
        logprobs = None
        if self.params.logprobs is not None:
            logprobs = self._engine.sampler.take_logprobs(self._id, len(tokens))
            if [entry.token_id for entry in logprobs] != tokens:
                raise EngineError("logprobs out of step with the generated tokens")  # a bug, never input
        if not output.is_finished():
            return StepOutput(tokens, logprobs=logprobs)
        reason: Literal["stop", "length"] = "length"
        if tokens and tokens[-1] in self._engine.stop_ids:
            tokens, reason = tokens[:-1], "stop"
            logprobs = logprobs[:-1] if logprobs is not None else None
        elif self._seen < self.params.max_new_tokens:
            reason = "stop"
        return StepOutput(tokens, reason, logprobs)

    def _cancel(self, *, finished: bool) -> None:
        engine = self._engine
        if self._queue is not None:
            if not finished and engine._manager is not None:
                engine._manager.cancel_request(self._id)
                engine._manager.output_router.result_handlers.pop(self._id, None)
            engine.sampler.forget(self._id)

    def _on_slot_released(self) -> None:
        assert self._engine._slots is not None
        self._engine._slots.release()
