"""Serving benchmark: many users at once, over real HTTP, against a real server process.

    python -m benchmarks.serving [--model DIR] [--concurrency 1,4,8,16] [--requests-per-level N]
                                 [--max-tokens 64] [--threads 1] [--repeats N] [--json results.json]

Without ``--model`` it builds the tiny test model (the real Qwen1.5 tokenizer and a randomly
initialised tiny Qwen2, ``server.demo.build_random_model``) in a temporary directory.

What it measures, all on the same machine in the same run:

(c) ``raw generate``: ``model.generate`` at batch 1 in this process, no HTTP, greedy, on the same
    prompt ids the server renders, timed before and after the HTTP runs (the faster is kept). The
    stop token is switched off (``eos_token_id=None``) so every call makes exactly
    ``--max-tokens`` tokens with no stop check at all: the cheapest possible loop, the reference
    for the server's overhead at concurrency 1. For information it also times
    ``min_new_tokens=max_new_tokens`` (stop tokens on), which is much slower on a small model:
    transformers' ``MinNewTokensLengthLogitsProcessor`` and stop check run ``torch.isin`` over the
    151936-token vocabulary every step.
(a) ``batching``: ``python -m server serve`` with its defaults (continuous batching,
    ``--max-running`` at least 16 and at least the highest concurrency level).
(b) ``one-at-a-time``: the same server with ``--max-running 1``: requests queue in the engine and
    one sequence generates at a time, which is how LLaMA-Factory's API serves by default (one
    generation at a time). Same HTTP stack, same detokenizer and parser, so the ratio (a)/(b) is
    the gain from batching alone; at concurrency 1, (a), (b) and (c) show what the engine and the
    HTTP layer cost over plain ``generate``.

(d) ``over-vllm``: this server with ``--engine-url`` to a vLLM serving the same model (vLLM's CPU
    build on a CPU machine: ``--vllm-python``, default ``$AGENT_SERVER_VLLM_PYTHON`` or
    ``.venv-vllm/bin/python``; started here with ``--enforce-eager``).
(e) ``vllm``: that vLLM's own ``/v1/completions``, streamed, with the same prompt ids and the same
    request body the vLLM engine sends (``VLLMEngine.request_body``): the floor our layer adds to.
    The ratio (d)/(e) is what rendering, detokenizing, parsing and OpenAI chunks cost over vLLM.

Both servers are started at once on 127.0.0.1 with an OS-chosen port (the URL is read from the
log) and measured one after the other (an idle server uses no CPU). For each concurrency level C,
C workers send streaming chat completions (``stream_options.include_usage``) back to back until
``--requests-per-level`` requests (at least C) are done or ``--time-limit`` seconds have passed.
Per level it reports aggregate completion tokens/s (all tokens / wall time of the level), time to
first token (request sent -> first content chunk) p50/p95, and inter-token latency (gap between
successive content chunks of one stream) p50/p95, plus the server process's CPU use in cores.

Every request must generate exactly ``--max-tokens`` tokens: the prompts ask for long answers,
decoding is greedy (``--temperature 0``) and the tiny random model never emits a stop token on
them. The benchmark checks ``usage.completion_tokens == max_tokens`` and ``finish_reason ==
"length"`` on every response and exits 1 if any differs (it does not pretend a short answer is a
fast one). With a real ``--model`` that stops early on these prompts, the check fails loudly.

The load generator is a single asyncio process (httpx) on the same machine: on a small box it
takes CPU from the server, and its CPU use is printed too. Other work on the machine skews wall
times; the ``tok/CPU-s`` column (tokens per second of server CPU time) is steadier, and
``--repeats N`` runs every level N times, interleaved, and reports the median run.

Tuning on a small CPU box: ``--threads 1`` (the default here) is the right setting for the tiny
model; with 2 threads on 2 shared cores, OpenMP's spinning threads stall each other and the
server's own HTTP thread (throughput drops several-fold). ``--max-batch-tokens`` (the prefill
chunk) made no measurable difference for these short prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import os
import pathlib
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from server.launcher import REPO_ROOT, ServerProcess

_STARTED = time.perf_counter()


def progress(message: str) -> None:
    """A progress line, with the seconds since the benchmark started."""
    print(f"[{time.perf_counter() - _STARTED:6.1f}s] {message}", flush=True)

SYSTEM_AGENT = "You are a helpful assistant. Call the tools below when they help to answer the question."
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "city name"}},
            "required": ["city"],
        },
    },
}

#: Fixed prompts (request i uses PROMPTS[i % len(PROMPTS)]): long-answer requests, one agent-style
#: prompt with a system message and a tool. (messages, tools)
PROMPTS: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = [
    ([{"role": "user", "content": "Write a long, detailed story about a dragon who learns to cook."}], None),
    ([{"role": "user", "content": "请详细介绍一下长城的历史,越详细越好。"}], None),
    (
        [
            {"role": "system", "content": SYSTEM_AGENT},
            {"role": "user", "content": "Explain at length how weather forecasts are made, step by step."},
        ],
        [WEATHER_TOOL],
    ),
    ([{"role": "user", "content": "List one hundred interesting facts about the ocean, with explanations."}], None),
]


# ---------------------------------------------------------------------------------------------
# Statistics


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    completion_tokens: int | None = None
    finish_reason: str | None = None


@dataclass
class LevelResult:
    mode: str
    concurrency: int
    requests: int
    completed: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    itl_p95_ms: float
    server_cpu_cores: float | None
    tokens_per_server_cpu_s: float | None
    client_cpu_cores: float
    capped: bool
    errors: list[str] = field(default_factory=list)
    all_tokens_per_s: list[float] = field(default_factory=list)  # every repeat; the row is the median one


# ---------------------------------------------------------------------------------------------
# Load generator


def request_body(model_name: str, index: int, max_tokens: int, temperature: float) -> dict[str, Any]:
    messages, tools = PROMPTS[index % len(PROMPTS)]
    body: dict[str, Any] = {
        "model": model_name,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if tools:
        body["tools"] = tools
    if temperature > 0:
        body["seed"] = index
    return body


#: Request i of a level: (path, body). Chat servers get chat requests; vLLM its own completions.
RequestFactory = Callable[[int], tuple[str, dict[str, Any]]]


class Target(Protocol):
    """What a level runs against: a base URL, and the CPU seconds the serving side has used."""

    url: str

    def cpu_seconds(self) -> float | None: ...


def chat_requests(model_name: str, max_tokens: int, temperature: float) -> RequestFactory:
    return lambda index: ("/v1/chat/completions", request_body(model_name, index, max_tokens, temperature))


def vllm_requests(url: str, model_dir: str, max_tokens: int, temperature: float) -> RequestFactory:
    """vLLM's own `/v1/completions`: the prompt ids our server renders and the body our vLLM engine sends."""
    from transformers import AutoTokenizer

    from server.engine.base import SamplingParams
    from server.engine.vllm import VLLMEngine, model_stop_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = VLLMEngine(url, tokenizer, stop_ids=model_stop_ids(model_dir, tokenizer))
    engine.model_id = asyncio.run(served_model_name(url))
    all_ids = prompt_ids(tokenizer)

    def make(index: int) -> tuple[str, dict[str, Any]]:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                                seed=index if temperature > 0 else None)
        body = engine.request_body(all_ids[index % len(all_ids)], params)
        return "/v1/completions", {**body, "stream_options": {"include_usage": True}}

    return make


