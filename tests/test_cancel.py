"""A client that goes away stops its generation: the sequence leaves the batch and frees its slot."""

from __future__ import annotations

import json
import re
import socket

import httpx
import pytest


def running_and_queued(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics").text
    values = {name: float(v) for name, v in re.findall(r"^agent_server_requests_(running|queued) (\S+)$", text, re.M)}
    return values["running"], values["queued"]


def completion_tokens(url: str) -> float:
    return float(re.findall(r"^agent_server_completion_tokens_total (\S+)$", httpx.get(url + "/metrics").text, re.M)[0])


def wait_for(url: str, expected: tuple[float, float], attempts: int = 2000) -> None:
    """Poll /metrics (bounded) until the gauges read `expected`; each poll is a real round trip."""
    for _ in range(attempts):
        if running_and_queued(url) == expected:
            return
    pytest.fail(f"gauges never reached {expected}: {running_and_queued(url)}")


@pytest.fixture(scope="module")
def long_server(start_server, tiny_model_dir):
    return start_server("--model", str(tiny_model_dir), "--max-running", "2")


STORY = [{"role": "user", "content": "Write a very long story."}]
ROUTES = {  # path, body, sequences it runs
    "chat": ("/v1/chat/completions", {"messages": STORY, "max_tokens": 4000}, 1),
    "chat_n2": ("/v1/chat/completions", {"messages": STORY, "max_tokens": 4000, "n": 2}, 2),
    "completions": ("/v1/completions", {"prompt": "Write a very long story.", "max_tokens": 4000}, 1),
    "responses": ("/v1/responses", {"input": "Write a very long story.", "max_output_tokens": 4000}, 1),
}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_cancels_the_sequence(long_server, stream, route):
    url = long_server.url
    host, port = url.removeprefix("http://").split(":")
    path, fields, sequences = ROUTES[route]
    body = json.dumps({"model": "Qwen1.5-4B-agent", "temperature": 0, "stream": stream, **fields}).encode()
    before = completion_tokens(url)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_for(url, (float(sequences), 0.0))  # generating
    sock.close()
    wait_for(url, (0.0, 0.0))  # cancelled: slot free long before 4000 tokens could be generated
    response = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": "Qwen1.5-4B-agent", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert response.status_code == 200
    assert completion_tokens(url) - before < 4000
