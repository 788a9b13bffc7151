"""The vLLM engine: what only a remote engine has, over a real vLLM (the CPU build).

The shared end-to-end suite (tests/test_server.py and everything else using `trained_server` /
`client`) already runs on both engines. Here: the request mapping (pure), start-up refusals,
cancellation seen from vLLM's side, 429 on overload, vLLM going away and coming back, and
`serve --engine vllm` starting its own vLLM.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import threading
import time
from collections.abc import Callable

import httpx
import openai
import psutil
import pytest

from server.demo import WEATHER_TOOLS
from server.engine.base import SamplingParams
from server.engine.vllm import TOKENIZER_PROBE, VLLMEngine, engine_root
from server.engine.vllm_process import VLLMProcess, free_port
from server.launcher import ServerProcess

MODEL = "Qwen1.5-4B-agent"
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]
# Sampled at temperature 2 the demo model rambles past 1000 tokens without an end token: a
# request that stays in vLLM until it is cancelled (seeded, so the same every run).
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 4000, "temperature": 2, "seed": 1}


# ---------------------------------------------------------------------------------------------
# Pure: URLs, the name constraint, the request body.


@pytest.mark.parametrize("url", ["http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/", " http://h:8000/v1 "])
def test_engine_url_with_or_without_v1(url):
    assert engine_root(url) == "http://h:8000"


@pytest.fixture(scope="module")
def engine(qwen_tokenizer) -> VLLMEngine:
    return VLLMEngine("http://127.0.0.1:1/v1/", qwen_tokenizer, stop_ids=[151643, 151645])


def test_request_body_defaults(engine):
    body = engine.request_body([1, 2, 3], SamplingParams(max_new_tokens=5))
    assert body == {
        "model": "", "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 1.0, "top_p": 1.0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "stop_token_ids": [151643, 151645],
        "skip_special_tokens": True, "stream": True, "return_token_ids": True,
    }


def test_request_body_maps_each_field(engine):
    params = SamplingParams(max_new_tokens=9, temperature=0.5, top_p=0.9, seed=7, presence_penalty=0.25,
                            frequency_penalty=-0.5, logit_bias=((42, -100.0), (7, 2.5)), logprobs=3)
    body = engine.request_body([1], params)
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")} == {
        "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "seed": 7, "presence_penalty": 0.25, "frequency_penalty": -0.5}
    assert body["logit_bias"] == {"42": -100.0, "7": 2.5}
    assert body["logprobs"] == 3 and body["return_tokens_as_token_ids"] is True
    assert "structured_outputs" not in body
    grammar = 'start: "Action: " /[a-z]+/'
    with_grammar = engine.request_body([1], dataclasses.replace(params, grammar=grammar))
    assert with_grammar["structured_outputs"] == {"grammar": grammar}  # the grammar already holds the names


def test_every_sampling_field_reaches_vllm(engine):
    """A field added to SamplingParams that the vLLM engine ignores fails here."""
    default = SamplingParams(max_new_tokens=5)
    changed = {"max_new_tokens": 6, "temperature": 0.3, "top_p": 0.5, "seed": 1, "presence_penalty": 1.0,
               "frequency_penalty": 1.0, "logit_bias": ((1, 1.0),), "logprobs": 0,
               "grammar": 'start: "x"'}
    assert set(changed) == {f.name for f in dataclasses.fields(SamplingParams)}
    base = engine.request_body([1], default)
    for name, value in changed.items():
        assert engine.request_body([1], dataclasses.replace(default, **{name: value})) != base, name


# ---------------------------------------------------------------------------------------------
# Both engines: the engine label.


def test_metrics_label_the_engine(trained_server, client):
    client.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=2)
    metrics = httpx.get(trained_server.url + "/metrics").text
    assert f'agent_server_engine_info{{engine="{trained_server.engine}"}} 1.0' in metrics
    assert re.search(r"^agent_server_engine_errors_total 0\.0$", metrics, re.M)


# ---------------------------------------------------------------------------------------------
# Real vLLM: start-up checks.


def wait_until(condition: Callable[[], bool], what: str, bound: float = 120) -> None:
    """Poll an observable condition (bounded); fail with `what` if it never holds."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never observed: {what}")
        time.sleep(0.05)  # pacing between polls


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory, qwen_tokenizer_dir):
    """The Qwen tokenizer with one added token: it encodes the probe's Chinese differently."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    tokenizer.add_tokens(["鸡蛋壳"])
    assert "鸡蛋壳" in TOKENIZER_PROBE
    path = tmp_path_factory.mktemp("other_tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("case", ["unreachable", "both_flags", "tokenizer", "context"])
def test_refuses_to_start_and_says_why(case, request, trained_model_dir, other_tokenizer_dir):
    model, url, extra = str(trained_model_dir), f"http://127.0.0.1:{free_port()}/v1", ["--engine-startup-timeout", "2"]
    if case in ("tokenizer", "context"):
        url = request.getfixturevalue("vllm_server").url
    expected = {
        "unreachable": "did not become healthy within 2 s",
        "tokenizer": "the tokenizer of vLLM's model",
        "context": "--max-model-len 8192 exceeds the context vLLM serves (4096)",
        "both_flags": "not both",
    }[case]
    if case == "tokenizer":
        model = str(other_tokenizer_dir)
    elif case == "context":
        extra = ["--max-model-len", "8192"]
    elif case == "both_flags":
        extra = ["--engine", "vllm"]
    process = ServerProcess(["--model", model, "--engine-url", url, *extra], name=case)
    with pytest.raises(RuntimeError) as info:
        process.wait_ready()
    assert process.proc.wait(timeout=60) != 0
    assert expected in "".join(process.log), "".join(process.log[-30:])
    assert "Uvicorn running" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Real vLLM: cancellation and admission seen from both sides.


def gauges(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics").text
    values = dict(re.findall(r"^agent_server_requests_(running|queued) (\S+)$", text, re.M))
    return float(values["running"]), float(values["queued"])


def vllm_running(vllm_url: str) -> float:
    text = httpx.get(vllm_url + "/metrics").text
    return sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def one_slot(start_server, trained_model_dir, vllm_server):
    """An agent-server over the session's vLLM with one running slot and no queue."""
    server = start_server("--model", str(trained_model_dir), "--engine-url", vllm_server.url,
                          "--max-running", "1", "--max-queued", "0")
    yield server
    server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_aborts_the_request_in_vllm(one_slot, vllm_server, stream):
    host, port = one_slot.url.removeprefix("http://").split(":")
    body = json.dumps({**LONG, "stream": stream}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_until(lambda: gauges(one_slot.url) == (1.0, 0.0) and vllm_running(vllm_server.url) == 1, "generating in vLLM")
    sock.close()
    wait_until(lambda: gauges(one_slot.url) == (0.0, 0.0) and vllm_running(vllm_server.url) == 0, "aborted in vLLM")
    sdk = openai.OpenAI(base_url=one_slot.url + "/v1", api_key="x", max_retries=0, timeout=120)
    assert sdk.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=2).choices[0].finish_reason == "length"
    completed = re.findall(r"^agent_server_completion_tokens_total (\S+)$", httpx.get(one_slot.url + "/metrics").text, re.M)
    assert float(completed[0]) < 4000


