"""The seed agent example and the smoke script, run against the real server on the trained tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from server.demo import DEMO_EXAMPLES, DEMO_SYSTEM, DEMO_TOOLS

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "seed_agent.py"
SMOKE = ROOT / "scripts" / "smoke.sh"
SMOKE_CHECKS = ["health", "models", "chat", "chat-tools", "stream"]


def _load_example():
    spec = importlib.util.spec_from_file_location("seed_agent_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seed_agent = _load_example()


def run_example(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})},
        cwd=ROOT,
    )


def tool_calls(stdout: str) -> list[tuple[str, dict]]:
    """The `tool call: NAME {json}` lines the example printed."""
    return [(m.group(1), json.loads(m.group(2))) for m in re.finditer(r"^tool call: (\S+) (.*)$", stdout, re.M)]


def answers(stdout: str) -> list[str]:
    return re.findall(r"^answer: (.*)$", stdout, re.M)


# ---------------------------------------------------------------------------------------------
# The example is standalone, so it keeps its own copy of the seed's prompt pieces: they must stay
# the bytes the model was trained on.

SEED_FIRST_REQUESTS = [e for e in DEMO_EXAMPLES if e.tools == DEMO_TOOLS and len(e.messages) == 2]
SEED_SECOND_REQUEST = next(e for e in DEMO_EXAMPLES if any(m["role"] == "tool" for m in e.messages) and e.tools is None)
#: The trained answer to each seed question once its tool result is back.
SEED_ANSWERS = [
    next(e.answer for e in DEMO_EXAMPLES if e.tools is None and len(e.messages) == 4 and e.messages[1] == first.messages[1])
    for first in SEED_FIRST_REQUESTS
]


def test_example_sends_the_trained_system_prompt_tools_and_questions():
    assert seed_agent.SYSTEM_PROMPT == DEMO_SYSTEM
    assert seed_agent.TOOLS == DEMO_TOOLS
    assert seed_agent.SEED_QUESTIONS == [e.messages[-1]["content"] for e in SEED_FIRST_REQUESTS]


def test_example_offline_results_are_the_trained_tool_outputs():
    """Every trained follow-up carries the tool output the example prints offline, byte for byte."""
    follow_ups = [e for e in DEMO_EXAMPLES if e.messages[-1]["role"] == "tool" and e.messages[0]["content"] == DEMO_SYSTEM]
    assert len(follow_ups) == 6  # three questions, with and without the tools offered again
    for example in follow_ups:
        call = example.messages[-2]
        if call["role"] == "function":  # the seed's own legacy form
            call = json.loads(call["content"])
            name, arguments = call["name"], call["argument"]
        else:
            name, arguments = call["tool_calls"][0]["function"]["name"], json.loads(call["tool_calls"][0]["function"]["arguments"])
        (value,) = arguments.values()
        expected = seed_agent.TOOL_RESULT_PREFIX + seed_agent.OFFLINE_DATA[name][value]
        assert example.messages[-1]["content"] == expected


def test_example_imports_only_openai_and_the_stdlib():
    imports = set(re.findall(r"^\s*(?:from|import) ([\w.]+)", EXAMPLE.read_text("utf-8"), re.M))
    roots = {name.split(".")[0] for name in imports}
    assert roots - {"openai", "__future__"} <= set(sys.stdlib_module_names), roots


def test_example_tool_failures_are_tool_output(monkeypatch):
    monkeypatch.setattr(seed_agent, "API_BASE", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(seed_agent, "HTTP_TIMEOUT", 5.0)
    online = seed_agent.tool_functions(use_offline=False)
    assert seed_agent.run_tool(online, "get_rubbish_category", '{"keyword": "鸡蛋壳"}').startswith("工具调用失败: 请求")
    offline = seed_agent.tool_functions(use_offline=True)
    assert seed_agent.run_tool(offline, "get_song_information", '{"keyword": "爱在西元前"}').startswith("歌曲: 爱在西元前\n歌手: 周杰伦")
    for name, arguments in [
        ("get_song_information", '{"keyword": "没有这首歌"}'),
        ("no_such_tool", "{}"),
        ("get_rubbish_category", "{not json"),
        ("get_rubbish_category", '{"title": "鸡蛋壳"}'),
        ("get_rubbish_category", "[1]"),
    ]:
        assert seed_agent.run_tool(offline, name, arguments).startswith("工具调用失败: "), (name, arguments)


def test_seed_agent_offline_answers_the_rubbish_question(trained_server):
    result = run_example("--offline", "--base-url", f"{trained_server.url}/v1", "鸡蛋壳属于哪种类型的垃圾?")
    assert result.returncode == 0, result.stdout + result.stderr
    assert tool_calls(result.stdout) == [("get_rubbish_category", {"keyword": "鸡蛋壳"})]
    assert "tool result: 熟鸡蛋壳: 湿垃圾 | 生鸡蛋壳: 湿垃圾 | 鸡蛋壳: 湿垃圾" in result.stdout
    # The follow-up is the seed's second request, so the trained model gives its trained answer.
    assert answers(result.stdout) == [SEED_SECOND_REQUEST.answer]


def test_seed_agent_default_questions_call_the_right_tools(trained_server):
    result = run_example("--offline", "--base-url", f"{trained_server.url}/v1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert tool_calls(result.stdout) == [
        ("get_rubbish_category", {"keyword": "鸡蛋壳"}),
        ("get_song_information", {"keyword": "爱在西元前"}),
        ("get_cartoon_information", {"title": "棋魂"}),
    ]
    assert answers(result.stdout) == SEED_ANSWERS


def test_seed_agent_keep_tools_gets_the_same_answers(trained_server):
    """--keep-tools offers the tools again with the results, as agent libraries do."""
    result = run_example("--offline", "--keep-tools", "--base-url", f"{trained_server.url}/v1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(tool_calls(result.stdout)) == 3
    assert answers(result.stdout) == SEED_ANSWERS


def test_seed_agent_reports_an_unreachable_server():
    result = run_example("--offline", "--base-url", "http://127.0.0.1:9/v1", "--timeout", "5", "你好")
    assert result.returncode == 2
    assert "error: APIConnectionError" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# scripts/smoke.sh

needs_curl = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("curl") is None, reason="scripts/smoke.sh needs bash and curl"
)


def run_smoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SMOKE), *args], capture_output=True, text=True, encoding="utf-8", timeout=300, cwd=ROOT
    )


def check_lines(stdout: str) -> dict[str, str]:
    """{check name: 'ok' or 'FAIL'} from the script's one line per check."""
    lines = stdout.splitlines()
    result = {}
    for line in lines:
        match = re.match(r"^(ok  |FAIL) ([\w-]+)(:.*)?$", line)
        assert match, f"unexpected output line {line!r}"
        result[match.group(2)] = match.group(1).strip()
    return result


