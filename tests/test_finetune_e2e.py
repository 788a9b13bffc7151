"""Train/serve parity end to end: `agent-server finetune` a tiny model on a few rows, serve the result,
and get every trained call and answer back through the openai SDK (greedy decoding).

Full fine-tuning starts from the random tiny model. LoRA starts from the demo model: with the output
head frozen (and tied to the embeddings) a *random* model's logits cannot exceed ~1.3, so LoRA alone
cannot make it learn anything in seconds; a trained base is also the case LoRA is for.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import openai
import pytest

from server.demo import WEATHER_TOOLS
from server.finetune.data import Chat, read_datasets

WEATHER = [tool["function"] for tool in WEATHER_TOOLS]  # sharegpt keeps the bare function objects


def sharegpt(question: str, city: str, observation: str, answer: str) -> dict:
    call = json.dumps({"name": "get_weather", "arguments": {"city": city}}, ensure_ascii=False)
    return {
        "conversations": [
            {"from": "human", "value": question},
            {"from": "function_call", "value": call},
            {"from": "observation", "value": observation},
            {"from": "gpt", "value": answer},
        ],
        "tools": json.dumps(WEATHER),
    }


def write_data(directory: pathlib.Path, tool_rows: list[dict], alpaca_row: dict) -> list[pathlib.Path]:
    directory.mkdir(parents=True, exist_ok=True)
    tools, alpaca = directory / "tools.json", directory / "alpaca.jsonl"
    tools.write_text(json.dumps(tool_rows, ensure_ascii=False), encoding="utf-8")
    alpaca.write_text(json.dumps(alpaca_row, ensure_ascii=False) + "\n", encoding="utf-8")
    return [tools, alpaca]


def run_finetune(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "server", "finetune", *args],
        capture_output=True, text=True, encoding="utf-8", timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def trained_turns(paths: list[pathlib.Path]) -> list[tuple[Chat, int]]:
    """(chat, index of an assistant message) for every trained answer in the files."""
    return [
        (chat, i)
        for dataset in read_datasets(paths)
        for chat in dataset.chats
        for i, message in enumerate(chat.messages)
        if message["role"] == "assistant"
    ]


def assert_serves_every_trained_turn(server, paths: list[pathlib.Path]) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    turns = trained_turns(paths)
    assert len(turns) >= 5
    for chat, index in turns:
        request = {"messages": chat.messages[:index], "temperature": 0, "max_tokens": 64}
        if chat.tools:
            request["tools"] = chat.tools
        choice = client.chat.completions.create(model="Qwen1.5-4B-agent", **request).choices[0]
        expected = chat.messages[index]
        if expected.get("tool_calls"):
            assert choice.finish_reason == "tool_calls", (chat.source, choice.message)
            got = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
            want = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in expected["tool_calls"]]
            assert got == want, chat.source
        else:
            assert (choice.finish_reason, choice.message.content) == ("stop", expected["content"]), chat.source


# ---------------------------------------------------------------------------------------------
# Full fine-tuning from the random model

FULL_ROWS = [
    sharegpt("Weather in Paris?", "Paris", '{"temp": 18}', "It is 18C in Paris."),
    sharegpt("北京天气怎么样?", "北京", '{"temp": 25}', "北京现在25度。"),
]
FULL_ALPACA = {"instruction": "Say hi.", "input": "", "output": "Hello there!"}


@pytest.fixture(scope="module")
def full_model(tmp_path_factory, tiny_model_dir) -> tuple[pathlib.Path, list[pathlib.Path], str]:
    work = tmp_path_factory.mktemp("finetune_full")
    paths = write_data(work / "data", FULL_ROWS, FULL_ALPACA)
    out = work / "model"
    result = run_finetune(
        "--model", str(tiny_model_dir), "--dataset", ",".join(map(str, paths)), "--output-dir", str(out),
        "--finetuning-type", "full", "--learning-rate", "7e-3", "--lr-scheduler-type", "constant",
        "--num-train-epochs", "60", "--per-device-train-batch-size", "3", "--gradient-accumulation-steps", "1",
        "--max-grad-norm", "0", "--logging-steps", "10", "--save-steps", "0", "--plot-loss",
    )  # fmt: skip
    return out, paths, result.stdout + result.stderr


def test_full_finetune_writes_a_servable_model_and_a_loss_curve(full_model):
    out, _, log = full_model
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "trainer_state.json"):
        assert (out / name).is_file(), name
    assert (out / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tokens/s" in log and "'loss'" in log
    history = json.loads((out / "trainer_state.json").read_text("utf-8"))["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0] / 10


@pytest.mark.parametrize("engine", ["builtin", "vllm"])
def test_full_finetune_is_served_with_every_trained_call_and_answer(full_model, start_server, engine, request):
    out, paths, _ = full_model
    args, env = ["--model", str(out)], None
    if engine == "vllm":  # train/serve parity on vLLM too: the fine-tuned model in a vLLM of its own
        args += ["--engine", "vllm", "--vllm-python", request.getfixturevalue("vllm_python"),
                 "--vllm-args", "--enforce-eager --max-num-seqs 8"]
        env = request.getfixturevalue("vllm_env")
    server = start_server(*args, env=env)
    try:
        assert_serves_every_trained_turn(server, paths)
    finally:
        server.stop()  # and its vLLM child: one vLLM at a time besides the session's


# ---------------------------------------------------------------------------------------------
# LoRA on a trained base: `serve --adapter`, and `merge` then `serve --model`

# New questions in the words the demo model knows: its tied output embeddings give a token it never
# produced too small a logit for a rank-16 adapter to lift in seconds.
LORA_ROWS = [
    sharegpt("Is it sunny in Tokyo?", "Tokyo", "18C, sunny", "It is 18C and sunny in Tokyo."),
    sharegpt("How warm is Paris?", "Paris", "18C, sunny", "It is 18C and sunny in Paris."),
]
LORA_ALPACA = {"instruction": "Greet me.", "input": "", "output": "Hello! How can I help you today?"}


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, trained_model_dir) -> tuple[pathlib.Path, list[pathlib.Path]]:
    work = tmp_path_factory.mktemp("finetune_lora")
    paths = write_data(work / "data", LORA_ROWS, LORA_ALPACA)
    out = work / "adapter"
    run_finetune(
        "--model", str(trained_model_dir), "--dataset", ",".join(map(str, paths)), "--output-dir", str(out),
        "--finetuning-type", "lora", "--lora-target", "all", "--lora-rank", "16", "--lora-dropout", "0",
        "--learning-rate", "1e-2", "--lr-scheduler-type", "constant", "--num-train-epochs", "80",
        "--per-device-train-batch-size", "3", "--gradient-accumulation-steps", "1", "--max-grad-norm", "0",
        "--logging-steps", "10", "--save-steps", "0", "--disable-tqdm",
    )  # fmt: skip
    return out, paths


def test_lora_writes_an_adapter_on_every_linear_layer(lora_adapter):
    out, _ = lora_adapter
    config = json.loads((out / "adapter_config.json").read_text("utf-8"))
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"]) == (16, 32)
    assert not (out / "model.safetensors").exists()


def test_lora_adapter_is_served_with_every_trained_call_and_answer(lora_adapter, trained_model_dir, start_server, trained_server):
    out, paths = lora_adapter
    with pytest.raises(AssertionError):  # the base model alone does not give them: the adapter does
        assert_serves_every_trained_turn(trained_server, paths)
    assert_serves_every_trained_turn(start_server("--model", str(trained_model_dir), "--adapter", str(out)), paths)


def test_merged_lora_is_served_with_every_trained_call_and_answer(lora_adapter, trained_model_dir, start_server, tmp_path):
    out, paths = lora_adapter
    merged = tmp_path / "merged"
    subprocess.run(
        [sys.executable, "-m", "server", "merge", "--base", str(trained_model_dir), "--adapter", str(out), "--out", str(merged)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert_serves_every_trained_turn(start_server("--model", str(merged)), paths)
