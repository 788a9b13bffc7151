"""GPU benchmark: Qwen1.5-4B-shaped model, batch-1 decode and continuous batching, vs. the bandwidth bound.

    python -m benchmarks.gpu --out gpu_results.json            # on a CUDA machine (minutes)
    python -m benchmarks.gpu --small --out /tmp/small.json     # same code path, tiny shape, on CPU

It needs no weights and no tokenizer: it builds a randomly initialised ``Qwen2ForCausalLM`` with
Qwen1.5-4B's shape (hidden 2560, 40 layers, 20 heads, 20 KV heads, intermediate 6912, vocabulary
151936, untied embeddings, bf16) directly on the GPU, then measures, each section on its own
(an error is printed and the next section runs; results are written to ``--out`` after every
section, so a run cut short still leaves them):

1. ``generate``, batch 1, dynamic cache (plain eager transformers): decode tokens/s;
2. the server's engine (``server.engine.builtin.BuiltinEngine``, transformers' continuous batching, the same
   settings the server uses), driven directly with asyncio (no HTTP), at 1, 8 and 32 concurrent
   sequences: aggregate tokens/s and the per-sequence step time;
3. with ``--vllm-python PATH`` (a Python with vLLM): the server's vLLM engine
   (``server.engine.vllm.VLLMEngine``, what ``serve --engine vllm`` uses: token-id prompts to vLLM's
   ``/v1/completions``, streamed back) on the same weights, saved with the Qwen tokenizer and
   served by a vLLM child, driven exactly like section 2 at the same levels;
4. ``generate``, batch 1, static KV cache + ``torch.compile`` (transformers compiles the decode
   step automatically for ``cache_implementation="static"`` on CUDA; mode "reduce-overhead", i.e.
   CUDA graphs). Last because its compile warm-up is the slowest part; it is skipped if the time
   budget (``--budget-s``) is nearly spent.

Every sequence generates exactly ``--max-tokens`` tokens: the model has no stop token (random
weights, ``eos_token_id=None``), and the counts are checked.

The bandwidth bound: at batch 1 every decode step reads all weights once (except the input
embedding, of which it reads one row), so tokens/s <= bandwidth / weight bytes. The card's peak
bandwidth is looked up from ``torch.cuda.get_device_name()`` (H100 SXM 3.35 TB/s, H200 4.8 TB/s,
...; ``--bandwidth-tbs`` overrides). The table gives each row's step time and the fraction of
that bound it reaches (for batched rows: weights are still read once per step, so the same
bound applies to the step time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import pathlib
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from typing import Any

#: Qwen1.5-4B (config.json of Qwen/Qwen1.5-4B-Chat), minus the weights.
QWEN15_4B_SHAPE: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 6912,
    "num_hidden_layers": 40,
    "num_attention_heads": 20,
    "num_key_value_heads": 20,
    "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0},
    "tie_word_embeddings": False,
}

#: `--small`: the same code path on CPU in seconds. Qwen's vocabulary (the vLLM leg serves it
#: with the Qwen tokenizer) and head_dim 32 (vLLM's CPU attention kernel needs at least that).
SMALL_SHAPE: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "tie_word_embeddings": False,
}

#: Peak memory bandwidth in TB/s by device-name substring (first match wins; most specific first).
BANDWIDTH_TBS: list[tuple[str, float]] = [
    ("GH200", 4.0),
    ("H200", 4.8),
    ("H100 NVL", 3.9),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 3.35),
    ("B200", 8.0),
    ("A100-SXM4-80GB", 2.039),
    ("A100 80GB PCIe", 1.935),
    ("A100", 1.555),
    ("L40S", 0.864),
    ("L4", 0.3),
    ("A10G", 0.6),
    ("A10", 0.6),
    ("RTX 4090", 1.008),
]

LEVELS = (1, 8, 32)
PROMPT_LEN = 32


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def bandwidth_for(device_name: str) -> float | None:
    for key, tbs in BANDWIDTH_TBS:
        if key.lower() in device_name.lower():
            return tbs
    return None


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the main thread after `seconds` (Unix; a no-op elsewhere)."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"section exceeded its {seconds:.0f} s time limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class NoTokenizer:
    """What `Engine` asks of a tokenizer (stop-token lookup) for a model without one: no stop tokens."""

    unk_token_id = -1
    eos_token_id = None

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.unk_token_id


# ---------------------------------------------------------------------------------------------
# Model


def build_model(shape: dict[str, Any], device: str, dtype: Any) -> Any:
    """Random-weight Qwen2ForCausalLM created directly on `device` in `dtype` (no CPU init, no copy)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created (and initialised) in dtype
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()  # float32 buffers (RoPE inverse frequencies) stay float32, as from_pretrained leaves them
    model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=0, bos_token_id=None, do_sample=False)
    return model