class VLLMTarget:
    """A vLLM: its URL and, when we started it, the CPU time of its process tree (API server + engine)."""

    def __init__(self, url: str, process: Any = None) -> None:
        self.process = process
        self.url = url

    def cpu_seconds(self) -> float | None:
        if self.process is None:
            return None
        try:
            import psutil

            root = psutil.Process(self.process.proc.pid)
            return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])
        except Exception:  # noqa: BLE001 - informational column
            return None


async def one_request(client: Any, body: dict[str, Any], path: str = "/v1/chat/completions") -> RequestResult:
    """One streamed chat completion (or vLLM completion), timed chunk by chunk."""
    result = RequestResult(ok=False, start=time.perf_counter())
    last: float | None = None
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"in-band error: {chunk['error']}"
                    return result
                if chunk.get("usage"):
                    result.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta") or {}
                    # chat chunks carry `delta`; vLLM's completions chunks `text` / `token_ids`
                    if delta.get("content") or delta.get("tool_calls") or choice.get("token_ids"):
                        if last is None:
                            result.ttft = now - result.start
                        else:
                            result.gaps.append(now - last)
                        last = now
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
    except Exception as exc:  # noqa: BLE001 - reported per request
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        result.end = time.perf_counter()
    result.ok = True
    return result


def check_lengths(results: list[RequestResult], max_tokens: int) -> list[str]:
    """Problems with finished requests: errors, or not exactly `max_tokens` tokens."""
    problems = []
    for r in results:
        if r.error:
            problems.append(r.error)
        elif r.completion_tokens != max_tokens or r.finish_reason != "length":
            problems.append(
                f"completion_tokens={r.completion_tokens} finish_reason={r.finish_reason} "
                f"(expected {max_tokens}, 'length'): the model stopped early or usage is missing"
            )
    return problems


