"""End to end: the trained tiny model behind a real uvicorn, driven with the official openai SDK."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from server.demo import DEMO_EXAMPLES, DEMO_SYSTEM, DEMO_TOOLS, WEATHER_TOOLS

MODEL = "Qwen1.5-4B-agent"
RUBBISH = [{"role": "system", "content": DEMO_SYSTEM}, {"role": "user", "content": "鸡蛋壳属于哪种类型的垃圾?"}]
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]
COMPARE = [{"role": "user", "content": "Compare the weather in Paris and Tokyo."}]


def ask(client, messages, tools=None, **kwargs):
    extra = {"tools": tools} if tools is not None else {}
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **extra, **kwargs)


def assemble(stream):
    """Fold SDK stream chunks into (content, [(id, name, arguments)], finish_reason, usage, role)."""
    content, calls, finish, usage, role = "", {}, None, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            role = role or delta.role
            content += delta.content or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                if call.id:
                    assert entry["id"] is None, "a call is announced once"
                    entry["id"], entry["name"] = call.id, call.function.name
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    ordered = [(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    return content, ordered, finish, usage, role


def calls_of(message):
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def test_tool_call_non_streaming_with_chinese_arguments(client):
    response = ask(client, RUBBISH, DEMO_TOOLS)
    choice = response.choices[0]
    assert response.id.startswith("chatcmpl-") and response.model == MODEL and response.object == "chat.completion"
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert calls_of(choice.message) == [("get_rubbish_category", '{"keyword": "鸡蛋壳"}')]
    assert choice.message.tool_calls[0].id.startswith("call_")
    usage = response.usage
    assert usage.completion_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize(
    "example", [e for e in DEMO_EXAMPLES], ids=[f"demo{i}" for i in range(len(DEMO_EXAMPLES))]
)
def test_streamed_equals_non_streamed(client, example):
    plain = ask(client, example.messages, example.tools)
    stream = ask(client, example.messages, example.tools, stream=True, stream_options={"include_usage": True})
    content, calls, finish, usage, role = assemble(stream)
    message = plain.choices[0].message
    assert role == "assistant"
    assert (content or None) == message.content
    assert [(n, a) for _, n, a in calls] == calls_of(message)
    assert finish == plain.choices[0].finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens == plain.usage.prompt_tokens


def test_trained_answers_come_back_as_tool_calls_or_text(client):
    for example in DEMO_EXAMPLES:
        message = ask(client, example.messages, example.tools).choices[0].message
        if example.answer.startswith("Action:"):
            rendered = "\n".join(f"Action: {n}\nAction Input: {a}" for n, a in calls_of(message))
            assert rendered == example.answer
        else:
            assert message.content == example.answer and not message.tool_calls


def test_two_calls_in_one_turn_streamed(client):
    content, calls, finish, _, _ = assemble(ask(client, COMPARE, WEATHER_TOOLS, stream=True))
    assert [(n, json.loads(a)) for _, n, a in calls] == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo"})]
    assert len({i for i, _, _ in calls}) == 2 and finish == "tool_calls" and content == ""


def test_parallel_tool_calls_false_gives_one_call(client):
    message = ask(client, COMPARE, WEATHER_TOOLS, parallel_tool_calls=False).choices[0].message
    assert calls_of(message) == [("get_weather", '{"city": "Paris"}')]
    _, calls, finish, _, _ = assemble(ask(client, COMPARE, WEATHER_TOOLS, parallel_tool_calls=False, stream=True))
    assert [n for _, n, _ in calls] == ["get_weather"] and finish == "tool_calls"


def test_seed_two_request_flow(client):
    """The seed client: call, then a legacy `function` message keyed `argument` and a bare `tool` message."""
    first = ask(client, RUBBISH, DEMO_TOOLS).choices[0].message
    call = first.tool_calls[0].function
    follow_up = RUBBISH + [
        {"role": "function", "content": json.dumps({"name": call.name, "argument": json.loads(call.arguments)}, ensure_ascii=False)},
        {"role": "tool", "content": "工具输出结果为: 熟鸡蛋壳: 湿垃圾\n生鸡蛋壳: 湿垃圾\n鸡蛋壳: 湿垃圾\n包裹着鸡蛋壳的餐巾纸: 干垃圾"},
    ]
    second = ask(client, follow_up)
    assert second.choices[0].message.content == "鸡蛋壳属于湿垃圾。"
    assert second.choices[0].finish_reason == "stop"


def test_openai_style_tool_result_round_trip(client):
    first = ask(client, PARIS, WEATHER_TOOLS).choices[0].message
    messages = PARIS + [first.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "18C, sunny"}]
    assert ask(client, messages, WEATHER_TOOLS).choices[0].message.content == "It is 18C and sunny in Paris."


def test_tool_choice_named_forces_that_tool(client):
    """The forced `Action: NAME\nAction Input:` prefix is part of the prompt and of the parsed output."""
    song = [RUBBISH[0], {"role": "user", "content": "爱在西元前是谁唱的,来自哪张专辑?"}]
    choice = {"type": "function", "function": {"name": "get_song_information"}}
    for stream in (False, True):
        if stream:
            _, calls, finish, usage, _ = assemble(ask(client, song, DEMO_TOOLS, tool_choice=choice, stream=True,
                                                       stream_options={"include_usage": True}))
            calls = [(n, a) for _, n, a in calls]
        else:
            response = ask(client, song, DEMO_TOOLS, tool_choice=choice)
            calls, finish, usage = calls_of(response.choices[0].message), response.choices[0].finish_reason, response.usage
        assert calls == [("get_song_information", '{"keyword": "爱在西元前"}')] and finish == "tool_calls"
    # The prefix is prompt, not completion: fewer generated tokens than the unforced answer.
    assert usage.completion_tokens < ask(client, song, DEMO_TOOLS).usage.completion_tokens


def test_tool_choice_required_on_a_chat_question_still_calls_a_tool(client):
    response = ask(client, [{"role": "user", "content": "Hi"}], WEATHER_TOOLS, tool_choice="required", max_tokens=40)
    choice = response.choices[0]
    # Constrained: a call of an offered tool, whose arguments are valid JSON unless max_tokens cut them
    # (then finish_reason says "length"); tests/test_constrained.py checks the schemas.
    assert [c.function.name for c in choice.message.tool_calls][:1] == ["get_weather"]
    if choice.finish_reason == "tool_calls":
        assert all(isinstance(json.loads(c.function.arguments), dict) for c in choice.message.tool_calls)
    else:
        assert choice.finish_reason == "length"


def test_tool_choice_required_keeps_the_trained_call(client):
    message = ask(client, PARIS, WEATHER_TOOLS, tool_choice="required").choices[0].message
    assert calls_of(message) == [("get_weather", '{"city": "Paris"}')]


def test_tool_choice_none_returns_plain_content(client):
    response = ask(client, RUBBISH, DEMO_TOOLS, tool_choice="none", max_tokens=12)
    assert response.choices[0].message.tool_calls is None
    assert isinstance(response.choices[0].message.content, str)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_max_tokens_cut_mid_call_is_length_with_text(client):
    for stream in (False, True):
        if stream:
            content, calls, finish, _, _ = assemble(ask(client, RUBBISH, DEMO_TOOLS, max_tokens=4, stream=True))
        else:
            response = ask(client, RUBBISH, DEMO_TOOLS, max_tokens=4)
            content, finish = response.choices[0].message.content, response.choices[0].finish_reason
            calls = calls_of(response.choices[0].message)
        assert finish == "length" and calls == []
        assert content.startswith("Action:") and 'Action: get_rubbish_category\nAction Input: {"keyword"'.startswith(content)


def test_stop_sequence_is_trimmed(client):
    response = ask(client, [{"role": "user", "content": "Hi"}], stop=["help"])
    assert response.choices[0].message.content == "Hello! How can I "
    assert response.choices[0].finish_reason == "stop"
    content, _, finish, _, _ = assemble(ask(client, [{"role": "user", "content": "Hi"}], stop=["help"], stream=True))
    assert content == "Hello! How can I " and finish == "stop"


def test_seed_makes_sampling_reproducible(client):
    def sample():
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is 2 + 2?"}], temperature=1.5, seed=1234, max_tokens=12
        ).choices[0].message.content

    assert sample() == sample()


def test_legacy_functions_answer_with_function_call(client):
    functions = [t["function"] for t in WEATHER_TOOLS]
    response = client.chat.completions.create(model=MODEL, messages=PARIS, functions=functions, temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "function_call"
    assert (choice.message.function_call.name, choice.message.function_call.arguments) == ("get_weather", '{"city": "Paris"}')
    name, arguments, finish = "", "", None
    for chunk in client.chat.completions.create(model=MODEL, messages=PARIS, functions=functions, temperature=0, stream=True):
        for streamed in chunk.choices:
            assert not streamed.delta.tool_calls
            if streamed.delta.function_call:
                name += streamed.delta.function_call.name or ""
                arguments += streamed.delta.function_call.arguments or ""
            finish = streamed.finish_reason or finish
    assert (name, arguments, finish) == ("get_weather", '{"city": "Paris"}', "function_call")


def test_models_health_and_unknown_model(client, trained_server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(trained_server.url + "/health").json() == {"status": "ok"}
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=PARIS)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


def test_context_overflow_is_a_400_with_the_numbers(client):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, [{"role": "user", "content": "hello " * 5000}])
    assert info.value.body["code"] == "context_length_exceeded"
    assert "4096" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, PARIS, max_tokens=4090)
    assert info.value.body["param"] == "max_tokens"


def test_unsupported_field_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, PARIS, extra_body={"prediction": {"type": "content", "content": "x"}})
    assert info.value.body["param"] == "prediction" and info.value.body["type"] == "invalid_request_error"


def test_raw_sse_framing(trained_server):
    body = {"model": MODEL, "messages": PARIS, "tools": WEATHER_TOOLS, "stream": True, "temperature": 0}
    with httpx.stream("POST", trained_server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache" and response.headers["x-accel-buffering"] == "no"
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["object"] == "chat.completion.chunk"
    announce = [json.loads(l[6:]) for l in lines[1:-1] if "tool_calls" in l][0]["choices"][0]["delta"]["tool_calls"][0]
    assert set(announce) == {"index", "id", "type", "function"} and announce["function"]["arguments"] == ""
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] == "tool_calls"


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory, trained_model_dir):
    """A peft LoRA adapter on the trained model (non-zero B so it changes outputs) and its merge."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(trained_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter_dir = tmp_path_factory.mktemp("lora")
    get_peft_model(base, config).save_pretrained(adapter_dir)
    merged_dir = tmp_path_factory.mktemp("merged")
    subprocess.run(
        [sys.executable, "-m", "server", "merge", "--base", str(trained_model_dir), "--adapter", str(adapter_dir),
         "--out", str(merged_dir)],
        check=True, capture_output=True,
    )
    return adapter_dir, merged_dir


