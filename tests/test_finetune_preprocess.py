"""Training ids and labels: LLaMA-Factory v0.6.3's, token for token, computed by the serving renderer.

`tests/data/train_cases.json` (a copy of shared/golden/train_cases.json) holds rows with the exact `input_ids` and `labels` that v0.6.3's
own `preprocess_supervised_dataset` produced with the real Qwen tokenizer and `--template qwen`.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from prompts import load_format
from server.finetune.data import Chat, read_dataset
from server.finetune.preprocess import IGNORE_INDEX, encode_chat, encode_chats, infer_max_len, make_pairs
from server.format.render import PromptEncoder, RenderError, render_prompt, render_training_turns

GOLDEN = json.loads((pathlib.Path(__file__).parent / "data" / "train_cases.json").read_text("utf-8"))
FMT = load_format()
IM_END = 151645


@pytest.fixture(scope="module")
def encoder(qwen_tokenizer) -> PromptEncoder:
    return PromptEncoder.from_tokenizer(qwen_tokenizer)


def _read_one(tmp_path: pathlib.Path, row: dict) -> Chat:
    path = tmp_path / "row.json"
    path.write_text(json.dumps([row], ensure_ascii=False), encoding="utf-8")
    dataset = read_dataset(path)
    assert dataset.bad_rows == []
    return dataset.chats[0]


@pytest.mark.parametrize("case", GOLDEN, ids=[case["name"] for case in GOLDEN])
def test_ids_and_labels_equal_llamafactory_v063(case, tmp_path, encoder):
    chat = _read_one(tmp_path, case["row"])
    example = encode_chat(chat, FMT, encoder, cutoff_len=case["cutoff_len"])
    assert read_dataset(tmp_path / "row.json").format == case["format"].split("_")[0]
    assert example.input_ids == case["input_ids"]
    assert example.labels == case["labels"]


# ---------------------------------------------------------------------------------------------
# render_training_turns: the training view of the serving renderer

WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        ],
    },
    {"role": "tool", "content": "18C"},
    {"role": "tool", "content": "25C"},
    {"role": "assistant", "content": "Paris 18C, Rome 25C."},
    {"role": "user", "content": "Thanks <|im_end|>"},
    {"role": "assistant", "content": "You're welcome."},
]


@pytest.mark.parametrize("tools", [WEATHER, None], ids=["tools", "no-tools"])
def test_training_turns_are_the_serving_prompts_plus_answers(tools, encoder):
    turns = render_training_turns(CHAT, tools, FMT, encoder)
    answers = [i for i, m in enumerate(CHAT) if m["role"] == "assistant"]
    assert len(turns) == len(answers)
    so_far: list[int] = []
    for (prompt, answer), index in zip(turns, answers):
        so_far += prompt
        assert so_far == render_prompt(CHAT[:index], tools, None, FMT, encoder).ids
        so_far += answer
    assert turns[0][1] == encoder.encode_text(
        'Checking.\nAction: get_weather\nAction Input: {"city": "Paris"}\nAction: get_weather\nAction Input: {"city": "Rome"}'
    ) + [IM_END]
    assert turns[-1][1] == encoder.encode_text("You're welcome.") + [IM_END]
    assert turns[-1][0].count(IM_END) == 1  # the template's; the user's typed <|im_end|> is text


def test_training_turns_need_a_final_answer(encoder):
    with pytest.raises(RenderError, match="must end with an assistant message"):
        render_training_turns(CHAT[:-1], WEATHER, FMT, encoder)
    with pytest.raises(RenderError, match="last message must be from the user"):
        render_prompt(CHAT, WEATHER, None, FMT, encoder)


# ---------------------------------------------------------------------------------------------
# cutoff_len, as v0.6.3's _make_pairs and infer_max_len


def test_infer_max_len_matches_v063():
    assert infer_max_len(300, 100, 256, 1) == (192, 64)
    assert infer_max_len(1000, 1, 256, 1) == (255, 1)  # the reserved label id
    assert infer_max_len(10, 20, 1024, 1) == (1004, 682)


def test_make_pairs_shares_the_budget_turn_by_turn():
    turns = [([1] * 10, [2] * 10), ([3] * 10, [4] * 10), ([5] * 10, [6] * 10)]
    assert make_pairs(turns, 1000) == turns
    cut = make_pairs(turns, 25)
    assert cut == [([1] * 10, [2] * 10), ([3] * 3, [4] * 2)]
    assert make_pairs(turns, 20) == [([1] * 10, [2] * 10)]  # the budget is spent: later turns go


def test_labels_mask_every_prompt_and_train_every_answer(tmp_path, encoder):
    chat = Chat(CHAT, WEATHER, "mem[0]")
    example = encode_chat(chat, FMT, encoder)
    turns = render_training_turns(CHAT, WEATHER, FMT, encoder)
    expected = []
    for prompt, answer in turns:
        expected += [IGNORE_INDEX] * len(prompt) + answer
    assert example.labels == expected
    assert example.input_ids == [i for prompt, answer in turns for i in prompt + answer]


def test_a_chat_the_server_would_refuse_is_a_bad_row(encoder):
    bad_tool = [{"type": "function", "function": {"name": "bad name!", "parameters": {}}}]
    chats = [Chat(CHAT, WEATHER, "f.json[0]"), Chat(CHAT, bad_tool, "f.json[1]")]
    examples, bad = encode_chats(chats, FMT, encoder)
    assert [e.source for e in examples] == ["f.json[0]"]
    assert [row.source for row in bad] == ["f.json[1]"]
    assert "tools[0].function.name" in bad[0].reason


def test_numeric_enums_keep_the_tool_text_unlike_v063(encoder):
    """The intended difference: v0.6.3 dropped the whole tool list for a numeric enum; serving does not."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "set_level",
                "parameters": {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2]}}},
            },
        }
    ]
    messages = [{"role": "user", "content": "max"}, {"role": "assistant", "content": "ok"}]
    example = encode_chat(Chat(messages, tools, "x"), FMT, encoder)
    served = render_prompt(messages[:1], tools, None, FMT, encoder)
    assert "should be one of [1, 2]" in served.text
    assert example.input_ids[: len(served.ids)] == served.ids