def test_an_external_vllm_not_declared_grammar_ready_refuses_constrained_requests(one_slot):
    """Without --engine-grammar the server cannot know that vLLM enforces its grammars: a request that
    needs one is a 400 naming the field, never an unconstrained answer; the rest is served."""
    sdk = openai.OpenAI(base_url=one_slot.url + "/v1", api_key="x", max_retries=0, timeout=120)
    cases = [("tool_choice", {"tools": WEATHER_TOOLS, "tool_choice": "required"}),
             ("response_format", {"response_format": {"type": "json_object"}}),
             ("tools", {"tools": [{**WEATHER_TOOLS[0], "function": {**WEATHER_TOOLS[0]["function"], "strict": True}}]})]
    for param, fields in cases:
        with pytest.raises(openai.BadRequestError) as info:
            sdk.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=8, **fields)
        assert info.value.body["param"] == param and info.value.body["code"] == "unsupported_parameter"
        assert "--engine-grammar" in info.value.body["message"]
    served = sdk.chat.completions.create(model=MODEL, messages=PARIS, tools=WEATHER_TOOLS, max_tokens=40, temperature=0)
    assert served.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_overload_is_429_and_a_closed_stream_frees_the_slot(one_slot, vllm_server):
    sdk = openai.OpenAI(base_url=one_slot.url + "/v1", api_key="x", max_retries=0, timeout=120)
    with httpx.Client(base_url=one_slot.url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            seen = 0
            while seen < 2:  # the role chunk, then generated text: it is running in vLLM
                seen += next(lines).startswith("data: ")
            for stream in (False, True):
                with pytest.raises(openai.RateLimitError) as info:
                    sdk.chat.completions.create(model=MODEL, messages=PARIS, stream=stream)
                assert info.value.body["code"] == "server_busy"
                assert info.value.response.headers["retry-after"] == "1"
        wait_until(lambda: gauges(one_slot.url) == (0.0, 0.0) and vllm_running(vllm_server.url) == 0, "slot released")
    response = sdk.chat.completions.create(model=MODEL, messages=PARIS, tools=WEATHER_TOOLS, temperature=0)
    assert response.choices[0].message.tool_calls[0].function.name == "get_weather"  # served again


# ---------------------------------------------------------------------------------------------
# Real vLLM: it goes away and comes back.


class TcpProxy:
    """Forwards a local port to vLLM. `stop()` cuts every connection and stops listening; `start()`
    listens again on the same port. To the server, vLLM went away and came back (its network
    address did): the real vLLM keeps running, so no second start-up is paid."""

    def __init__(self, target_url: str) -> None:
        host, port = target_url.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: same port again
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def stop(self) -> None:
        assert self._listener is not None
        for sock in [self._listener, *self._open]:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on it
            except OSError:
                pass
            sock.close()
        self._listener, self._open = None, []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self._open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("service_unavailable_error", "engine_unavailable")


def test_vllm_down_is_503_and_service_resumes_by_itself(start_server, trained_model_dir, vllm_server):
    proxy = TcpProxy(vllm_server.url)
    proxy.start()
    server = start_server("--model", str(trained_model_dir), "--engine-url", proxy.url + "/v1")
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            # A stream in flight when vLLM goes away ends with an error event, not a hang.
            with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as inflight:
                lines = inflight.iter_lines()
                seen = 0
                while seen < 2:
                    seen += next(lines).startswith("data: ")
                proxy.stop()
                tail = [line for line in lines if line.startswith("data: ")]
            assert json.loads(tail[-1][6:])["error"]["code"] == "engine_unavailable", tail[-3:]

            wait_until(lambda: http.get("/health").status_code == 503, "/health 503 while vLLM is away")
            assert_unavailable(http.get("/health"))
            for stream in (False, True):
                response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": PARIS, "stream": stream})
                assert_unavailable(response)
                assert response.headers["retry-after"] == "5"
            with pytest.raises(openai.InternalServerError) as info:
                sdk.chat.completions.create(model=MODEL, messages=PARIS)
            assert info.value.status_code == 503 and info.value.body["code"] == "engine_unavailable"
            metrics = http.get("/metrics").text
            assert float(re.findall(r"^agent_server_engine_unavailable_total (\S+)$", metrics, re.M)[0]) >= 4

            proxy.start()
            wait_until(lambda: http.get("/health").status_code == 200, "/health 200 once vLLM is back")
        response = sdk.chat.completions.create(model=MODEL, messages=PARIS, tools=WEATHER_TOOLS, temperature=0)
        assert response.choices[0].message.tool_calls[0].function.name == "get_weather"
    finally:
        server.stop()
        proxy.stop()


# ---------------------------------------------------------------------------------------------
# `serve --engine vllm`: one command starts vLLM, serves through it and stops it.


def test_serve_engine_vllm_runs_its_own_vllm(start_server, trained_model_dir, vllm_python, vllm_env):
    server = start_server("--model", str(trained_model_dir), "--engine", "vllm", "--vllm-python", vllm_python,
                          "--vllm-args", "--enforce-eager --max-num-seqs 8", env=vllm_env)
    children = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())]
    assert len(children) == 1
    assert "--structured-outputs-config" in children[0].cmdline() and "--max-num-seqs" in children[0].cmdline()
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    message = sdk.chat.completions.create(model=MODEL, messages=PARIS, tools=WEATHER_TOOLS, temperature=0).choices[0].message
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [("get_weather", '{"city": "Paris"}')]
    server.stop()
    psutil.wait_procs(children, timeout=60)
    assert not children[0].is_running()


def test_vllm_process_command_line():
    process = VLLMProcess("/opt/vllm/bin/python", "/models/m", port=1234, tensor_parallel_size=4,
                          gpu_memory_utilization=0.8, max_model_len=8192, dtype="bfloat16",
                          extra_args="--data-parallel-size 2 --enable-prefix-caching")
    assert process.cmd[:3] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    args = process.cmd[3:]
    pairs = dict(zip(args[0:16:2], args[1:16:2]))
    assert pairs == {"--model": "/models/m", "--host": "127.0.0.1", "--port": "1234", "--tensor-parallel-size": "4",
                     "--gpu-memory-utilization": "0.8", "--dtype": "bfloat16",
                     "--structured-outputs-config": '{"backend": "guidance", "disable_any_whitespace": true}',
                     "--max-model-len": "8192"}
    assert args[16:] == ["--data-parallel-size", "2", "--enable-prefix-caching"]