def weight_bytes_per_token(model: Any) -> tuple[int, int]:
    """(all parameter bytes, bytes a batch-1 decode step reads: all but the input embedding)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    return total, total - embed.numel() * embed.element_size()


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Sections


def bench_generate(model: Any, device: str, max_tokens: int, repeats: int, static: bool, small: bool) -> dict[str, Any]:
    """Batch-1 `generate`: exactly max_tokens new tokens (no stop token); best of `repeats` timed runs."""
    import torch
    from transformers import CompileConfig, GenerationConfig

    kwargs: dict[str, Any] = {}
    if static:
        kwargs["cache_implementation"] = "static"
        if small:  # CPU: force the compile path, with dynamo only (inductor's C++ build takes minutes)
            config = CompileConfig(backend="eager", mode=None)
            config._compile_all_devices = True
        else:
            config = CompileConfig(fullgraph=False, mode="reduce-overhead")
        kwargs["compile_config"] = config
    gen_config = GenerationConfig(
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, bos_token_id=None, **kwargs
    )
    generator = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, PROMPT_LEN), generator=generator).to(device)

    def run() -> float:
        synchronize(device)
        start = time.perf_counter()
        # generate() runs under no_grad itself; no inference_mode here (it adds guards to compiled graphs)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_config)
        synchronize(device)
        elapsed = time.perf_counter() - start
        made = out.shape[1] - ids.shape[1]
        if made != max_tokens:
            raise RuntimeError(f"generate made {made} tokens, expected {max_tokens}")
        return elapsed

    warmups = 3 if static else 1  # static: compile, then CUDA-graph recording, then steady state
    for i in range(warmups):
        t = run()
        log(f"    warm-up {i + 1}/{warmups}: {t:.2f} s")
    times = [run() for _ in range(repeats)]
    best = min(times)
    return {
        "batch": 1,
        "tokens": max_tokens,
        "seconds": best,
        "tokens_per_s": max_tokens / best,
        "step_ms": best / max_tokens * 1e3,
        "all_seconds": times,
        "compiled": bool(static and getattr(model, "_compiled_call", None) is not None),
        "note": f"end-to-end generate() time incl. prefill of a {PROMPT_LEN}-token prompt",
    }


async def _engine_level(engine: Any, concurrency: int, max_tokens: int, vocab: int, seed: int) -> dict[str, Any]:
    import random

    from server.engine.base import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(PROMPT_LEN)] for _ in range(concurrency)]
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)

    async def one(prompt: list[int]) -> tuple[int, float | None, list[float]]:
        count, first, stamps = 0, None, []
        start = time.perf_counter()
        async for step in engine.submit(prompt, params):
            now = time.perf_counter()
            if step.token_ids:
                if first is None:
                    first = now - start
                stamps.append(now)
            count += len(step.token_ids)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return count, first, gaps

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    elapsed = time.perf_counter() - start
    counts = [r[0] for r in results]
    if any(c != max_tokens for c in counts):
        raise RuntimeError(f"engine made {counts} tokens, expected {max_tokens} each")
    gaps = sorted(g for r in results for g in r[2])
    ttfts = sorted(r[1] for r in results if r[1] is not None)
    step = gaps[len(gaps) // 2] if gaps else math.nan
    return {
        "concurrency": concurrency,
        "tokens": sum(counts),
        "seconds": elapsed,
        "tokens_per_s": sum(counts) / elapsed,
        "per_sequence_tokens_per_s": max_tokens / elapsed,
        "step_ms": step * 1e3,  # median gap between a sequence's successive tokens
        "ttft_p50_ms": ttfts[len(ttfts) // 2] * 1e3 if ttfts else math.nan,
    }


async def _engine_levels(engine: Any, max_tokens: int, levels: tuple[int, ...], vocab: int, **extra: Any) -> list[dict[str, Any]]:
    """A warm-up, then each level in turn (the same prompts for either engine: seeded by level)."""
    await _engine_level(engine, 2, min(8, max_tokens), vocab, seed=99)
    rows = []
    for level in levels:
        row = {**await _engine_level(engine, level, max_tokens, vocab, seed=level), **extra}
        log(f"    {level:>2} sequences: {row['tokens_per_s']:.1f} tok/s, step {row['step_ms']:.1f} ms")
        rows.append(row)
    return rows


def bench_engine(model: Any, max_tokens: int, levels: tuple[int, ...]) -> list[dict[str, Any]]:
    """The server's continuous-batching engine, no HTTP: C sequences submitted at once, all awaited."""
    from server.engine.builtin import BuiltinEngine

    engine = BuiltinEngine(model, NoTokenizer(), max_running=max(levels), max_queued=max(levels))
    attention = model.config._attn_implementation
    log(f"    engine attention: {attention}, stop ids: {engine.stop_ids}")
    engine.start_manager()
    try:
        return asyncio.run(_engine_levels(engine, max_tokens, levels, model.config.vocab_size, attention=attention))
    finally:
        engine.stop_manager()


