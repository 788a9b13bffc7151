"""Load the model and generate for many requests at once.

Generation runs in transformers' continuous-batching manager (paged KV cache, sequences join and
leave at step boundaries, its own background thread), so the event loop never blocks on the
model. This module adds what a server needs around it:

* per-request sampling, seeds, penalties and forced tool names (`server.sampling`);
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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, ContinuousBatchingConfig, GenerationConfig

from server.sampling import PerRequestSampler, SamplingParams, install

__all__ = ["Engine", "EngineError", "EngineOverloaded", "Generation", "SamplingParams", "StepOutput", "load_model"]

log = logging.getLogger("agent_server.engine")

DEFAULT_MAX_MODEL_LEN = 4096


class EngineOverloaded(Exception):
    """No room for another request right now."""


class EngineError(Exception):
    """Generation failed inside the engine (not the request's fault)."""


@dataclass(frozen=True)
class StepOutput:
    """New tokens of one sequence (stop token removed); `finish_reason` on the last one."""

    token_ids: list[int]
    finish_reason: Literal["stop", "length"] | None = None


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


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """ChatML's `<|im_end|>` and `<|endoftext|>`, plus whatever the model declares as EOS."""
    ids: set[int] = set()
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    declared = getattr(model.generation_config, "eos_token_id", None)
    ids.update([declared] if isinstance(declared, int) else declared or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


class Engine:
    """Continuous batching over one model; `submit` is the only way in."""

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
        self.model = model
        self.tokenizer = tokenizer
        context = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
        self.max_model_len = min(max_model_len or min(context, DEFAULT_MAX_MODEL_LEN), context)
        self.max_running = max_running
        self.max_queued = max_queued
        self.kv_cache_tokens = max(kv_cache_tokens or 4 * self.max_model_len, self.max_model_len)
        self.page_size = page_size
        self.max_batch_tokens = max_batch_tokens
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.sampler = PerRequestSampler()
        self._manager: Any = None
        self._slots: asyncio.Semaphore | None = None
        self.admitted = 0  # running + waiting
        self.running = 0

    @property
    def queued(self) -> int:
        return self.admitted - self.running

    def start(self) -> None:
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

    def stop(self) -> None:
        """Stop the thread (it is not a daemon: without this the process cannot exit)."""
        if self._manager is not None:
            self._manager.stop(block=True, hard_stop=True)
            self.model.destroy_cached_continuous_batching_manager()
            self._manager = None

    def _fatal_error(self) -> Any:
        status = getattr(self._manager, "background_thread_status", None)
        return getattr(status, "fatal_error", None)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """Admit a request now (or raise EngineOverloaded); tokens come from the returned handle."""
        if len(prompt_ids) + params.max_new_tokens > self.max_model_len:
            raise ValueError("prompt + max_new_tokens exceeds max_model_len")  # callers check first
        if self.admitted >= self.max_running + self.max_queued:
            raise EngineOverloaded(f"{self.running} requests running and {self.queued} queued")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_running)
        self.admitted += 1
        return Generation(self, prompt_ids, params)


class Generation:
    """One sequence in the engine: an async iterator of `StepOutput`; `aclose()` cancels it.

    It holds its admission until it finishes or is closed; a handle dropped unused releases it
    when garbage-collected.
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams) -> None:
        self._engine = engine
        self._prompt_ids = list(prompt_ids)
        self._params = params
        self._id = uuid.uuid4().hex
        self._queue: asyncio.Queue[Any] | None = None
        self._seen = 0
        self._running = False
        self._done = False

    def __aiter__(self) -> AsyncIterator[StepOutput]:
        return self

    async def _begin(self) -> None:
        engine = self._engine
        assert engine._slots is not None
        await engine._slots.acquire()
        self._running = True
        engine.running += 1
        engine.start()  # no-op unless the manager died
        self._queue = asyncio.Queue()
        engine.sampler.register(self._id, self._params)
        engine._manager.register_result_handler(self._id, self._queue.put_nowait)
        accepted = engine._manager.add_request(
            self._prompt_ids,
            request_id=self._id,
            max_new_tokens=self._params.max_new_tokens,
            streaming=True,
            eos_token_id=engine.stop_ids,
        )
        if accepted is None:
            raise EngineError("the generation engine is not accepting requests")

    async def __anext__(self) -> StepOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._queue is None:
                await self._begin()
            assert self._queue is not None
            output = await self._queue.get()
        except BaseException:
            await self.aclose()
            raise
        if output.error is not None:
            await self.aclose()
            raise EngineError(str(output.error))
        tokens = list(output.generated_tokens[self._seen :])
        self._seen = len(output.generated_tokens)
        if not output.is_finished():
            return StepOutput(tokens)
        reason: Literal["stop", "length"] = "length"
        if tokens and tokens[-1] in self._engine.stop_ids:
            tokens, reason = tokens[:-1], "stop"
        elif self._seen < self._params.max_new_tokens:
            reason = "stop"
        self._release(finished=True)
        return StepOutput(tokens, reason)

    async def aclose(self) -> None:
        """Cancel the sequence if it is still in the engine, and give back its admission."""
        self._release(finished=False)

    def _release(self, *, finished: bool) -> None:
        if self._done:
            return
        self._done = True
        engine = self._engine
        if self._queue is not None:
            if not finished and engine._manager is not None:
                engine._manager.cancel_request(self._id)
                engine._manager.output_router.result_handlers.pop(self._id, None)
            engine.sampler.forget(self._id)
        if self._running:
            engine.running -= 1
            assert engine._slots is not None
            engine._slots.release()
        engine.admitted -= 1

    def __del__(self) -> None:
        if not self._done:
            self._release(finished=False)
