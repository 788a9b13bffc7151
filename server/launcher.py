"""Run `python -m server serve` as a subprocess on 127.0.0.1 with an OS-chosen port.

Used by the tests and the benchmarks (and handy in scripts): the server prints the address it
bound (`Uvicorn running on http://...`), so no port is guessed and no sleep waits for start-up.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import threading
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


class ServerProcess:
    """A server subprocess: `wait_ready()` returns its base URL (no /v1); `log` holds its output."""

    def __init__(
        self, args: list[str], *, name: str = "server", env: dict[str, str] | None = None, startup_timeout: float = 300
    ) -> None:
        self.name = name
        self.log: list[str] = []
        self.url = ""
        self._ready = threading.Event()
        self.cmd = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=REPO_ROOT,
        )
        self.startup_timeout = startup_timeout
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            match = re.search(r"Uvicorn running on (http://\S+)", line)
            if match:
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()  # exited

    def wait_ready(self) -> str:
        if not self._ready.wait(self.startup_timeout) or not self.url:
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n" + "".join(self.log[-40:]))
        return self.url

    def cpu_seconds(self) -> float | None:
        """User+system CPU time of the server process (Linux /proc), None elsewhere."""
        try:
            fields = pathlib.Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        terminate(self.proc)


def terminate(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if the process has not exited after `timeout` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
