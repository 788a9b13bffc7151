"""vLLM as the engine, reached over its HTTP API (it is never imported: see issue 9's design).

The server keeps everything that makes the answer correct: it renders the chat to token ids,
sends them to vLLM's `/v1/completions` as a token-id prompt and reads the generated token ids
back (`return_token_ids`), then detokenizes, applies stop strings and parses exactly as with the
built-in engine. vLLM only generates. This module adds what serving through it needs:

* the same admission as the built-in engine: at most `max_running` streams open to vLLM (a
  semaphore; the rest wait in order) and `max_queued` waiting, 429 beyond;
* cancellation: closing a `Generation` closes its HTTP stream, which aborts the request in vLLM;
* availability: a background task polls vLLM's `/health`; while it fails, `available` is False
  (`/health` 503, requests 503) and it turns True by itself when vLLM is back (after the checks
  below pass again: a restarted vLLM may serve another model);
* start-up checks: vLLM must be reachable within a timeout, tokenize a probe string to the same
  ids as our tokenizer, and serve a context at least as long as `--max-model-len`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Literal

import aiohttp

from server.engine.base import (
    Engine,
    EngineError,
    EngineUnavailable,
    Generation,
    SamplingParams,
    StepOutput,
    TokenLogprob,
)
from server.engine.builtin import stop_token_ids
from server.engine.vllm_process import VLLMProcess

__all__ = ["EngineMismatch", "VLLMEngine", "engine_root", "model_stop_ids"]

log = logging.getLogger("agent_server.engine")

# Chinese text, the turn markers and a tool-call line: where tokenizers of different builds or
# vocabularies disagree first.
TOKENIZER_PROBE = '你好，世界！鸡蛋壳属于哪种垃圾? <|im_start|>assistant\nAction: get_weather\nAction Input: {"city": "巴黎"}<|im_end|>\n<|endoftext|>'


class EngineMismatch(RuntimeError):
    """vLLM serves something this server cannot drive correctly (the server refuses to start)."""


def engine_root(url: str) -> str:
    """`http://host:8000/v1/` -> `http://host:8000`: users may give the root or the OpenAI base URL."""
    root = url.strip().rstrip("/")
    return root.removesuffix("/v1").rstrip("/")


def model_stop_ids(model_path: str, tokenizer: Any) -> list[int]:
    """The stop ids the built-in engine uses for this model directory (without loading the weights)."""
    from transformers import GenerationConfig

    try:
        declared = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        declared = None
    return stop_token_ids(tokenizer, declared)


# What "vLLM cannot be reached" looks like to aiohttp: refused or dropped connections, timeouts,
# and a stream cut mid-body.
UNREACHABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


class VLLMEngine(Engine):
    """Generation by a vLLM server over HTTP (one pooled `aiohttp.ClientSession`).

    aiohttp rather than httpx: its HTTP parser is C, and on a small box every CPU-second this
    server spends per streamed token is taken from vLLM (issue 9's benchmark measured httpx's
    pure-Python stream reading as the largest share of it).
    """

    name = "vllm"

    def __init__(
        self,
        url: str,
        tokenizer: Any,
        *,
        stop_ids: list[int],
        max_model_len: int | None = None,
        max_running: int = 16,
        max_queued: int = 64,
        startup_timeout: float = 300,
        connect_timeout: float = 5,
        health_interval: float = 1,
        process: VLLMProcess | None = None,
        grammar: bool = False,
    ) -> None:
        super().__init__(max_running=max_running, max_queued=max_queued)
        self.root = engine_root(url)
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.requested_max_model_len = max_model_len
        self.max_model_len = max_model_len or 0  # set from vLLM in start()
        self.startup_timeout = startup_timeout
        self.health_interval = health_interval
        self.process = process
        # vLLM enforces our llguidance grammars only with the guidance backend and pinned whitespace:
        # a child we start has them; an external vLLM is trusted when the operator says so.
        self._grammar = grammar or process is not None
        self.model_id = ""
        self.connect_timeout = connect_timeout
        self.completions_url = self.root + "/v1/completions"
        self._session: aiohttp.ClientSession | None = None
        self._healthy = False
        self._watcher: asyncio.Task[None] | None = None
        self._slots: asyncio.Semaphore | None = None

    @property
    def available(self) -> bool:
        return self._healthy

    @property
    def supports_grammar(self) -> bool:
        return self._grammar

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise EngineUnavailable("the vLLM engine has not been started")
        return self._session

    def _timeout(self, total: float | None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=total, sock_connect=self.connect_timeout)

    async def start(self) -> None:
        """Wait for vLLM (starting it first when we own it), check it, then watch its health."""
        # No pool limit: admission (`_slots`) bounds the streams; a generation's stream has no timeout.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=self._timeout(None))
        self._slots = asyncio.Semaphore(self.max_running)
        try:
            if self.process is not None:
                self.process.start()
            await self._wait_until_healthy()
            await self._check()
        except BaseException:
            await self.stop()
            raise
        self._healthy = True
        self._watcher = asyncio.create_task(self._watch(), name="vllm-health")
        log.info("serving through vLLM at %s (model %s, max_model_len=%d)", self.root, self.model_id, self.max_model_len)

    async def stop(self) -> None:
        self._healthy = False
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)

    async def _wait_until_healthy(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        last = "no answer yet"
        while True:
            if self.process is not None:
                self.process.check_alive()
            try:
                status = await self._health(self.connect_timeout)
                if status == 200:
                    return
                last = f"/health answered {status}"
            except UNREACHABLE as exc:
                last = f"{type(exc).__name__}: {exc}"
            if loop.time() >= deadline:
                raise EngineMismatch(
                    f"vLLM at {self.root} did not become healthy within {self.startup_timeout:g} s ({last}); "
                    "check --engine-url and that vLLM is running (--engine-startup-timeout to wait longer)"
                )
            await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))

    async def _check(self) -> None:
        """Model id and context length from `/v1/models`; tokenizer agreement from `/tokenize`."""
        models = (await self._get_json("GET", "/v1/models"))["data"]
        if not models:
            raise EngineMismatch(f"vLLM at {self.root} serves no model")
        self.model_id = models[0]["id"]
        engine_len = int(models[0]["max_model_len"])
        wanted = self.requested_max_model_len
        if wanted is not None and wanted > engine_len:
            raise EngineMismatch(
                f"--max-model-len {wanted} exceeds the context vLLM serves ({engine_len}); "
                f"lower it or start vLLM with --max-model-len {wanted}"
            )
        self.max_model_len = wanted or engine_len
        theirs = (await self._get_json("POST", "/tokenize", json={"prompt": TOKENIZER_PROBE, "add_special_tokens": False}))["tokens"]
        ours = self.tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
        if theirs != ours:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise EngineMismatch(
                f"the tokenizer of vLLM's model {self.model_id!r} differs from this server's: the probe "
                f"{TOKENIZER_PROBE!r} encodes to {len(ours)} ids here and {len(theirs)} in vLLM, first "
                f"difference at position {at} (ours {ours[at:at + 4]}, vLLM's {theirs[at:at + 4]}); "
                "serve the same model directory on both sides"
            )

    async def _health(self, timeout: float) -> int:
        async with self.session.get(self.root + "/health", timeout=self._timeout(timeout)) as response:
            return response.status

    async def _get_json(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            async with self.session.request(method, self.root + path, timeout=self._timeout(30), **kwargs) as response:
                body = await response.read()
        except UNREACHABLE as exc:
            raise EngineUnavailable(f"vLLM at {self.root} is unreachable ({type(exc).__name__})") from exc
        if response.status != 200:
            raise EngineMismatch(f"vLLM {method} {path} answered {response.status}: {body[:500].decode(errors='replace')}")
        return json.loads(body)

    async def _watch(self) -> None:
        """Poll `/health`: flip `available` off while it fails, on again once vLLM is back and checked."""
        while True:
            await asyncio.sleep(self.health_interval)
            healthy = await self._probe()
            if healthy and not self._healthy:
                try:
                    await self._check()
                except EngineUnavailable:
                    healthy = False
                except Exception as exc:  # noqa: BLE001 - the watcher must outlive any answer vLLM gives
                    log.error("vLLM is back but cannot be served: %s", exc)
                    healthy = False
                else:
                    log.warning("vLLM at %s is available again", self.root)
            elif self._healthy and not healthy:
                log.error("vLLM at %s is unavailable; answering 503 until it is back", self.root)
            self._healthy = healthy

    async def _probe(self) -> bool:
        try:
            return await self._health(10) == 200
        except UNREACHABLE:
            return False

    def mark_unavailable(self, exc: Exception) -> EngineUnavailable:
        """A request could not reach vLLM: stop admitting until the health check sees it back."""
        if self._healthy:
            log.error("lost the connection to vLLM at %s (%s)", self.root, exc)
        self._healthy = False
        return EngineUnavailable(f"vLLM at {self.root} is unreachable ({type(exc).__name__})")

    def request_body(self, prompt_ids: list[int], params: SamplingParams) -> dict[str, Any]:
        """The `/v1/completions` body for one request: every `SamplingParams` field mapped."""
        body: dict[str, Any] = {
            "model": self.model_id,
            "prompt": prompt_ids,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "stop_token_ids": self.stop_ids,
            "skip_special_tokens": True,
            "stream": True,
            "return_token_ids": True,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
        if params.logprobs is not None:
            body["logprobs"] = params.logprobs
            body["return_tokens_as_token_ids"] = True
        if params.grammar is not None:
            body["structured_outputs"] = {"grammar": params.grammar}
        return body

    def _generation(self, prompt_ids: list[int], params: SamplingParams) -> VLLMGeneration:
        return VLLMGeneration(self, prompt_ids, params)


def _token_id(key: str) -> int:
    """`token_id:123` (vLLM's `return_tokens_as_token_ids` spelling) -> 123."""
    return int(key.rpartition(":")[2])


def _logprobs(data: dict[str, Any], count: int, limit: int) -> list[TokenLogprob]:
    """vLLM's completions `logprobs` object -> one `TokenLogprob` per generated token."""
    out = []
    for token, logprob, top in zip(data["tokens"][:count], data["token_logprobs"], data["top_logprobs"] or []):
        ranked = sorted(((_token_id(k), v) for k, v in (top or {}).items()), key=lambda kv: -kv[1])[:limit]
        out.append(TokenLogprob(_token_id(token), logprob, tuple(ranked)))
    return out


class VLLMGeneration(Generation):
    """One request: a streaming `/v1/completions` response.

    Each `_next()` returns every token that has arrived by then (all complete SSE events in what
    the socket delivered), not one event at a time: when the server falls behind under load,
    tokens that arrived together travel on together, and the per-token cost of the layers above
    shrinks instead of piling up.
    """

    _engine: VLLMEngine

    def __init__(self, engine: VLLMEngine, prompt_ids: list[int], params: SamplingParams) -> None:
        super().__init__(engine, prompt_ids, params)
        self._response: aiohttp.ClientResponse | None = None
        self._buffer = b""

    async def _begin(self) -> None:
        engine = self._engine
        assert engine._slots is not None
        await engine._slots.acquire()
        self._mark_running()
        try:
            self._response = await engine.session.post(
                engine.completions_url, json=engine.request_body(self.prompt_ids, self.params)
            )
        except UNREACHABLE as exc:
            raise engine.mark_unavailable(exc) from exc
        if self._response.status != 200:
            try:
                detail = (await self._response.read()).decode(errors="replace")
            except UNREACHABLE:
                detail = "(body lost)"
            raise EngineError(f"vLLM answered {self._response.status}: {_error_message(detail)}")

    async def _events(self) -> list[bytes]:
        """The `data:` payloads of every complete SSE event received so far (waiting for at least one)."""
        assert self._response is not None
        while True:
            *complete, self._buffer = self._buffer.split(b"\n\n")
            events = [line[5:].strip() for event in complete for line in event.split(b"\n") if line.startswith(b"data:")]
            if events:
                return events
            try:
                received = await self._response.content.readany()
            except UNREACHABLE as exc:
                raise self._engine.mark_unavailable(exc) from exc
            if not received:
                raise EngineError("vLLM ended the stream without a finish reason")
            self._buffer += received.replace(b"\r\n", b"\n")

    async def _next(self) -> StepOutput:
        if self._response is None:
            await self._begin()
        ids: list[int] = []
        logprobs: list[TokenLogprob] | None = [] if self.params.logprobs is not None else None
        while not ids:
            for data in await self._events():
                if data == b"[DONE]":
                    raise EngineError("vLLM ended the stream without a finish reason")
                chunk = json.loads(data)
                if "error" in chunk:
                    raise EngineError(f"vLLM: {_error_message(data.decode(errors='replace'))}")
                choice = chunk["choices"][0]
                new: list[int] = choice.get("token_ids") or []
                ids += new
                if logprobs is not None and choice.get("logprobs"):
                    logprobs += _logprobs(choice["logprobs"], len(new), self.params.logprobs or 0)
                if choice.get("finish_reason") is not None:
                    return await self._finish(ids, choice["finish_reason"], logprobs)
        return StepOutput(ids, None, logprobs)

    async def _finish(self, ids: list[int], finish: str, logprobs: list[TokenLogprob] | None) -> StepOutput:
        """The last chunk: drop the stop token, map the reason, read to the end so the connection is reused."""
        if finish not in ("stop", "length"):
            raise EngineError(f"vLLM finished the request with {finish!r}")
        reason: Literal["stop", "length"] = finish  # type: ignore[assignment]
        if reason == "stop" and ids and ids[-1] in self._engine.stop_ids:
            ids = ids[:-1]
            logprobs = logprobs[: len(ids)] if logprobs is not None else None
        response, self._response = self._response, None
        assert response is not None
        try:
            await response.read()  # to the end, so the connection goes back to the pool
        except UNREACHABLE:
            pass  # the answer is complete; the connection is simply not reused
        response.release()
        return StepOutput(ids, reason, logprobs)

    def _cancel(self, *, finished: bool) -> None:
        response, self._response = self._response, None
        if response is not None:
            try:
                response.close()  # drops the connection mid-stream: vLLM sees the disconnect and aborts
            except RuntimeError:
                pass  # garbage-collected after its loop closed: the socket goes with it

    def _on_slot_released(self) -> None:
        assert self._engine._slots is not None
        self._engine._slots.release()


def _error_message(body: str) -> str:
    """vLLM's error body (OpenAI shape) -> its message; anything else verbatim (truncated)."""
    try:
        error = json.loads(body)["error"]
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return body[:500]
