"""Chats -> `input_ids` + `labels`, as LLaMA-Factory v0.6.3's `preprocess_supervised_dataset`.

The ids come from the server's own renderer (:func:`server.format.render.render_training_turns`), so
a model is trained on exactly the prompt ids it is later served with. Everything else is v0.6.3's
supervised preprocessing for `--template qwen`:

* one (prompt, answer) pair per assistant turn; every answer is trained, every prompt is masked
  with -100 (`train_on_prompt` off; qwen has no `efficient_eos`);
* `cutoff_len` is shared out turn by turn with v0.6.3's `infer_max_len` (each turn's budget split in
  proportion to prompt and answer lengths, at least `reserved_label_len` ids for the answer), and
  turns after the budget is spent are dropped.

The one intended difference: the renderer, not v0.6.3's template code, decides tool text and control
tokens (v0.6.3 dropped the whole tool list for, e.g., a numeric enum and made `<|im_end|>` typed in
content a control token; the server does neither, so training does neither).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prompts import PromptFormat
from server.finetune.data import BadRow, Chat
from server.format.render import PromptEncoder, RenderError, render_training_turns

__all__ = ["IGNORE_INDEX", "Example", "encode_chat", "encode_chats", "infer_max_len", "make_pairs"]

#: Label of a position that is not trained (PyTorch's cross-entropy `ignore_index`).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One training row: ids to feed and their labels (same length)."""

    input_ids: list[int]
    labels: list[int]
    source: str


def infer_max_len(source_len: int, target_len: int, max_len: int, reserved_label_len: int) -> tuple[int, int]:
    """v0.6.3's split of a turn's budget `max_len` into (max prompt ids, max answer ids)."""
    max_target_len = int(max_len * (target_len / (source_len + target_len)))
    max_target_len = max(max_target_len, reserved_label_len)
    max_source_len = max_len - min(max_target_len, target_len)
    return max_source_len, max_target_len


def make_pairs(
    turns: Sequence[tuple[list[int], list[int]]], cutoff_len: int, reserved_label_len: int = 1
) -> list[tuple[list[int], list[int]]]:
    """v0.6.3's `Template._make_pairs`: cut (prompt, answer) pairs to fit `cutoff_len` ids in all."""
    pairs = []
    total = 0
    for source, target in turns:
        if total >= cutoff_len:
            break
        max_source, max_target = infer_max_len(len(source), len(target), cutoff_len - total, reserved_label_len)
        source, target = source[:max_source], target[:max_target]
        total += len(source) + len(target)
        pairs.append((source, target))
    return pairs


def encode_chat(
    chat: Chat, fmt: PromptFormat, encoder: PromptEncoder, cutoff_len: int = 1024, reserved_label_len: int = 1
) -> Example:
    """Render `chat` and build its ids and labels; raises `RenderError` for a chat the server would refuse."""
    input_ids: list[int] = []
    labels: list[int] = []
    turns = render_training_turns(chat.messages, chat.tools, fmt, encoder)
    for source, target in make_pairs(turns, cutoff_len, reserved_label_len):
        input_ids += source + target
        labels += [IGNORE_INDEX] * len(source) + target
    return Example(input_ids, labels, chat.source)


def encode_chats(
    chats: Sequence[Chat], fmt: PromptFormat, encoder: PromptEncoder, cutoff_len: int = 1024, reserved_label_len: int = 1
) -> tuple[list[Example], list[BadRow]]:
    """Encode every chat; one the renderer refuses (e.g. an invalid tool name) is a bad row, not a crash."""
    if not 0 < reserved_label_len < cutoff_len:
        raise ValueError("reserved_label_len must be positive and smaller than cutoff_len")
    examples, bad = [], []
    for chat in chats:
        try:
            examples.append(encode_chat(chat, fmt, encoder, cutoff_len, reserved_label_len))
        except RenderError as exc:
            where = f" ({exc.param})" if exc.param else ""
            bad.append(BadRow(chat.source, f"the server cannot render it{where}: {exc.message}"))
    return examples, bad
