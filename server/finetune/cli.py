"""`agent-server finetune`: LLaMA-Factory v0.6.3's SFT flags, dashes for underscores."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import typing
from dataclasses import MISSING, fields

from server.finetune.data import DataError
from server.finetune.train import FinetuneConfig, finetune

_HELP = {
    "model": "base model directory (or hub id), e.g. Qwen1.5-4B",
    "dataset": "training files, comma-separated: sharegpt with tools or alpaca(+history), JSON or JSON Lines",
    "output_dir": "where the adapter (lora) or model (full), checkpoints and logs go",
    "finetuning_type": "lora: an adapter for `serve --adapter` / `merge`; full: a whole model",
    "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA scale (default: 2 x rank)",
    "lora_dropout": "dropout on the LoRA input",
    "lora_target": "`all` (every linear layer but the output head) or module names, comma-separated",
    "additional_target": "modules trained whole next to LoRA and saved with the adapter, comma-separated (e.g. norm)",
    "cutoff_len": "ids per row at most, shared out turn by turn as v0.6.3 did",
    "max_samples": "use the first N rows of each file",
    "learning_rate": "peak learning rate (AdamW)",
    "num_train_epochs": "epochs",
    "max_steps": "optimizer steps; overrides epochs when > 0",
    "per_device_train_batch_size": "rows per device per step",
    "gradient_accumulation_steps": "batches per optimizer step",
    "lr_scheduler_type": "transformers scheduler name: cosine, linear, constant, ...",
    "max_grad_norm": "gradient clipping norm (0: off)",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay",
    "logging_steps": "log the loss every N steps",
    "save_steps": "checkpoint every N steps (0: none); a rerun resumes from the last one",
    "seed": "seed for initialisation and data order",
    "bf16": "bfloat16 autocast (trainable weights stay float32)",
    "fp16": "float16 autocast with loss scaling (trainable weights stay float32)",
    "plot_loss": "write training_loss.png in the output directory",
    "overwrite_output_dir": "start over in a non-empty output directory instead of resuming",
    "disable_tqdm": "no progress bar",
}


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `finetune`: one flag per `FinetuneConfig` field."""
    parser = sub.add_parser(
        "finetune",
        help="fine-tune a model on tool-call/chat data, rendered exactly as the server serves it",
        description=__doc__,
    )
    hints = typing.get_type_hints(FinetuneConfig)
    for f in fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        required = f.default is MISSING and f.default_factory is MISSING
        default = f.default_factory() if f.default_factory is not MISSING else None if required else f.default
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=_HELP[f.name])
            continue
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = _HELP[f.name] + ("" if default is None else f" (default: {shown})")
        args = typing.get_args(kind)
        if typing.get_origin(kind) is typing.Literal:
            parser.add_argument(flag, choices=args, default=default, help=help_text)
        elif list[str] in (kind, *args):
            parser.add_argument(flag, type=_csv, default=default, required=required, help=help_text)
        else:
            scalar = next((a for a in args if a is not type(None)), kind)
            parser.add_argument(flag, type=scalar, default=default, required=required, help=help_text)


def run(args: argparse.Namespace) -> None:
    """Train; errors in the data or the arguments end the command with a message, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    if config.bf16 and config.fp16:
        sys.exit("agent-server finetune: pass --bf16 or --fp16, not both")
    if config.plot_loss and importlib.util.find_spec("matplotlib") is None:  # fail before, not after, training
        sys.exit("agent-server finetune: --plot-loss needs matplotlib: pip install 'agent-server[finetune]'")
    try:
        metrics = finetune(config)
    except (DataError, FileExistsError) as exc:
        sys.exit(f"agent-server finetune: {exc}")
    kind = "adapter" if config.finetuning_type == "lora" else "model"
    print(
        f"saved the {kind} in {config.output_dir}: {metrics['train_runtime']:.1f} s, "
        f"{metrics['train_tokens_per_second']:.0f} tokens/s, final loss {metrics['train_loss']:.4f}"
    )
