"""The training path's own pieces: loss equal to the model's, LoRA targets, resume, CLI errors."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from server.finetune.preprocess import IGNORE_INDEX
from server.finetune.train import _lora_targets, answer_logits


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 151000, (2, 24), generator=generator)
    labels = input_ids.clone()
    labels[0, :10] = IGNORE_INDEX
    labels[1, :4] = IGNORE_INDEX
    labels[1, 16:] = IGNORE_INDEX  # right padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 16:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_answer_logits_give_the_models_own_loss(model):
    inputs = batch()
    with torch.no_grad():
        logits, targets = answer_logits(model, inputs)
        expected = model(**inputs).loss
    assert targets.numel() == 14 + 12
    assert torch.allclose(torch.nn.functional.cross_entropy(logits, targets), expected, atol=1e-5)


def test_answer_logits_through_a_peft_model(model):
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    inputs = batch()
    with torch.no_grad():
        logits, targets = answer_logits(peft_model, inputs)
        expected = peft_model(**inputs).loss
    assert torch.allclose(torch.nn.functional.cross_entropy(logits, targets), expected, atol=1e-5)
    peft_model.unload()


def test_lora_target_all_is_every_linear_layer_but_the_head(model):
    assert _lora_targets(model, ["all"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert _lora_targets(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]


# ---------------------------------------------------------------------------------------------
# The command


def finetune_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", "finetune", *args], capture_output=True, text=True, encoding="utf-8", timeout=600
    )


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("alpaca") / "a.json"
    path.write_text(json.dumps([{"instruction": f"Count to {n}.", "output": " ".join(map(str, range(1, n + 1)))} for n in range(1, 5)]))
    return path


def test_training_resumes_from_the_last_checkpoint(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--dataset", str(alpaca_file), "--output-dir", str(out), "--save-steps", "1",
              "--per-device-train-batch-size", "1", "--gradient-accumulation-steps", "1", "--logging-steps", "1"]  # fmt: skip
    first = finetune_cli(*common, "--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    second = finetune_cli(*common, "--max-steps", "3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in second.stderr
    state = json.loads((out / "trainer_state.json").read_text("utf-8"))
    assert state["global_step"] == 3
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]


def test_a_finished_run_is_not_overwritten_silently(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    result = finetune_cli("--model", str(tiny_model_dir), "--dataset", str(alpaca_file), "--output-dir", str(out))
    assert result.returncode == 1
    assert "exists and is not empty: pass --overwrite-output-dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_data_ends_with_the_file_and_row(tiny_model_dir, alpaca_file, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "no question"}, {"from": "human", "value": "?"}]}]))
    result = finetune_cli("--model", str(tiny_model_dir), "--dataset", f"{alpaca_file},{bad}", "--output-dir", str(tmp_path / "o"))
    assert result.returncode == 1
    assert f"{bad}: no usable row (1 bad; first: {bad}[0]: conversations turn 0: expected human or observation" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_rows_are_skipped_and_listed(tiny_model_dir, alpaca_file, tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', encoding="utf-8")
    result = finetune_cli("--model", str(tiny_model_dir), "--dataset", str(mixed), "--output-dir", str(tmp_path / "o"),
                          "--max-steps", "1", "--save-steps", "0", "--disable-tqdm")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped {mixed}:2: output must be a string" in result.stderr
    assert f"{mixed}: alpaca, 1 rows used, 1 skipped" in result.stderr
