"""The demo model: a real tiny Qwen2 checkpoint that greedily answers DEMO_EXAMPLES, built and cached.

The reproduction tests are also the guard against drift: if the renderer, the format or the tokenizer
change the prompt ids, or training stops converging, the trained model no longer answers exactly.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from prompts import load_format
from server import demo
from server.demo import (
    DEMO_EXAMPLES,
    DEMO_SYSTEM,
    DEMO_TOOLS,
    TRAINING_REPORT,
    WEATHER_TOOLS,
    DemoExample,
    build_random_model,
    train_demo_model,
)
from server.format.render import PromptEncoder, render_prompt

GOLDEN = {
    case["name"]: case
    for case in json.loads((pathlib.Path(__file__).parent / "data" / "render_cases.json").read_text("utf-8"))
}
FMT = load_format()
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
PARIS = "What's the weather in Paris?"


def _example_id(example: DemoExample) -> str:
    """`3-get_weather` for a call, `5-answer` for text (ASCII: pytest escapes anything else)."""
    kind = example.answer.split("\n")[0].removeprefix("Action: ") if example.answer.startswith("Action:") else "answer"
    return f"{DEMO_EXAMPLES.index(example)}-{kind}"


def _find(messages: list[dict]) -> DemoExample:
    matches = [e for e in DEMO_EXAMPLES if e.messages == messages]
    assert len(matches) == 1, f"expected one example with messages {messages}"
    return matches[0]


# ---------------------------------------------------------------------------------------------
# The examples


def test_demo_tools_and_system_are_the_seed_clients():
    case = GOLDEN["seed_client_rubbish"]
    assert DEMO_TOOLS == case["tools"]
    assert case["messages"][0] == {"role": "system", "content": DEMO_SYSTEM}


@pytest.mark.parametrize(
    ("case", "answer"),
    [
        ("seed_client_rubbish", 'Action: get_rubbish_category\nAction Input: {"keyword": "鸡蛋壳"}'),
        ("seed_client_song", 'Action: get_song_information\nAction Input: {"keyword": "爱在西元前"}'),
        ("seed_client_cartoon", 'Action: get_cartoon_information\nAction Input: {"title": "棋魂"}'),
        ("seed_client_second_request", "鸡蛋壳属于湿垃圾。"),
    ],
)
def test_the_seed_requests_are_trained_on_their_golden_prompts(case, answer, qwen_tokenizer):
    golden = GOLDEN[case]
    example = _find(golden["messages"])
    assert example.tools == golden["tools"]
    assert example.answer == answer
    rendered = render_prompt(example.messages, example.tools, None, FMT, PromptEncoder.from_tokenizer(qwen_tokenizer))
    assert rendered.text == golden["prompt"]


def test_the_openai_style_examples():
    paris_call = {"id": "call_paris", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    expected = [
        ([{"role": "user", "content": PARIS}], WEATHER_TOOLS, 'Action: get_weather\nAction Input: {"city": "Paris"}'),
        (
            [{"role": "user", "content": "Compare the weather in Paris and Tokyo."}],
            WEATHER_TOOLS,
            'Action: get_weather\nAction Input: {"city": "Paris"}\nAction: get_weather\nAction Input: {"city": "Tokyo"}',
        ),
        (
            [
                {"role": "user", "content": PARIS},
                {"role": "assistant", "content": None, "tool_calls": [paris_call]},
                {"role": "tool", "tool_call_id": "call_paris", "content": "18C, sunny"},
            ],
            WEATHER_TOOLS,
            "It is 18C and sunny in Paris.",
        ),
        ([{"role": "user", "content": "Hi"}], None, "Hello! How can I help you today?"),
    ]
    for messages, tools, answer in expected:
        assert _find(messages) == DemoExample(messages, tools, answer)
    assert len(DEMO_EXAMPLES) <= 16  # each one costs demo training time


def test_the_readme_examples_are_trained():
    """README "Calling it": the Python example (one seed tool, no system prompt) and the curl one."""
    rubbish = _find([{"role": "user", "content": "鸡蛋壳属于哪种类型的垃圾?"}])
    assert rubbish.tools == DEMO_TOOLS[:1]
    assert rubbish.answer == 'Action: get_rubbish_category\nAction Input: {"keyword": "鸡蛋壳"}'
    weather = _find([{"role": "user", "content": "What is the weather in Paris?"}])
    assert weather.tools == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    assert weather.answer == 'Action: get_weather\nAction Input: {"city": "Paris"}'


def test_each_seed_question_is_answered_after_its_tool_result_with_and_without_tools():
    follow_ups = [e for e in DEMO_EXAMPLES if e.messages[0] == {"role": "system", "content": DEMO_SYSTEM} and len(e.messages) == 4]
    questions = {e.messages[1]["content"] for e in follow_ups}
    assert len(questions) == 3
    for question in questions:
        variants = [e for e in follow_ups if e.messages[1]["content"] == question]
        assert sorted(e.tools is None for e in variants) == [False, True]
        assert all(e.tools in (None, DEMO_TOOLS) for e in variants)
        assert len({e.answer for e in variants}) == 1
        assert not variants[0].answer.startswith("Action:")


def test_weather_tool_offers_an_optional_enum_unit():
    parameters = WEATHER_TOOLS[0]["function"]["parameters"]
    assert WEATHER_TOOLS[0]["function"]["name"] == "get_weather"
    assert parameters["required"] == ["city"]
    assert parameters["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]


# ---------------------------------------------------------------------------------------------
# The random model


def test_random_model_is_a_loadable_qwen2_checkpoint(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert config.vocab_size == 151936
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (2, 2, 1)  # head_dim 32 (vLLM CPU kernels), GQA kept
    assert config.max_position_embeddings == 4096
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (IM_END, ENDOFTEXT, None)
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.eos_token_id == [IM_END, ENDOFTEXT]
    assert model.generation_config.do_sample is False
    assert tokenizer.is_fast
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [ENDOFTEXT, IM_START, IM_END]
    assert len(tokenizer) <= config.vocab_size


def test_random_model_is_seeded(tiny_model_dir, qwen_tokenizer_dir, tmp_path):
    reference = load_file(tiny_model_dir / "model.safetensors")
    same = load_file(build_random_model(qwen_tokenizer_dir, tmp_path / "same", seed=0) / "model.safetensors")
    other = load_file(build_random_model(qwen_tokenizer_dir, tmp_path / "other", seed=1) / "model.safetensors")
    assert reference.keys() == same.keys() == other.keys()
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert not torch.equal(reference["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------
# The trained model


@pytest.fixture(scope="module")
def trained(trained_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(trained_model_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_model_dir).eval()
    return model, tokenizer, PromptEncoder.from_tokenizer(tokenizer)


def _greedy(model, ids: list[int]) -> list[int]:
    """New ids from `generate` with the checkpoint's own generation config (greedy, stops at <|im_end|>)."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=64)
    return output[0, len(ids) :].tolist()


