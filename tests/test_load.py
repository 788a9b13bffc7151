"""Bounded loopback load: admission control, disconnects and recovery, CI-sized.

Nothing here depends on the machine's speed. Overload is made, not hoped for: streams of ~4000
tokens fill every running slot and queue place (checked on the gauges) before the requests that
must get 429 are sent. Then 64 concurrent clients against `--max-running 4 --max-queued 8` mix
plain and streamed requests, streams dropped after their first chunk, non-streamed requests
abandoned before the answer, and invalid requests: every request must get a well-formed answer,
a 400 for the invalid ones, or a 429 with Retry-After (whether any does depends on timing, so it
is allowed, not required); never a 5xx. /health is polled throughout. Afterwards the server holds
no sequence (running and queued gauges back to 0; a cancelled sequence is released
asynchronously, so /metrics is polled a bounded number of times) and its RSS is back near where
it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
import pytest

MODEL = "Qwen1.5-4B-agent"
CLIENTS = 64
HI = [{"role": "user", "content": "Tell me a story."}]


def body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HI, "max_tokens": 12, **fields}


def gauge(metrics: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", metrics, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


async def wait_until_idle(http: httpx.AsyncClient, attempts: int = 100) -> None:
    """Poll /metrics (bounded) until no sequence is running or queued."""
    for _ in range(attempts):
        metrics = (await http.get("/metrics")).text
        if gauge(metrics, "agent_server_requests_running") == 0 and gauge(metrics, "agent_server_requests_queued") == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"server still holds sequences after {attempts} polls:\n{metrics}")


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def assert_429(response: httpx.Response) -> None:
    error = assert_error(response, 429)
    assert error["type"] == "rate_limit_error" and error["code"] == "server_busy"
    assert int(response.headers["retry-after"]) >= 1


def assert_completion(data: dict[str, Any]) -> None:
    assert data["object"] == "chat.completion" and data["model"] == MODEL
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def assert_chunk(payload: str) -> dict[str, Any]:
    chunk = json.loads(payload)
    assert chunk["object"] == "chat.completion.chunk" and "error" not in chunk, chunk
    return chunk


@dataclass
class Outcome:
    kind: str
    status: int


async def plain(http: httpx.AsyncClient) -> Outcome:
    response = await http.post("/v1/chat/completions", json=body())
    if response.status_code == 429:
        assert_429(response)
    else:
        assert response.status_code == 200, response.text
        assert_completion(response.json())
    return Outcome("plain", response.status_code)


async def streamed(http: httpx.AsyncClient, *, drop_after_first: bool) -> Outcome:
    kind = "dropped" if drop_after_first else "stream"
    async with http.stream("POST", "/v1/chat/completions", json=body(stream=True)) as response:
        if response.status_code != 200:
            await response.aread()
            assert_429(response)
            return Outcome(kind, response.status_code)
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = []
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payloads.append(line[6:])
            if drop_after_first:
                break  # leaving the block closes the connection mid-stream
    if drop_after_first:
        assert_chunk(payloads[0])
    else:
        assert payloads[-1] == "[DONE]"
        chunks = [assert_chunk(p) for p in payloads[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return Outcome(kind, 200)


async def abandoned(http: httpx.AsyncClient) -> Outcome:
    """A non-streamed request whose client gives up before the answer."""
    try:
        response = await asyncio.wait_for(http.post("/v1/chat/completions", json=body(max_tokens=200)), timeout=0.3)
    except asyncio.TimeoutError:
        return Outcome("abandoned", 0)
    if response.status_code == 429:
        assert_429(response)
    else:
        assert response.status_code == 200
    return Outcome("abandoned", response.status_code)


async def invalid(http: httpx.AsyncClient) -> Outcome:
    response = await http.post("/v1/chat/completions", json=body(temperature=5))
    assert_error(response, 400)  # validation comes before admission: never a 429
    return Outcome("invalid", 400)


KINDS = [plain, plain, lambda h: streamed(h, drop_after_first=False), lambda h: streamed(h, drop_after_first=True),
         abandoned, invalid]


MAX_RUNNING, MAX_QUEUED = 4, 8


@pytest.fixture(scope="module")
def server(start_server, tiny_model_dir):
    running = start_server(
        "--model", str(tiny_model_dir), "--max-model-len", "4096",
        "--max-running", str(MAX_RUNNING), "--max-queued", str(MAX_QUEUED),
    )
    yield running
    running.stop()


async def wait_for_gauges(http: httpx.AsyncClient, running: float, queued: float, attempts: int = 2000) -> None:
    """Poll /metrics (bounded: each poll is a real round trip) until the gauges read the given values."""
    for _ in range(attempts):
        metrics = (await http.get("/metrics")).text
        if (gauge(metrics, "agent_server_requests_running"), gauge(metrics, "agent_server_requests_queued")) == (running, queued):
            return
    raise AssertionError(f"gauges never reached running={running} queued={queued}:\n{metrics}")


async def hold_stream(http: httpx.AsyncClient, stack: contextlib.AsyncExitStack) -> httpx.Response:
    """Open a long stream (up to ~4000 tokens) and hold it without reading: it keeps its slot until closed."""
    response = await stack.enter_async_context(
        http.stream("POST", "/v1/chat/completions", json=body(stream=True, max_tokens=4000, temperature=0))
    )
    assert response.status_code == 200
    return response


def test_full_server_refuses_then_recovers(server):
    """Fill every slot deterministically, check that more requests get 429, release, check recovery."""

    async def run() -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http, \
                httpx.AsyncClient(base_url=server.url, timeout=30) as monitor:
            async with contextlib.AsyncExitStack() as held:
                streams = [await hold_stream(http, held) for _ in range(MAX_RUNNING + MAX_QUEUED)]
                # Every slot is taken and every queue place filled: nothing can be admitted until a
                # held stream ends, and none ends before ~4000 tokens or our closing it.
                await wait_for_gauges(monitor, MAX_RUNNING, MAX_QUEUED)
                assert_429(await http.post("/v1/chat/completions", json=body()))
                async with http.stream("POST", "/v1/chat/completions", json=body(stream=True)) as refused:
                    await refused.aread()
                    assert_429(refused)  # refused before any stream starts: a plain JSON 429
                assert_error(await http.post("/v1/chat/completions", json=body(temperature=5)), 400)  # validation first
                assert (await monitor.get("/health")).status_code == 200
                # Read a chunk from one running stream, then drop them all mid-generation.
                lines = streams[0].aiter_lines()
                while not (await lines.__anext__()).startswith("data: "):
                    pass
                await lines.aclose()
            await wait_until_idle(monitor)
            assert_completion((await http.post("/v1/chat/completions", json=body())).json())
            metrics = (await monitor.get("/metrics")).text
            assert float(re.findall(r"^agent_server_completion_tokens_total (\S+)$", metrics, re.M)[0]) < 12 * 4000

    asyncio.run(run())


def test_mixed_load_with_disconnects_and_recovery(server):
    """64 clients at once: whatever the timing, every answer is well-formed (200, 400 or 429), never a 5xx."""
    process = psutil.Process(server.proc.pid)

    async def run() -> None:
        limits = httpx.Limits(max_connections=CLIENTS + 8, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http, \
                httpx.AsyncClient(base_url=server.url, timeout=30) as monitor:
            assert (await http.post("/v1/chat/completions", json=body())).status_code == 200  # warm-up
            start_rss = process.memory_info().rss

            done = asyncio.Event()
            health_polls = 0

            async def poll_health() -> None:
                nonlocal health_polls
                while not done.is_set() and health_polls < 2000:
                    response = await monitor.get("/health")
                    assert response.status_code == 200 and response.json() == {"status": "ok"}
                    health_polls += 1
                    await asyncio.sleep(0.05)  # pacing only: no assertion depends on it

            poller = asyncio.ensure_future(poll_health())
            try:
                outcomes = await asyncio.gather(*(KINDS[i % len(KINDS)](http) for i in range(CLIENTS)))
            finally:
                done.set()
            await poller

            statuses = {(o.kind, o.status) for o in outcomes}
            assert all(o.status < 500 for o in outcomes), statuses
            assert health_polls >= 1, "/health was answered during the load"  # each poll asserted 200

            await wait_until_idle(monitor)
            metrics = (await monitor.get("/metrics")).text
            assert not re.search(r'status="5\d\d"', metrics), "a 5xx was served"
            assert process.memory_info().rss < start_rss + 200 * 2**20
            # And it still serves normally.
            assert (await http.post("/v1/chat/completions", json=body())).status_code == 200

    asyncio.run(run())


@pytest.fixture(scope="module")
def single_slot_server(start_server, tiny_model_dir):
    running = start_server(
        "--model", str(tiny_model_dir), "--max-model-len", "2048", "--max-running", "1", "--max-queued", "0"
    )
    yield running
    running.stop()


def test_full_server_answers_429_and_a_disconnect_frees_the_slot(single_slot_server):
    async def run() -> None:
        async with httpx.AsyncClient(base_url=single_slot_server.url, timeout=60) as http:
            long = body(stream=True, max_tokens=2000)
            async with http.stream("POST", "/v1/chat/completions", json=long) as first:
                assert first.status_code == 200
                # Keep a reference to the line iterator: an abandoned one is finalized, which
                # closes the connection (a disconnect) before this test means to.
                lines = first.aiter_lines()
                seen = 0
                while seen < 2:  # the role chunk, then the first generated text: it is running
                    seen += (await lines.__anext__()).startswith("data: ")
                metrics = (await http.get("/metrics")).text
                assert gauge(metrics, "agent_server_requests_running") == 1

                second = await http.post("/v1/chat/completions", json=body())
                assert_429(second)
                second_stream = await http.post("/v1/chat/completions", json=body(stream=True))
                assert_429(second_stream)  # refused before any stream starts: a plain JSON 429
                await lines.aclose()
            # The client closed the first stream mid-generation: its slot must come back.
            await wait_until_idle(http)
            again = await http.post("/v1/chat/completions", json=body())
            assert again.status_code == 200, again.text
            assert_completion(again.json())

    asyncio.run(run())