def bench_vllm_engine(
    model: Any, max_tokens: int, levels: tuple[int, ...], vllm_python: str, vllm_args: str, work_dir: pathlib.Path
) -> list[dict[str, Any]]:
    """The server's vLLM engine on the same weights: saved with the Qwen tokenizer, served by a
    vLLM child (its log: `work_dir/vllm.log`), driven without agent-server's HTTP layer."""
    from transformers import AutoTokenizer

    from server.engine.vllm import VLLMEngine
    from server.engine.vllm_process import VLLMProcess, cpu_env
    from server.qwen_tokenizer import build_qwen_tokenizer

    model_dir = work_dir / "model"
    model.save_pretrained(model_dir)  # safetensors in the model's dtype; no eos: every sequence runs to max_tokens
    build_qwen_tokenizer(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    on_cpu = model.device.type == "cpu"
    env = cpu_env(work_dir) if on_cpu else {}
    extra = " ".join(filter(None, ["--enforce-eager" if on_cpu else "", vllm_args]))
    utilization = 0.9
    if not on_cpu:  # this process still holds the model: vLLM may take most of what is free, not 90% of the card
        import torch

        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(model.device)
        utilization = round(min(0.9, 0.9 * free / total), 2)
    with open(work_dir / "vllm.log", "wb") as log_file:
        process = VLLMProcess(vllm_python, str(model_dir), max_model_len=PROMPT_LEN + max_tokens + 64,
                              gpu_memory_utilization=utilization, extra_args=extra, env=env, log_file=log_file)
        log(f"    {' '.join(process.cmd)}")
        process.start()
        try:
            url = process.wait_healthy(timeout=900)

            async def drive() -> list[dict[str, Any]]:
                engine = VLLMEngine(url, tokenizer, stop_ids=[], max_running=max(levels), max_queued=max(levels))
                await engine.start()
                try:
                    return await _engine_levels(engine, max_tokens, levels, model.config.vocab_size)
                finally:
                    await engine.stop()

            return asyncio.run(drive())
        finally:
            process.stop()


# ---------------------------------------------------------------------------------------------
# Driver


def fraction(bound_step_ms: float | None, step_ms: float) -> float | None:
    if bound_step_ms is None or not step_ms or math.isnan(step_ms):
        return None
    return bound_step_ms / step_ms


def print_table(results: dict[str, Any]) -> None:
    info = results.get("model", {})
    bound_ms = results.get("bound_step_ms")
    print()
    print(
        f"GPU benchmark: {results.get('device_name')}, {info.get('shape_name', 'no model')} shape, "
        f"{info.get('params', 0) / 1e6:,.1f}M params, {info.get('dtype')}, random weights, "
        f"{results.get('max_tokens')} new tokens per sequence, {PROMPT_LEN}-token prompts"
    )
    if bound_ms is not None:
        print(
            f"weights read per decode step: {info.get('decode_bytes', 0) / 1e9:.2f} GB; peak bandwidth "
            f"{results.get('bandwidth_tbs')} TB/s -> bound {bound_ms:.2f} ms/step = {1e3 / bound_ms:.0f} tok/s at batch 1"
        )
    else:
        print("peak bandwidth unknown for this device (pass --bandwidth-tbs): no bound")
    header = f"{'what':<46} {'seqs':>4} {'tok/s':>9} {'ms/step':>8} {'of bound':>8}"
    print(header)
    print("-" * len(header))

    def row(label: str, seqs: int, r: dict[str, Any] | None, error: str | None) -> None:
        if r is None:
            print(f"{label:<46} {seqs:>4} {'failed' if error else 'skipped':>9}   {error or ''}"[:140])
            return
        frac = fraction(bound_ms, r["step_ms"])
        frac_s = "-" if frac is None else f"{frac * 100:.0f}%"
        print(f"{label:<46} {seqs:>4} {r['tokens_per_s']:>9.1f} {r['step_ms']:>8.2f} {frac_s:>8}")

    sections = results["sections"]
    errors = results["errors"]
    row("generate, dynamic cache (eager)", 1, sections.get("generate_dynamic"), errors.get("generate_dynamic"))
    for name, label in (("engine", "built-in engine (continuous batching, no HTTP)"),
                        ("vllm_engine", "vLLM engine (vLLM over its HTTP API)")):
        if name == "vllm_engine" and name not in sections and name not in errors:
            continue  # not asked for (no --vllm-python)
        engine_rows = {r["concurrency"]: r for r in sections.get(name) or []}
        for level in LEVELS:
            row(label, level, engine_rows.get(level), errors.get(name))
    row("generate, static cache + torch.compile", 1, sections.get("generate_static_compiled"),
        errors.get("generate_static_compiled"))
    print("ms/step: batch 1 rows: generate time / tokens; engine rows: median gap between a sequence's tokens.")
    print("of bound: bandwidth-bound step time / measured step time (weights are read once per step at any batch).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write the results here as JSON (rewritten after every section)")
    parser.add_argument("--small", action="store_true", help="tiny shape on CPU (float32): tests the code path")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --small)")
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens per sequence (default 256; 8 with --small)")
    parser.add_argument("--engine-tokens", type=int, default=None, help="new tokens per engine sequence (default 128; 8 with --small)")
    parser.add_argument("--repeats", type=int, default=2, help="timed generate() runs per section, best kept (default 2)")
    parser.add_argument("--bandwidth-tbs", type=float, default=None, help="peak memory bandwidth, TB/s (default: by device name)")
    parser.add_argument("--budget-s", type=float, default=420, help="overall time budget in seconds (default 420)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: generate_dynamic,engine,vllm_engine,generate_static_compiled")
    parser.add_argument("--vllm-python", help="a Python with vLLM: adds the vLLM engine section (default: not run)")
    parser.add_argument("--vllm-args", default="", help="extra flags for the vLLM child (e.g. '--max-num-seqs 64')")
    parser.add_argument("--work-dir", help="where the vLLM section saves the model (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    import torch

    small = args.small
    device = args.device or ("cpu" if small else "cuda")
    if device == "cpu":
        torch.set_num_threads(1)  # tiny shapes: threads only add OpenMP sync cost (and stalls on a busy box)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    max_tokens = args.max_tokens or (8 if small else 256)
    engine_tokens = args.engine_tokens or (8 if small else 128)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available (use --small for the CPU smoke run)", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()})"
    bandwidth = args.bandwidth_tbs or (bandwidth_for(device_name) if device.startswith("cuda") else None)
    results: dict[str, Any] = {
        "device": device,
        "device_name": device_name,
        "bandwidth_tbs": bandwidth,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "max_tokens": max_tokens,
        "engine_tokens": engine_tokens,
        "prompt_tokens": PROMPT_LEN,
        "sections": {},
        "errors": {},
        "seconds": {},
    }

    def save() -> None:
        results["total_seconds"] = time.perf_counter() - started
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")

    def remaining() -> float:
        return args.budget_s - (time.perf_counter() - started)

    def section(name: str, fn: Any, min_left: float = 20, store: bool = True) -> Any:
        if name in skip:
            log(f"{name}: skipped (--skip)")
            return None
        if remaining() < min_left:
            results["errors"][name] = f"skipped: {remaining():.0f} s of the budget left"
            log(f"{name}: skipped, {remaining():.0f} s of the {args.budget_s:.0f} s budget left")
            save()
            return None
        log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            with time_limit(max(remaining() - 5, 1)):
                value = fn()
            if store:
                results["sections"][name] = value
            return value
        except BaseException as exc:  # noqa: BLE001 - report and go on (KeyboardInterrupt too: keep partial results)
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            sys.stdout.flush()
            if isinstance(exc, KeyboardInterrupt):
                raise
            return None
        finally:
            results["seconds"][name] = time.perf_counter() - t0
            if device.startswith("cuda"):
                results.setdefault("peak_memory_gb", {})[name] = torch.cuda.max_memory_allocated() / 1e9
            save()

    log(f"device: {device_name}; torch {torch.__version__}; bandwidth {bandwidth} TB/s; budget {args.budget_s:.0f} s")
    shape = SMALL_SHAPE if small else QWEN15_4B_SHAPE
    model = section("init", lambda: build_model(shape, device, dtype), min_left=0, store=False)
    if model is None:
        print_table(results)
        return 1
    total, decode = weight_bytes_per_token(model)
    results["model"] = {
        "shape_name": "tiny (--small)" if small else "Qwen1.5-4B",
        "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": total,
        "decode_bytes": decode,
    }
    results["bound_step_ms"] = decode / (bandwidth * 1e12) * 1e3 if bandwidth else None
    log(f"  model: {results['model']['params'] / 1e9:.3f}B params, {total / 1e9:.2f} GB, built in {results['seconds']['init']:.1f} s")
    save()

    section("generate_dynamic", lambda: bench_generate(model, device, max_tokens, args.repeats, False, small))
    section("engine", lambda: bench_engine(model, engine_tokens, LEVELS))
    if args.vllm_python:
        with contextlib.ExitStack() as stack:
            work_dir = pathlib.Path(args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-bench-")))
            section("vllm_engine", lambda: bench_vllm_engine(model, engine_tokens, LEVELS, args.vllm_python, args.vllm_args, work_dir))
    section(
        "generate_static_compiled",
        lambda: bench_generate(model, device, max_tokens, args.repeats, True, small),
        min_left=60 if not small else 5,
    )
    print_table(results)
    if args.out:
        log(f"wrote {args.out}")
    return 0 if not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