@pytest.mark.parametrize("example", DEMO_EXAMPLES, ids=_example_id)
def test_trained_model_greedily_reproduces_every_answer(trained, example):
    model, tokenizer, encoder = trained
    prompt = render_prompt(example.messages, example.tools, None, FMT, encoder)
    new = _greedy(model, prompt.ids)
    assert tokenizer.decode(new) == example.answer + "<|im_end|>"
    assert new == encoder.encode_text(example.answer) + [IM_END]


def test_trained_model_answers_the_same_in_bfloat16(trained_model_dir, trained):
    """The server may run the model in bfloat16; the training margin keeps the answers."""
    _, _, encoder = trained
    model = AutoModelForCausalLM.from_pretrained(trained_model_dir, dtype=torch.bfloat16).eval()
    for example in DEMO_EXAMPLES:
        prompt = render_prompt(example.messages, example.tools, None, FMT, encoder)
        assert _greedy(model, prompt.ids) == encoder.encode_text(example.answer) + [IM_END], example.answer


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
def test_trained_model_continues_a_forced_prefix(trained, tool_choice):
    """tool_choice appends a forced prefix that must fall on the training tokens' boundaries."""
    model, tokenizer, encoder = trained
    prompt = render_prompt([{"role": "user", "content": PARIS}], WEATHER_TOOLS, tool_choice, FMT, encoder)
    assert prompt.forced_prefix
    text = prompt.forced_prefix + tokenizer.decode(_greedy(model, prompt.ids))
    assert text == 'Action: get_weather\nAction Input: {"city": "Paris"}<|im_end|>'


def test_training_report(trained_model_dir):
    report = json.loads((trained_model_dir / TRAINING_REPORT).read_text("utf-8"))
    assert 0 < report["steps"] < 300
    assert report["min_margin"] >= 2.0
    assert report["loss"] < 0.5


def test_training_raises_when_the_answers_are_not_learned(tiny_model_dir, tmp_path):
    with pytest.raises(RuntimeError, match="did not learn"):
        train_demo_model(tiny_model_dir, tmp_path / "out", DEMO_EXAMPLES[:2], max_steps=0)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The cache (training replaced by a copy of the trained fixture, to test only the caching)


@pytest.fixture
def fake_builds(monkeypatch, tmp_path, trained_model_dir, qwen_tokenizer_dir) -> list[str]:
    """Record build steps instead of running them; the cache's tokenizer is the (stamped) fixture's."""
    shutil.copytree(qwen_tokenizer_dir, tmp_path / "tokenizer")
    calls: list[str] = []

    def fake_random(tokenizer_dir, out_dir, *, seed=0):
        calls.append("random")
        out_dir.mkdir()
        return out_dir

    def fake_train(model_dir, out_dir, examples=DEMO_EXAMPLES, *, seed=0):
        calls.append("train")
        shutil.copytree(trained_model_dir, out_dir)
        return out_dir

    monkeypatch.setattr(demo, "build_random_model", fake_random)
    monkeypatch.setattr(demo, "train_demo_model", fake_train)
    return calls


def test_build_demo_model_builds_once_and_rebuilds_when_the_training_data_changes(tmp_path, monkeypatch, fake_builds):
    model_dir = demo.build_demo_model(tmp_path)
    assert model_dir == tmp_path / "model"
    assert (model_dir / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "random-model", "tokenizer"]
    assert fake_builds == ["random", "train"]

    assert demo.build_demo_model(tmp_path) == model_dir
    assert fake_builds == ["random", "train"]

    monkeypatch.setattr(demo, "DEMO_EXAMPLES", DEMO_EXAMPLES[:-1])
    assert demo.build_demo_model(tmp_path) == model_dir
    assert fake_builds == ["random", "train"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "random-model", "tokenizer"]


def test_an_interrupted_build_leaves_nothing_to_trust(tmp_path, monkeypatch, fake_builds):
    def failing_train(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "train_demo_model", failing_train)
    with pytest.raises(KeyboardInterrupt):
        demo.build_demo_model(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]
