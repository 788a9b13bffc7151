"""Smoke tests for the benchmarks: they run end to end with minimal settings and print their tables.

No timing is asserted (this runs on shared CI machines); only that each benchmark completes, checks
what it promises to check (exact token counts) and reports.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    return proc


def test_serving_benchmark_runs(tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "serving.json"
    proc = _run(
        [
            "benchmarks.serving", "--model", str(tiny_model_dir), "--concurrency", "1,2", "--requests-per-level", "2",
            "--max-tokens", "8", "--raw-seconds", "0", "--raw-repeats", "1", "--json", str(out),
        ],
        timeout=300,
    )
    stdout = proc.stdout
    assert "TTFT p50" in stdout and "ITL p95" in stdout
    assert "batching / one-at-a-time at concurrency  2" in stdout
    assert "batching at concurrency 1 / raw generate" in stdout
    results = json.loads(out.read_text())
    rows = {(r["mode"], r["concurrency"]): r for r in results["levels"]}
    assert set(rows) == {(m, c) for m in ("batching", "one-at-a-time") for c in (1, 2)}
    for row in rows.values():
        assert row["completed"] == row["requests"] == 2
        assert row["tokens"] == 16  # exactly max_tokens per request, verified against usage
        assert row["tokens_per_s"] > 0
    assert results["problems"] == []
    assert results["raw"][0]["tokens_per_s"] > 0


def test_serving_benchmark_vllm_legs(vllm_server, trained_model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """agent-server over vLLM and vLLM's own /v1/completions, on the session's vLLM (no extra start-up)."""
    out = tmp_path / "serving.json"
    proc = _run(
        [
            "benchmarks.serving", "--model", str(trained_model_dir), "--vllm-url", vllm_server.url,
            # The demo model's shortest greedy answer to the benchmark prompts is 3 tokens: 2 never stop early.
            "--modes", "over-vllm,vllm", "--concurrency", "1,2", "--requests-per-level", "2", "--max-tokens", "2",
            "--json", str(out),
        ],
        timeout=300,
    )
    assert "agent-server over vLLM / vLLM's own /v1/completions at concurrency  2" in proc.stdout
    results = json.loads(out.read_text())
    rows = {(r["mode"], r["concurrency"]): r for r in results["levels"]}
    assert set(rows) == {(m, c) for m in ("over-vllm", "vllm") for c in (1, 2)}
    for row in rows.values():
        assert row["completed"] == row["requests"] == 2 and row["tokens"] == 4
    assert results["problems"] == [] and results["ratios"]["over-vllm/vllm@2"] > 0


def test_serving_benchmark_fails_loudly_on_short_answers() -> None:
    """A request that stops before max_tokens must fail the run, not count as a fast one."""
    from benchmarks.serving import RequestResult, check_lengths

    ok = RequestResult(ok=True, completion_tokens=8, finish_reason="length")
    short = RequestResult(ok=True, completion_tokens=5, finish_reason="stop")
    missing_usage = RequestResult(ok=True, completion_tokens=None, finish_reason="length")
    failed = RequestResult(ok=False, error="HTTP 429: busy")
    assert check_lengths([ok], 8) == []
    problems = check_lengths([ok, short, missing_usage, failed], 8)
    assert len(problems) == 3 and "HTTP 429" in problems[2]


def test_percentile() -> None:
    import math

    from benchmarks.serving import percentile

    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 95) == 1.95
    assert math.isnan(percentile([], 50))


def test_gpu_benchmark_small_runs_on_cpu(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "gpu.json"
    proc = _run(["benchmarks.gpu", "--small", "--out", str(out)], timeout=300)
    assert "generate, dynamic cache (eager)" in proc.stdout
    assert "generate, static cache + torch.compile" in proc.stdout
    results = json.loads(out.read_text())
    assert results["errors"] == {}
    sections = results["sections"]
    assert sections["generate_dynamic"]["tokens_per_s"] > 0
    assert sections["generate_static_compiled"]["tokens_per_s"] > 0
    assert [r["concurrency"] for r in sections["engine"]] == [1, 8, 32]
    assert all(r["tokens"] == r["concurrency"] * results["engine_tokens"] for r in sections["engine"])


def test_gpu_benchmark_vllm_engine_section_on_cpu(vllm_python: str, tmp_path: pathlib.Path) -> None:
    """The vLLM section's code path with the --small weights on vLLM's CPU build (its own short-lived child)."""
    out = tmp_path / "gpu.json"
    proc = _run(["benchmarks.gpu", "--small", "--skip", "generate_dynamic,generate_static_compiled",
                 "--vllm-python", vllm_python, "--work-dir", str(tmp_path), "--out", str(out)], timeout=900)
    results = json.loads(out.read_text())
    assert results["errors"] == {}, results["errors"]
    rows = {name: results["sections"][name] for name in ("engine", "vllm_engine")}
    for name, section in rows.items():
        assert [r["concurrency"] for r in section] == [1, 8, 32], name
        assert all(r["tokens"] == r["concurrency"] * results["engine_tokens"] for r in section), name
    assert "vLLM engine (vLLM over its HTTP API)" in proc.stdout
    assert (tmp_path / "model" / "tokenizer.json").exists()


def test_gpu_bandwidth_lookup() -> None:
    from benchmarks.gpu import bandwidth_for

    assert bandwidth_for("NVIDIA H100 80GB HBM3") == 3.35
    assert bandwidth_for("NVIDIA H200") == 4.8
    assert bandwidth_for("NVIDIA H100 PCIe") == 2.0
    assert bandwidth_for("NVIDIA GH200 480GB") == 4.0
    assert bandwidth_for("Some Future GPU") is None


def test_grammar_benchmark_runs(tiny_model_dir: pathlib.Path) -> None:
    proc = _run(["benchmarks.grammar", "--model", str(tiny_model_dir), "--concurrency", "2", "--requests", "2",
                 "--max-tokens", "8"], timeout=300)
    assert "ms/token grammar" in proc.stdout and "tokenizer set-up" in proc.stdout


def test_grammar_benchmark_runs_on_vllm(vllm_server, trained_model_dir: pathlib.Path) -> None:
    proc = _run(["benchmarks.grammar", "--model", str(trained_model_dir), "--vllm-url", vllm_server.url,
                 "--concurrency", "2", "--requests", "2", "--max-tokens", "8"], timeout=300)
    assert "engine: vllm" in proc.stdout and "ms/token grammar" in proc.stdout, proc.stdout + proc.stderr