def test_lora_adapter_served_and_merged_give_the_same_greedy_output(start_server, trained_model_dir, lora_dirs, client,
                                                                    trained_server):
    if trained_server.engine != "builtin":
        pytest.skip("adapters are the built-in engine's (--adapter); the merged directory is what vLLM serves")
    adapter_dir, merged_dir = lora_dirs
    outputs = []
    for args in (["--model", str(trained_model_dir), "--adapter", str(adapter_dir)], ["--model", str(merged_dir)]):
        server = start_server(*args)
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        outputs.append(ask(sdk, [{"role": "user", "content": "Hi"}], max_tokens=16).choices[0].message.content)
        server.stop()
    base_output = ask(client, [{"role": "user", "content": "Hi"}], max_tokens=16).choices[0].message.content
    assert outputs[0] == outputs[1]
    assert outputs[0] != base_output  # the adapter is really applied


def test_serve_demo_uses_the_cached_demo_model_and_says_so(start_server, demo_cache_dir):
    server = start_server("--demo", "--demo-cache", str(demo_cache_dir))
    log = "".join(server.log)
    assert "DEMO MODEL" in log and "not Qwen1.5-4B-agent" in log
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    message = ask(sdk, RUBBISH, DEMO_TOOLS).choices[0].message
    assert calls_of(message) == [("get_rubbish_category", '{"keyword": "鸡蛋壳"}')]
    server.stop()
