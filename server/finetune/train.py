"""Supervised fine-tuning with transformers' `Trainer` and peft, with LLaMA-Factory v0.6.3's knobs.

What v0.6.3's `--stage sft` did, kept: LoRA on every linear layer but the output head (`--lora-target
all`) or full fine-tuning; trainable parameters in float32 with `--bf16` / `--fp16` autocast; right
padding to a multiple of 8 with labels padded by -100 (`DataCollatorForSeq2Seq`); checkpoints every
`--save-steps`, training resumed from the last checkpoint in the output directory; a loss curve
`training_loss.png` with `--plot-loss`. What is ours: the ids come from the serving renderer
(:mod:`server.finetune.preprocess`), and the loss projects to the vocabulary only where a label is
trained, so the 151,936-wide logits of every prompt position are never built.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
    set_seed,
)

from prompts import load_format
from server.finetune.data import DataError, read_datasets
from server.finetune.preprocess import IGNORE_INDEX, Example, encode_chats
from server.format.render import PromptEncoder

__all__ = ["FinetuneConfig", "SFTTrainer", "answer_logits", "build_trainer", "finetune", "load_examples", "plot_loss"]

logger = logging.getLogger(__name__)

#: Bad rows listed one per line in the log before the rest are only counted.
_BAD_ROWS_SHOWN = 20


@dataclass
class FinetuneConfig:
    """One training run; field `x_y` is CLI flag `--x-y` (LLaMA-Factory's `--x_y`), defaults are v0.6.3's
    or the seed's."""

    model: str
    dataset: list[str]
    output_dir: str
    finetuning_type: Literal["lora", "full"] = "lora"
    lora_rank: int = 8
    lora_alpha: int | None = None  # v0.6.3: 2 x lora_rank
    lora_dropout: float = 0.1
    lora_target: list[str] = field(default_factory=lambda: ["all"])
    additional_target: list[str] | None = None  # peft modules_to_save: trained whole, saved with the adapter
    cutoff_len: int = 1024
    max_samples: int | None = None
    learning_rate: float = 5e-5
    num_train_epochs: float = 2.0
    max_steps: int = -1
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    logging_steps: int = 10
    save_steps: int = 500  # 0: no checkpoints
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    plot_loss: bool = False
    overwrite_output_dir: bool = False
    disable_tqdm: bool = False


def load_examples(config: FinetuneConfig, tokenizer: Any) -> list[Example]:
    """Read, render and cut every file; bad rows are logged with file and row, a file left with no
    usable row is an error (:class:`server.finetune.data.DataError`)."""
    fmt = load_format()
    encoder = PromptEncoder.from_tokenizer(tokenizer)
    examples: list[Example] = []
    for dataset in read_datasets(config.dataset, config.max_samples):
        encoded, unrenderable = encode_chats(dataset.chats, fmt, encoder, config.cutoff_len)
        bad = dataset.bad_rows + unrenderable
        if not encoded:
            raise DataError(f"{dataset.path}: no usable row ({len(bad)} bad; first: {bad[0]})")
        for row in bad[:_BAD_ROWS_SHOWN]:
            logger.warning("skipped %s", row)
        if len(bad) > _BAD_ROWS_SHOWN:
            logger.warning("skipped %d more bad rows in %s", len(bad) - _BAD_ROWS_SHOWN, dataset.path)
        logger.info("%s: %s, %d rows used, %d skipped", dataset.path, dataset.format, len(encoded), len(bad))
        examples += encoded
    return examples


def answer_logits(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, target ids) at the positions whose next token is trained, from a causal LM or a peft
    model around one. The decoder runs on the whole batch; the output head only on those positions."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.get_decoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    targets = inputs["labels"][:, 1:]
    rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    logits = lm.get_output_embeddings()(hidden[rows, positions]).float()
    return logits, targets[rows, positions]


class SFTTrainer(Trainer):
    """`Trainer` whose causal-LM loss builds logits only where labels are trained.

    Same value as the model's own loss (mean cross-entropy over trained tokens, summed and divided
    by `num_items_in_batch` under gradient accumulation); with several processes the wrapped model's
    own forward is used so that distributed gradient hooks run.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        if return_outputs or self.accelerator.num_processes > 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        logits, targets = answer_logits(model, inputs)
        if num_items_in_batch is None:
            return torch.nn.functional.cross_entropy(logits, targets)
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        return loss / torch.as_tensor(num_items_in_batch, device=loss.device)


def _lora_targets(model: Any, targets: Sequence[str]) -> list[str]:
    """`all` = the names of every linear layer except the output head (v0.6.3's `find_all_linear_modules`)."""
    if list(targets) != ["all"]:
        return list(targets)
    head = model.get_output_embeddings()
    return sorted(
        {
            name.split(".")[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )


def _load_model(config: FinetuneConfig) -> Any:
    dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)
    if config.finetuning_type == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=config.lora_rank,
            lora_alpha=config.lora_alpha or 2 * config.lora_rank,
            lora_dropout=config.lora_dropout,
            target_modules=_lora_targets(model, config.lora_target),
            modules_to_save=config.additional_target,
        )
        model = get_peft_model(model, lora)
    elif config.finetuning_type != "full":
        raise ValueError(f"finetuning_type must be lora or full, not {config.finetuning_type!r}")
    for param in model.parameters():  # v0.6.3: trainable weights in float32, autocast does the rest
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
    return model


def _last_checkpoint(config: FinetuneConfig) -> str | None:
    """The checkpoint to resume from, or None to start; refuses to overwrite a finished run."""
    from transformers.trainer_utils import get_last_checkpoint

    out = pathlib.Path(config.output_dir)
    if config.overwrite_output_dir or not out.is_dir():
        return None
    last = get_last_checkpoint(str(out))
    if last is None and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite-output-dir to train into it anyway")
    return last


def build_trainer(
    config: FinetuneConfig, examples: Sequence[Example] | None = None, callbacks: Sequence[Any] = ()
) -> Any:
    """The `Trainer` for `config`: model (LoRA or full), tokenizer, arguments, and the rendered rows of
    `config.dataset` (or `examples`, already encoded, e.g. the demo model's built-in chats)."""
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    if examples is None:
        examples = load_examples(config, tokenizer)
    set_seed(config.seed)  # before the model: LoRA's initial weights come from this seed too
    model = _load_model(config)
    args = TrainingArguments(
        output_dir=config.output_dir,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        max_grad_norm=config.max_grad_norm,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps > 0 else "no",
        save_steps=max(config.save_steps, 1),
        seed=config.seed,
        bf16=config.bf16,
        fp16=config.fp16,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=config.disable_tqdm,
        use_cpu=not torch.cuda.is_available(),
    )
    collator = DataCollatorForSeq2Seq(tokenizer=tokenizer, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX)
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in examples]
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def finetune(config: FinetuneConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train, save the model (LoRA adapter or full weights) and tokenizer in `output_dir`; returns the
    train metrics (runtime, loss, tokens per second)."""
    resume = _last_checkpoint(config)
    trainer = build_trainer(config, callbacks=callbacks)
    if resume:
        logger.info("resuming from %s", resume)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    out = pathlib.Path(config.output_dir)
    trainer.save_model()
    metrics = dict(result.metrics)
    epochs = trainer.state.epoch or 0.0
    metrics["train_tokens"] = int(sum(len(row["input_ids"]) for row in trainer.train_dataset) * epochs)
    metrics["train_tokens_per_second"] = round(metrics["train_tokens"] / seconds, 1) if seconds > 0 else 0.0
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if config.plot_loss:
        plot_loss(out)
    return metrics


def _smooth(values: Sequence[float]) -> list[float]:
    """TensorBoard's EMA with LLaMA-Factory's length-dependent weight."""
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    smoothed, last = [], values[0]
    for value in values:
        last = last * weight + (1 - weight) * value
        smoothed.append(last)
    return smoothed


def plot_loss(output_dir: str | os.PathLike[str], key: str = "loss") -> pathlib.Path | None:
    """`training_loss.png` from `trainer_state.json`, drawn as LLaMA-Factory's `plot_loss` draws it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(output_dir)
    history = json.loads((out / "trainer_state.json").read_text("utf-8"))["log_history"]
    points = [(entry["step"], entry[key]) for entry in history if key in entry]
    if not points:
        logger.warning("no %s was logged: no loss curve (raise the step count or lower --logging-steps)", key)
        return None
    steps, values = zip(*points)
    figure = plt.figure()
    plt.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
    plt.plot(steps, _smooth(values), color="#1f77b4", label="smoothed")
    plt.title(f"training {key} of {out}")
    plt.xlabel("step")
    plt.ylabel(key)
    plt.legend()
    path = out / f"training_{key}.png"
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
    logger.info("loss curve saved at %s", path)
    return path
