"""`--api-key` / AGENT_SERVER_API_KEY: Bearer auth on /v1/*, OpenAI's 401, and the key kept out of logs.

OpenAI answers a missing or wrong key with 401, type `invalid_request_error`, code
`invalid_api_key`; the SDKs raise `AuthenticationError` from the status.
"""

from __future__ import annotations

import httpx
import openai
import pytest

MODEL = "Qwen1.5-4B-agent"
KEY = "sekret"
ENV_KEY = "env-sekret-4f1c"
HI = [{"role": "user", "content": "hi"}]
CHAT = {"model": MODEL, "messages": HI, "max_tokens": 1}

# Everything a client might send instead of the right key; none of it may be accepted or logged.
WRONG = {
    "missing": None,
    "wrong_key": "Bearer wrong-key-7731",
    "prefix_of_key": "Bearer sekre",
    "key_plus_suffix": "Bearer sekretX",
    "other_case": "Bearer SEKRET",
    "basic_scheme": "Basic c2VrcmV0",
    "bare_key": "sekret",
    "bearer_without_key": "Bearer",
    "empty": "",
}


@pytest.fixture(scope="module")
def server(start_server, tiny_model_dir):
    running = start_server("--model", str(tiny_model_dir), "--max-model-len", "256", "--api-key", KEY, "--log-level", "debug")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def env_server(start_server, tiny_model_dir):
    running = start_server("--model", str(tiny_model_dir), "--max-model-len", "256", env={"AGENT_SERVER_API_KEY": ENV_KEY})
    yield running
    running.stop()


def headers_for(authorization: str | None) -> dict[str, str]:
    return {} if authorization is None else {"Authorization": authorization}


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["param"] is None
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("authorization", WRONG.values(), ids=list(WRONG))
def test_v1_routes_need_the_key(server, authorization):
    with httpx.Client(base_url=server.url, headers=headers_for(authorization), timeout=60) as http:
        assert_401(http.get("/v1/models"))
        assert_401(http.get(f"/v1/models/{MODEL}"))
        assert_401(http.post("/v1/chat/completions", json=CHAT))
        assert_401(http.post("/v1/chat/completions", json={**CHAT, "stream": True}))
        # Auth comes before validation: without the key nothing about the request is revealed.
        assert_401(http.post("/v1/chat/completions", json={"model": 1}))
        assert_401(http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"}))
        assert_401(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}))
        assert_401(http.post("/v1/responses", json={"model": MODEL, "input": "hi"}))
        assert_401(http.get("/v1/responses/resp_x"))
        assert_401(http.delete("/v1/responses/resp_x"))
        assert_401(http.post("/v1/chat/completions/render", json=CHAT))
        assert_401(http.post("/tokenize", json={"prompt": "hi"}))
        assert_401(http.post("/detokenize", json={"tokens": [1]}))


def test_right_key_works_and_health_and_metrics_stay_open(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/metrics").status_code == 200
        ok = {"Authorization": f"Bearer {KEY}"}
        assert http.get("/v1/models", headers=ok).json()["data"][0]["id"] == MODEL
        assert http.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200  # scheme is case-insensitive
        answer = http.post("/v1/chat/completions", json=CHAT, headers=ok)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 1
        # With the key, validation errors come back as usual.
        assert http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"}, headers=ok).status_code == 404


def test_openai_sdk_with_and_without_the_key(server):
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in good.models.list().data] == [MODEL]
    response = good.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    assert response.usage.completion_tokens == 1
    stream = good.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, stream=True)
    assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in stream)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-not-it", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"


def test_key_from_the_environment(env_server):
    with httpx.Client(base_url=env_server.url, timeout=60) as http:
        assert_401(http.get("/v1/models"))
        assert_401(http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}))
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {ENV_KEY}"}).status_code == 200
        assert http.get("/health").status_code == 200
    sdk = openai.OpenAI(base_url=env_server.url + "/v1", api_key=ENV_KEY, max_retries=0, timeout=60)
    assert sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=1).usage.completion_tokens == 1


def test_keys_never_reach_the_log(server, env_server):
    """Runs after the tests above (file order), so the logs hold every request they made, at debug level."""
    with httpx.Client(base_url=server.url, timeout=60) as http:  # make sure there is traffic even when run alone
        http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        http.get("/v1/models", headers={"Authorization": "Bearer wrong-key-7731"})
        http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {KEY}"})
    log = "".join(server.log)
    assert "DEBUG" in log, "the server should run at debug level here"
    assert "401" in log and "/v1/models" in log  # requests are logged, only without secrets
    for secret in (KEY, "wrong-key-7731", "c2VrcmV0"):
        assert secret not in log, f"{secret!r} leaked into the server log"
    env_log = "".join(env_server.log)
    assert ENV_KEY not in env_log
