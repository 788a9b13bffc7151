"""Training files read as LLaMA-Factory v0.6.3 read them; bad rows named by file and row."""

from __future__ import annotations

import json
import pathlib

import pytest

from server.finetune.data import DataError, read_dataset, read_datasets

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def write(path: pathlib.Path, rows: list, *, lines: bool = False) -> pathlib.Path:
    if lines:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


CALL = json.dumps({"name": "get_weather", "arguments": {"city": "巴黎"}}, ensure_ascii=False)
TOOLS = json.dumps([{"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])
SHAREGPT = {
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": CALL},
        {"from": "observation", "value": '{"temp": 18}'},
        {"from": "gpt", "value": "18C."},
    ],
    "tools": TOOLS,
}


def test_sharegpt_row_becomes_the_openai_chat_the_server_renders(tmp_path):
    dataset = read_dataset(write(tmp_path / "tools.json", [SHAREGPT]))
    assert dataset.format == "sharegpt"
    (chat,) = dataset.chats
    assert chat.source == f"{tmp_path / 'tools.json'}[0]"
    assert chat.tools == [{"type": "function", "function": json.loads(TOOLS)[0]}]
    assert chat.messages == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "巴黎"}'}}],
        },
        {"role": "tool", "content": '{"temp": 18}'},
        {"role": "assistant", "content": "18C."},
    ]


def test_sharegpt_system_turn_trailing_prompt_and_parallel_calls(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Paris and Rome?"},
            {"from": "function_call", "value": json.dumps([json.loads(CALL), {"name": "get_weather", "arguments": {"city": "Rome"}}])},
            {"from": "observation", "value": "18C\n25C"},
        ],
        "tools": json.loads(TOOLS),  # a list instead of a JSON string is accepted too
    }
    (chat,) = read_dataset(write(tmp_path / "d.json", [row])).chats
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]  # the trailing observation is dropped
    assert chat.messages[0]["content"] == "Be brief."
    assert [c["function"]["arguments"] for c in chat.messages[2]["tool_calls"]] == ['{"city": "巴黎"}', '{"city": "Rome"}']


def test_tools_absent_or_empty_means_no_tool_text(tmp_path):
    rows = [{**SHAREGPT, "tools": value} for value in ("", "[]", None)] + [{"conversations": SHAREGPT["conversations"]}]
    dataset = read_dataset(write(tmp_path / "d.json", rows))
    assert [chat.tools for chat in dataset.chats] == [None] * 4


def test_alpaca_with_input_history_and_system(tmp_path):
    rows = [
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
        {"instruction": "谢谢", "input": "", "output": "不客气", "history": [["你好", "你好!"], ["几点了?", "十点。"]]},
        {"instruction": "", "input": "only input", "output": "ok", "system": "Be kind."},
    ]
    dataset = read_dataset(write(tmp_path / "a.jsonl", rows, lines=True))
    assert dataset.format == "alpaca"
    assert [chat.source for chat in dataset.chats] == [f"{tmp_path / 'a.jsonl'}:{n}" for n in (1, 2, 3)]
    assert dataset.chats[0].messages == [
        {"role": "user", "content": "Translate.\nBonjour"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert [m["content"] for m in dataset.chats[1].messages] == ["你好", "你好!", "几点了?", "十点。", "谢谢", "不客气"]
    assert dataset.chats[2].messages[0] == {"role": "system", "content": "Be kind."}
    assert dataset.chats[2].messages[1] == {"role": "user", "content": "only input"}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"conversations": []}, "no complete turn"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "no complete turn"),
        ({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]}, "turn 0: expected human or observation, got 'gpt'"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "turn 1: expected gpt or function_call, got 'human'"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "{not json"}]}, "function_call is not JSON"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": '{"name": "f"}'}]}, '"name": ..., "arguments": ...'),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}]}, "value must be a string"),
        ({"conversations": [{"from": "human"}]}, '"from" and "value"'),
        ({"conversations": SHAREGPT["conversations"], "tools": "{oops"}, "tools is not JSON"),
        ({"conversations": SHAREGPT["conversations"], "tools": '{"name": "f"}'}, "tools must be a JSON list"),
        ({"conversations": "hello"}, "needs a `conversations` list"),
        ("a string row", "needs a `conversations` list"),
    ],
)
def test_bad_sharegpt_rows_are_reported_with_file_and_row(tmp_path, row, reason):
    path = write(tmp_path / "d.json", [SHAREGPT, row, SHAREGPT])
    dataset = read_dataset(path)
    assert [chat.source for chat in dataset.chats] == [f"{path}[0]", f"{path}[2]"]
    (bad,) = dataset.bad_rows
    assert bad.source == f"{path}[1]"
    assert reason in bad.reason
    assert str(bad).startswith(f"{path}[1]: ")


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"instruction": "a"}, "output must be a string"),
        ({"instruction": "a", "output": ["good", "bad"]}, "ranking data"),
        ({"instruction": "a", "output": "b", "history": [["only one"]]}, "history[0] must be a [user, assistant] pair"),
        ({"instruction": 5, "output": "b"}, "instruction must be a string"),
    ],
)
def test_bad_alpaca_rows_are_reported(tmp_path, row, reason):
    good = {"instruction": "a", "output": "b"}
    path = write(tmp_path / "d.jsonl", [good, row], lines=True)
    (bad,) = read_dataset(path).bad_rows
    assert bad.source == f"{path}:2"
    assert reason in bad.reason


def test_a_file_without_a_usable_row_is_an_error(tmp_path):
    path = write(tmp_path / "d.json", [{"conversations": []}, {"conversations": [{"from": "gpt", "value": "x"}, {"from": "gpt", "value": "y"}]}])
    with pytest.raises(DataError, match=r"no usable row \(2 bad; first: .*d.json\[0\]: no complete turn"):
        read_dataset(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]", "no rows"),
        ('[{"text": "a"}]', "cannot tell the format"),
        ('[{"conversations": [], "instruction": "a"}]', "cannot tell the format"),
        ('{"a": 1}\n{broken', "neither a JSON array nor JSON Lines"),
    ],
)
def test_unusable_files_are_errors(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_dataset(path)


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_dataset(tmp_path / "nope.json")
    with pytest.raises(DataError, match="no dataset"):
        read_datasets([])


def test_max_samples_takes_the_first_rows_of_each_file_bad_ones_included(tmp_path):
    a = write(tmp_path / "a.json", [SHAREGPT, {"conversations": []}, SHAREGPT, SHAREGPT])
    b = write(tmp_path / "b.json", [{"instruction": "x", "output": "y"}] * 5)
    first, second = read_datasets([a, b], max_samples=3)
    assert [c.source for c in first.chats] == [f"{a}[0]", f"{a}[2]"]
    assert len(first.bad_rows) == 1
    assert [c.source for c in second.chats] == [f"{b}[{i}]" for i in range(3)]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared/data is not beside the checkout")
def test_the_real_files_read_cleanly():
    glaive_en, glaive_zh, oaast = read_datasets(
        [
            SHARED_DATA / "glaive" / "glaive_toolcall_en_demo.json",
            SHARED_DATA / "glaive" / "glaive_toolcall_zh_demo.json",
            SHARED_DATA / "llamafactory_v0.6.3" / "oaast_sft_zh.json",
        ]
    )
    assert (glaive_en.format, len(glaive_en.chats), glaive_en.bad_rows) == ("sharegpt", 300, [])
    assert (glaive_zh.format, len(glaive_zh.chats)) == ("sharegpt", 300)
    assert (oaast.format, len(oaast.chats), oaast.bad_rows) == ("alpaca", 689, [])
