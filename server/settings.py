"""Server settings: command-line flags, each with an AGENT_SERVER_* environment variable."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "AGENT_SERVER_"


@dataclass
class Settings:
    """Everything `serve` can be told. Field `x_y` is flag `--x-y` and env `AGENT_SERVER_X_Y`."""

    model: str | None = field(default=None, metadata={"help": "model directory or hub id"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter directory, merged into the model at load"})
    demo: bool = field(default=False, metadata={"help": "serve the tiny offline demo model (built once, cached)"})
    served_model_name: str = field(default="Qwen1.5-4B-agent", metadata={"help": "the model name clients send"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=8000, metadata={"help": "port to bind"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    max_model_len: int | None = field(default=None, metadata={"help": "context limit in tokens (default: model's, at most 4096)"})
    max_running: int = field(default=16, metadata={"help": "sequences generated together"})
    max_queued: int = field(default=64, metadata={"help": "requests waiting beyond max_running before 429"})
    kv_cache_tokens: int | None = field(default=None, metadata={"help": "paged KV cache size in tokens (default 4 x max_model_len)"})
    max_batch_tokens: int = field(default=512, metadata={"help": "tokens per engine step (prefill chunk)"})
    engine: str = field(
        default="builtin",
        metadata={"help": "builtin (transformers, in this process) or vllm (start a vLLM server as a child process)"},
    )
    engine_url: str | None = field(
        default=None, metadata={"help": "serve through a running vLLM server at this URL (its root, with or without /v1)"}
    )
    engine_grammar: bool = field(
        default=False,
        metadata={"help": "the vLLM at --engine-url runs with --structured-outputs-config "
                          "'{\"backend\": \"guidance\", \"disable_any_whitespace\": true}': send it grammars"},
    )
    engine_startup_timeout: int = field(
        default=300, metadata={"help": "seconds to wait for the vLLM engine at start-up before refusing to start"}
    )
    vllm_python: str = field(default="python", metadata={"help": "--engine vllm: the Python that has vLLM installed"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "--engine vllm: GPUs per model replica (vLLM -tp)"})
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "--engine vllm: fraction of GPU memory vLLM may use"}
    )
    vllm_args: str = field(default="", metadata={"help": "--engine vllm: extra vLLM flags, e.g. \"--data-parallel-size 2\""})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    strict_tools: bool = field(
        default=False, metadata={"help": "hold auto-mode tool calls to their schemas, as if every tool had strict: true"}
    )
    api_key: str | None = field(
        default=None, metadata={"help": "require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize"}
    )
    max_body_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "largest request body accepted (413 beyond)"})
    responses_store_size: int = field(
        default=1000, metadata={"help": "stored /v1/responses kept in memory (oldest dropped beyond; 0: store nothing)"}
    )
    responses_ttl: int = field(
        default=3600, metadata={"help": "seconds a stored response stays retrievable and usable as previous_response_id"}
    )
    log_level: str = field(default="info", metadata={"help": "debug, info, warning, error"})
    demo_cache: str = field(
        default=os.path.join(os.path.expanduser("~"), ".cache", "agent-server", "demo"),
        metadata={"help": "where --demo keeps the demo model"},
    )

    @staticmethod
    def from_env(**overrides: Any) -> Settings:
        """Defaults, then AGENT_SERVER_* variables, then explicit overrides (flags)."""
        values: dict[str, Any] = {}
        for f in fields(Settings):
            raw = os.environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _convert(f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Settings(**values)


def _convert(kind: Any, raw: str) -> Any:
    kind = str(kind)
    if kind.startswith("bool"):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    return raw