async def run_level(
    server: Target,
    mode: str,
    make: RequestFactory,
    concurrency: int,
    n_requests: int,
    max_tokens: int,
    time_limit: float,
) -> LevelResult:
    import httpx

    n_requests = max(n_requests, concurrency)
    results: list[RequestResult] = []
    counter = iter(range(n_requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(time_limit + 120, connect=30)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        deadline = start + time_limit
        cpu0, client0 = server.cpu_seconds(), time.process_time()

        async def worker() -> None:
            for index in counter:
                if time.perf_counter() >= deadline:
                    return
                path, body = make(index)
                results.append(await one_request(client, body, path))

        workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        # Hard cap: requests still running a while after the deadline are cut off (and reported).
        done, pending = await asyncio.wait(workers, timeout=time_limit + 60)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall_end = time.perf_counter()
        cpu1, client1 = server.cpu_seconds(), time.process_time()
    completed = [r for r in results if r.ok and r.completion_tokens is not None]
    problems = check_lengths(results, max_tokens)
    tokens = sum(r.completion_tokens or 0 for r in completed)
    if completed:
        wall = max(r.end for r in completed) - min(r.start for r in results)
    else:
        wall = wall_end - start
    ttfts = [r.ttft for r in completed if r.ttft is not None]
    gaps = [g for r in completed for g in r.gaps]
    return LevelResult(
        mode=mode,
        concurrency=concurrency,
        requests=n_requests,
        completed=len(completed),
        tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        ttft_p50_ms=percentile(ttfts, 50) * 1e3,
        ttft_p95_ms=percentile(ttfts, 95) * 1e3,
        itl_p50_ms=percentile(gaps, 50) * 1e3,
        itl_p95_ms=percentile(gaps, 95) * 1e3,
        server_cpu_cores=(cpu1 - cpu0) / (wall_end - start) if cpu0 is not None and cpu1 is not None else None,
        tokens_per_server_cpu_s=tokens / (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None and cpu1 > cpu0 else None,
        client_cpu_cores=(client1 - client0) / (wall_end - start),
        capped=len(results) < n_requests or bool(pending),
        errors=problems,
    )


async def served_model_name(url: str) -> str:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]


async def warm_up(server: Target, make: RequestFactory, max_tokens: int) -> list[str]:
    """One request per prompt, two at a time: first-call costs out of the way, prompts checked."""
    import httpx

    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
        results = []
        for i in range(0, len(PROMPTS), 2):
            batch = [one_request(client, make(j)[1], make(j)[0]) for j in (i, i + 1)]
            results += await asyncio.gather(*batch)
    return check_lengths(results, max_tokens)


# ---------------------------------------------------------------------------------------------
# Raw generate (no HTTP)


@dataclass
class RawResult:
    tokens_per_s: float
    tokens_per_cpu_s: float  # tokens / CPU seconds of this process (less sensitive to other load)
    tokens_per_s_min_new_tokens: float | None
    runs: int
    device: str


def prompt_ids(tokenizer: Any) -> list[list[int]]:
    """The ids the server feeds the model for each of PROMPTS (same renderer, same format)."""
    from prompts import load_format
    from server.format.render import PromptEncoder, render_prompt

    encoder = PromptEncoder.from_tokenizer(tokenizer)
    fmt = load_format()
    return [render_prompt(messages, tools, None, fmt, encoder).ids for messages, tools in PROMPTS]


class RawGenerate:
    """`model.generate` at batch 1 in this process: the model-only reference (no HTTP, no engine)."""

    def __init__(self, model_dir: str, threads: int | None, device: str) -> None:
        import torch

        from server.engine.builtin import load_model

        if threads:
            torch.set_num_threads(threads)
        self.model, tokenizer = load_model(model_dir, device=device)
        self.device = str(self.model.device)
        self.all_ids = [torch.tensor([ids], device=self.model.device) for ids in prompt_ids(tokenizer)]

    def _generate(self, ids: Any, config: Any, max_tokens: int) -> int:
        import torch

        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        made = out.shape[1] - ids.shape[1]
        if made != max_tokens:
            raise RuntimeError(f"raw generate made {made} tokens, expected {max_tokens}")
        return made

    def _timed(self, config: Any, max_tokens: int, at_least: float) -> tuple[float, float, int]:
        for ids in self.all_ids:  # warm-up
            self._generate(ids, config, max_tokens)
        tokens, runs, start, cpu_start = 0, 0, time.perf_counter(), time.process_time()
        while runs < len(self.all_ids) or time.perf_counter() - start < at_least:
            tokens += self._generate(self.all_ids[runs % len(self.all_ids)], config, max_tokens)
            runs += 1
        return tokens / (time.perf_counter() - start), tokens / max(time.process_time() - cpu_start, 1e-9), runs

    def measure(self, max_tokens: int, min_seconds: float) -> RawResult:
        """Tokens/s making exactly `max_tokens` tokens per call: stop tokens off (the reference), and,
        for information, stop tokens on with `min_new_tokens=max_tokens`."""
        no_eos = copy.deepcopy(self.model.generation_config)
        no_eos.update(eos_token_id=None, do_sample=False, max_new_tokens=max_tokens, min_new_tokens=None)
        if no_eos.pad_token_id is None:
            no_eos.pad_token_id = 0
        min_new = copy.deepcopy(self.model.generation_config)
        min_new.update(do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens)
        rate, cpu_rate, runs = self._timed(no_eos, max_tokens, min_seconds)
        try:
            rate_min_new: float | None = self._timed(min_new, max_tokens, 0)[0]
        except Exception as exc:  # noqa: BLE001 - informational only
            print(f"  (min_new_tokens variant failed: {exc})", flush=True)
            rate_min_new = None
        return RawResult(rate, cpu_rate, rate_min_new, runs, self.device)


# ---------------------------------------------------------------------------------------------
# Report


def fmt_ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def print_table(rows: list[LevelResult]) -> None:
    header = (
        f"{'mode':<14} {'conc':>4} {'done':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} "
        f"{'ITL p50':>8} {'ITL p95':>8} {'srv CPU':>7} {'tok/CPU-s':>9} {'cli CPU':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        srv = "-" if r.server_cpu_cores is None else f"{r.server_cpu_cores:.2f}"
        per_cpu = "-" if r.tokens_per_server_cpu_s is None else f"{r.tokens_per_server_cpu_s:.0f}"
        done = f"{r.completed}/{r.requests}" + ("*" if r.capped else "")
        print(
            f"{r.mode:<14} {r.concurrency:>4} {done:>7} {r.tokens_per_s:>8.1f} {fmt_ms(r.ttft_p50_ms):>9} "
            f"{fmt_ms(r.ttft_p95_ms):>9} {fmt_ms(r.itl_p50_ms):>8} {fmt_ms(r.itl_p95_ms):>8} {srv:>7} "
            f"{per_cpu:>9} {r.client_cpu_cores:>7.2f}"
        )
    print(
        "latencies in ms; srv CPU / cli CPU: cores the server / load generator used; tok/CPU-s: tokens per\n"
        "second of server CPU time (robust to other load on the machine); * = cut off by --time-limit"
    )


def report(args: argparse.Namespace, levels: list[int], raws: list[RawResult], rows: list[LevelResult]) -> dict[str, Any]:
    """Print the tables and ratios; return the ratios."""
    print()
    print(
        f"Serving benchmark: {args.max_tokens} tokens per request, threads={args.threads}, "
        f"temperature={args.temperature}, {os.cpu_count()} CPUs, load average now {load_average()}"
        + (f"; each row is the median of {args.repeats} runs" if args.repeats > 1 else "")
    )
    raw = max(raws, key=lambda r: r.tokens_per_s) if raws else None
    if raw is not None:
        runs = ", ".join(f"{r.tokens_per_s:.1f}" for r in raws)
        extra = f"; with min_new_tokens: {raw.tokens_per_s_min_new_tokens:.1f}" if raw.tokens_per_s_min_new_tokens else ""
        print(
            f"(c) raw model.generate, batch 1, no HTTP: {raw.tokens_per_s:.1f} tok/s (best of {runs}), "
            f"{raw.tokens_per_cpu_s:.0f} tok/CPU-s{extra}"
        )
    print_table(rows)
    by_key = {(r.mode, r.concurrency): r for r in rows}
    ratios: dict[str, Any] = {}
    print()
    for level in levels:
        a, b = by_key.get(("batching", level)), by_key.get(("one-at-a-time", level))
        if a and b and b.tokens_per_s > 0:
            ratios[f"batching/one-at-a-time@{level}"] = a.tokens_per_s / b.tokens_per_s
            line = f"batching / one-at-a-time at concurrency {level:>2}: {a.tokens_per_s / b.tokens_per_s:5.2f}x tok/s"
            if a.tokens_per_server_cpu_s and b.tokens_per_server_cpu_s:
                ratios[f"batching/one-at-a-time@{level}_per_cpu"] = a.tokens_per_server_cpu_s / b.tokens_per_server_cpu_s
                line += f", {a.tokens_per_server_cpu_s / b.tokens_per_server_cpu_s:5.2f}x tok/CPU-s"
            print(line)
    for level in levels:
        ours, floor = by_key.get(("over-vllm", level)), by_key.get(("vllm", level))
        if ours and floor and floor.tokens_per_s > 0:
            ratios[f"over-vllm/vllm@{level}"] = ours.tokens_per_s / floor.tokens_per_s
            print(f"agent-server over vLLM / vLLM's own /v1/completions at concurrency {level:>2}: "
                  f"{ours.tokens_per_s / floor.tokens_per_s:5.2f}x tok/s")
    a1 = by_key.get(("batching", 1))
    if a1 and raw is not None and raw.tokens_per_s > 0:
        ratios["batching@1/raw"] = a1.tokens_per_s / raw.tokens_per_s
        line = f"batching at concurrency 1 / raw generate: {a1.tokens_per_s / raw.tokens_per_s:.2f} tok/s"
        if a1.tokens_per_server_cpu_s:
            ratios["batching@1/raw_per_cpu"] = a1.tokens_per_server_cpu_s / raw.tokens_per_cpu_s
            line += f", {a1.tokens_per_server_cpu_s / raw.tokens_per_cpu_s:.2f} tok/CPU-s"
        print(line)
    return ratios


def load_average() -> str:
    """1-minute load average (other work on the machine skews every number here)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model directory (default: build the tiny random test model in a temp dir)")
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated concurrency levels (default 1,4,8,16)")
    parser.add_argument("--requests-per-level", type=int, default=32, help="requests per level, at least the concurrency (default 32)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates, exactly (default 64)")
    parser.add_argument("--time-limit", type=float, default=120, help="wall-time cap per level in seconds (default 120)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the servers and raw generate (default 1)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="passed to the batching server (default: server's)")
    parser.add_argument("--max-running", type=int, default=None, help="batching server's max_running (default max(16, top level))")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (servers and raw generate)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples with a fixed seed per request")
    parser.add_argument("--modes", default="raw,batching,one-at-a-time",
                        help="which of raw,batching,one-at-a-time,over-vllm,vllm to run")
    parser.add_argument("--vllm-python", default=default_vllm_python(),
                        help="the Python with vLLM for over-vllm and vllm (default $AGENT_SERVER_VLLM_PYTHON or .venv-vllm)")
    parser.add_argument("--vllm-url", help="use this running vLLM (serving --model) instead of starting one")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each level this many times (interleaved) and report the median run (default 1)")
    parser.add_argument("--raw-seconds", type=float, default=5.0, help="least time spent timing raw generate (default 5)")
    parser.add_argument("--raw-repeats", type=int, default=2, choices=(1, 2),
                        help="time raw generate before the HTTP runs only (1), or before and after them (2, default; the faster is kept)")
    parser.add_argument("--json", dest="json_path", help="also write the results here as JSON")
    args = parser.parse_args(argv)

    # SIGTERM -> SystemExit, so the `finally` that stops the servers runs (no orphaned servers).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    modes = {m.strip() for m in args.modes.split(",") if m.strip()}
    unknown = modes - {"raw", "batching", "one-at-a-time", "over-vllm", "vllm"}
    if unknown or not levels or min(levels) < 1:
        parser.error(f"bad --modes {sorted(unknown)} or --concurrency {args.concurrency!r}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}, load average {load_average()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        model_dir = args.model
        if not model_dir:
            progress("building the tiny test model (real Qwen tokenizer, random tiny Qwen2) ...")
            from server.demo import build_random_model
            from server.qwen_tokenizer import build_qwen_tokenizer

            tokenizer_dir = build_qwen_tokenizer(pathlib.Path(tmp) / "tok")
            model_dir = str(build_random_model(tokenizer_dir, pathlib.Path(tmp) / "model"))
        progress(f"model: {model_dir}")
        return run_all(args, model_dir, levels, modes, pathlib.Path(tmp))


def default_vllm_python() -> str:
    return os.environ.get("AGENT_SERVER_VLLM_PYTHON") or str(REPO_ROOT / ".venv-vllm" / "bin" / "python")


def start_vllm(args: argparse.Namespace, model_dir: str, tmp: pathlib.Path) -> Any:
    """vLLM on the same model (CPU-friendly settings; caches and its log under `tmp`)."""
    from server.engine.vllm_process import VLLMProcess, cpu_env

    env = cpu_env(tmp, os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    log_file = open(tmp / "vllm.log", "wb")  # noqa: SIM115 - lives as long as the process
    process = VLLMProcess(args.vllm_python, model_dir, extra_args="--enforce-eager", env=env, log_file=log_file)
    process.start()
    progress(f"vLLM: {' '.join(process.cmd)} (log {tmp / 'vllm.log'})")
    return process


def run_all(args: argparse.Namespace, model_dir: str, levels: list[int], modes: set[str], tmp: pathlib.Path) -> int:
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": load_average(),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "json_path"},
    }
    common = ["--model", model_dir, "--device", args.device, "--max-queued", str(max(64, max(levels)))]
    if args.threads:
        common += ["--threads", str(args.threads)]
    server_args: dict[str, list[str]] = {}
    if "batching" in modes:
        extra = ["--max-running", str(args.max_running or max(16, max(levels)))]
        if args.max_batch_tokens:
            extra += ["--max-batch-tokens", str(args.max_batch_tokens)]
        server_args["batching"] = common + extra
    if "one-at-a-time" in modes:
        server_args["one-at-a-time"] = common + ["--max-running", "1"]

    running = max(16, max(levels))
    servers: dict[str, ServerProcess] = {}
    targets: dict[str, Target] = {}
    vllm = None
    rows: list[LevelResult] = []
    raws: list[RawResult] = []
    problems: list[str] = []
    raw: RawGenerate | None = None

    def measure_raw(when: str) -> None:
        assert raw is not None
        progress(f"(c) raw model.generate, batch 1, {args.max_tokens} tokens ({when}) ...")
        raws.append(raw.measure(args.max_tokens, args.raw_seconds))
        progress(f"    {raws[-1].tokens_per_s:.1f} tok/s over {raws[-1].runs} runs")

    try:
        # All servers start at once, and the raw-generate model loads meanwhile; everything is
        # measured one thing at a time, while the others sit idle (an idle server uses no CPU).
        if modes & {"over-vllm", "vllm"} and not args.vllm_url:
            vllm = start_vllm(args, model_dir, tmp)
        for mode, sargs in server_args.items():
            servers[mode] = ServerProcess(sargs, name=mode)
            progress(f"server ({mode}): {' '.join(servers[mode].cmd[1:])}")
        raw = RawGenerate(model_dir, args.threads, args.device) if "raw" in modes else None
        factories: dict[str, RequestFactory] = {}
        vllm_url = args.vllm_url or (vllm.wait_healthy(timeout=900) if vllm is not None else None)
        if vllm_url:
            progress(f"  vLLM ready at {vllm_url}")
            if "over-vllm" in modes:
                servers["over-vllm"] = ServerProcess(
                    ["--model", model_dir, "--engine-url", vllm_url, "--max-running", str(args.max_running or running),
                     "--max-queued", str(max(64, max(levels)))], name="over-vllm")
            if "vllm" in modes:
                targets["vllm"] = VLLMTarget(vllm_url, vllm)
                factories["vllm"] = vllm_requests(vllm_url, model_dir, args.max_tokens, args.temperature)
        for mode, server in servers.items():
            server.wait_ready()
            targets[mode] = server
            factories[mode] = chat_requests(asyncio.run(served_model_name(server.url)), args.max_tokens, args.temperature)
            progress(f"  {mode} ready at {server.url}")
        order = [m for m in ("batching", "one-at-a-time", "over-vllm", "vllm") if m in targets]
        if raw is not None:
            measure_raw("before the HTTP runs")
        for mode in order:
            warm = asyncio.run(warm_up(targets[mode], factories[mode], args.max_tokens))
            problems += [f"{mode} warm-up: {p}" for p in warm]
        if not problems:
            # Levels outer, repeats and servers inner: a burst of other work on the machine hits
            # all servers alike.
            for level in levels:
                runs: dict[str, list[LevelResult]] = {mode: [] for mode in order}
                for repeat in range(args.repeats):
                    for mode in order:
                        which = f", run {repeat + 1}/{args.repeats}" if args.repeats > 1 else ""
                        progress(f"  {mode}: concurrency {level}{which} ...")
                        row = asyncio.run(
                            run_level(targets[mode], mode, factories[mode], level, args.requests_per_level,
                                      args.max_tokens, args.time_limit)
                        )
                        runs[mode].append(row)
                        problems += [f"{mode} c={level}: {p}" for p in row.errors]
                        progress(
                            f"    {row.tokens_per_s:.1f} tok/s, TTFT p50 {fmt_ms(row.ttft_p50_ms)} ms, "
                            f"ITL p50 {fmt_ms(row.itl_p50_ms)} ms ({row.completed}/{row.requests} done)"
                        )
                for mode_runs in runs.values():
                    ordered = sorted(mode_runs, key=lambda r: r.tokens_per_s)
                    median = ordered[len(ordered) // 2]
                    median.all_tokens_per_s = [r.tokens_per_s for r in mode_runs]
                    rows.append(median)
        if raw is not None and args.raw_repeats > 1 and not problems:
            measure_raw("after the HTTP runs")
    finally:
        for server in servers.values():
            server.stop()
        if vllm is not None:
            vllm.stop()

    ratios = report(args, levels, raws, rows)
    results["raw"] = [asdict(r) for r in raws]
    results["levels"] = [asdict(r) for r in rows]
    results["ratios"] = ratios
    results["problems"] = problems
    if args.json_path:
        pathlib.Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json_path}")
    if problems:
        print(
            f"\nFAILED: {len(problems)} request(s) failed or did not generate exactly {args.max_tokens} tokens:",
            file=sys.stderr,
        )
        for p in problems[:10]:
            print("  " + p, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