@needs_curl
def test_smoke_passes_against_the_trained_server(trained_server):
    result = run_smoke(trained_server.url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert check_lines(result.stdout) == {name: "ok" for name in SMOKE_CHECKS}


@needs_curl
def test_smoke_accepts_a_v1_base_url(trained_server):
    result = run_smoke(trained_server.url + "/v1/")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def keyed_server(start_server, trained_model_dir):
    return start_server("--model", str(trained_model_dir), "--api-key", "sekret")


@needs_curl
def test_smoke_with_api_key(keyed_server):
    result = run_smoke(keyed_server.url, "sekret")
    assert result.returncode == 0, result.stdout + result.stderr
    assert check_lines(result.stdout) == {name: "ok" for name in [*SMOKE_CHECKS, "noauth"]}


@needs_curl
def test_smoke_fails_without_the_api_key(keyed_server):
    result = run_smoke(keyed_server.url)
    assert result.returncode != 0
    lines = check_lines(result.stdout)
    assert lines["health"] == "ok"  # /health needs no key
    assert {lines[name] for name in ["models", "chat", "chat-tools", "stream"]} == {"FAIL"}
    assert "HTTP 401" in result.stdout


@needs_curl
def test_smoke_fails_with_a_wrong_api_key(keyed_server):
    result = run_smoke(keyed_server.url, "wrong")
    assert result.returncode != 0
    assert check_lines(result.stdout)["chat-tools"] == "FAIL"


@needs_curl
def test_smoke_flags_a_key_the_server_does_not_require(trained_server):
    result = run_smoke(trained_server.url, "sekret")
    assert result.returncode != 0
    assert check_lines(result.stdout)["noauth"] == "FAIL"


def test_seed_agent_uses_the_api_key_from_the_environment(keyed_server):
    question = "鸡蛋壳属于哪种类型的垃圾?"
    ok = run_example("--offline", "--base-url", f"{keyed_server.url}/v1", question, env={"OPENAI_API_KEY": "sekret"})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert answers(ok.stdout) == [SEED_SECOND_REQUEST.answer]
    refused = run_example("--offline", "--base-url", f"{keyed_server.url}/v1", question, env={"OPENAI_API_KEY": ""})
    assert refused.returncode == 2
    assert "AuthenticationError" in refused.stderr


@needs_curl
def test_smoke_fails_when_nothing_listens():
    result = run_smoke("http://127.0.0.1:9")
    assert result.returncode == 1
    assert set(check_lines(result.stdout).values()) == {"FAIL"}


@needs_curl
def test_smoke_usage():
    assert run_smoke().returncode == 2
