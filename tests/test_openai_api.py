"""The rest of the OpenAI API on the trained demo model, driven with the openai SDK: neutral and
refused fields, chat `n` / `logprobs` / `logit_bias`, /v1/completions, /tokenize, /detokenize,
the render route and `agent-server render`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import httpx
import openai
import pytest

from server.demo import WEATHER_TOOLS

MODEL = "Qwen1.5-4B-agent"
HI = [{"role": "user", "content": "Hi"}]
HELLO = "Hello! How can I help you today?"
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]
COMPARE = [{"role": "user", "content": "Compare the weather in Paris and Tokyo."}]


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


# --- fields ---------------------------------------------------------------------------------------

NEUTRAL = {
    "prompt_cache_key": "user-42",
    "safety_identifier": "user-42",
    "prompt_cache_retention": "24h",
    "verbosity": "low",
    "reasoning_effort": "high",
    "modalities": ["text"],
    "service_tier": "auto",
    "store": True,
    "metadata": {"k": "v"},
    "user": "u",
}


def test_neutral_fields_are_accepted_and_change_nothing(client):
    plain = chat(client, PARIS, tools=WEATHER_TOOLS, temperature=0)
    with_fields = chat(client, PARIS, tools=WEATHER_TOOLS, temperature=0, extra_body=NEUTRAL)
    assert with_fields.choices[0].message.tool_calls[0].function == plain.choices[0].message.tool_calls[0].function
    completion = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body=NEUTRAL)
    assert completion.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("field,value", [
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "It is sunny."}),
    ("web_search_options", {"search_context_size": "low"}),
])
def test_fields_that_would_change_the_answer_are_a_400_naming_them(client, field, value):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, HI, extra_body={field: value})
    assert info.value.body["param"] == field and info.value.body["code"] == "unsupported_parameter"
    assert "not supported" in info.value.body["message"]


# --- chat: logprobs, n, logit_bias ------------------------------------------------------------------


def test_chat_logprobs_in_openai_shape(client):
    response = chat(client, HI, temperature=0, logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    assert choice.message.content == HELLO
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == HELLO
    assert b"".join(bytes(t.bytes) for t in tokens).decode() == HELLO
    for t in tokens:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the most likely
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1 + 1e-4
    without = chat(client, HI, temperature=0)
    assert without.choices[0].logprobs is None


def test_chat_logprobs_stream_add_up_to_the_non_streamed_ones(client):
    whole = chat(client, PARIS, tools=WEATHER_TOOLS, temperature=0, logprobs=True, top_logprobs=1)
    streamed = []
    for chunk in chat(client, PARIS, tools=WEATHER_TOOLS, temperature=0, logprobs=True, top_logprobs=1, stream=True):
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                streamed += choice.logprobs.content
    expected = whole.choices[0].logprobs.content
    assert [(t.token, t.bytes) for t in streamed] == [(t.token, t.bytes) for t in expected]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in expected], abs=1e-5)
    # With a tool call, the tokens spell the model's own ReAct text that the call was parsed from.
    assert "".join(t.token for t in expected).startswith("Action: get_weather\nAction Input:")


def test_n_choices_use_seed_plus_index(client):
    """Choice i samples with seed + i: (seed 11, n=3) and (seed 12, n=3) share seeds 12 and 13, shifted
    by one choice. Compared between requests of the same shape, because a batch of another shape
    rounds the logits differently, and at temperature 1.5 that can tip a draw."""
    first = chat(client, HI, temperature=1.5, seed=11, n=3, max_tokens=8, logprobs=True)
    second = chat(client, HI, temperature=1.5, seed=12, n=3, max_tokens=8)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts[1:] == [c.message.content for c in second.choices][:2]
    assert len(set(texts)) > 1, "different seeds should sample differently at temperature 1.5"
    assert first.usage.prompt_tokens == chat(client, HI, max_tokens=1).usage.prompt_tokens  # the prompt counts once
    assert first.usage.completion_tokens == sum(len(c.logprobs.content) for c in first.choices)  # every choice counts


def test_n_choices_each_parse_their_own_tool_calls(client):
    response = chat(client, COMPARE, tools=WEATHER_TOOLS, temperature=0, n=2)
    assert len(response.choices) == 2
    ids = set()
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
            ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo"})]
        ids |= {c.id for c in choice.message.tool_calls}
    assert len(ids) == 4, "every call has its own id"


def test_n_streamed_choices_assemble_like_the_non_streamed(client):
    whole = chat(client, COMPARE, tools=WEATHER_TOOLS, temperature=0, n=2)
    calls: dict[tuple[int, int], list[str]] = {}
    finish = {}
    for chunk in chat(client, COMPARE, tools=WEATHER_TOOLS, temperature=0, n=2, stream=True):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault((choice.index, call.index), ["", ""])
                entry[0] += call.function.name or ""
                entry[1] += call.function.arguments or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    for choice in whole.choices:
        expected = [[c.function.name, c.function.arguments] for c in choice.message.tool_calls]
        assert [calls[(choice.index, i)] for i in range(len(expected))] == expected


def test_logit_bias_bans_and_forces_tokens(client, trained_server):
    greedy = chat(client, HI, temperature=0, logprobs=True, max_tokens=3)
    first = greedy.choices[0].logprobs.content[0]
    first_id = httpx.post(trained_server.url + "/tokenize", json={"prompt": first.token}).json()["tokens"]
    assert len(first_id) == 1
    banned = chat(client, HI, temperature=0, logprobs=True, max_tokens=3, logit_bias={str(first_id[0]): -100})
    assert banned.choices[0].logprobs.content[0].token != first.token
    forced_id = httpx.post(trained_server.url + "/tokenize", json={"prompt": " banana"}).json()["tokens"][0]
    forced = chat(client, HI, temperature=0.7, seed=1, max_tokens=3, logit_bias={str(forced_id): 100})
    assert forced.choices[0].message.content == " banana" * 3


# --- /v1/completions --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hi_prompt(trained_server) -> dict:
    """The chat prompt of "Hi", from the render route: text with control tokens, and its ids."""
    body = {"model": MODEL, "messages": HI}
    return httpx.post(trained_server.url + "/v1/chat/completions/render", json=body).json()


def test_completion_of_the_raw_chat_prompt_is_the_chat_answer(client, hi_prompt):
    # Control-token strings in a prompt string are control tokens: the same ids as the rendered chat.
    for prompt in (hi_prompt["prompt"], hi_prompt["token_ids"]):
        completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
        assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
        choice = completion.choices[0]
        assert (choice.text, choice.finish_reason) == (HELLO, "stop")
        assert completion.usage.prompt_tokens == hi_prompt["count"]


def test_completion_max_tokens_stop_echo_and_n(client, hi_prompt):
    prompt = hi_prompt["prompt"]
    short = client.completions.create(model=MODEL, prompt=prompt, temperature=0)  # OpenAI's default: 16 tokens
    assert short.usage.completion_tokens <= 16
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
    assert cut.choices[0].finish_reason == "length" and HELLO.startswith(cut.choices[0].text)
    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=["help"])
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == ("Hello! How can I ", "stop")
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, echo=True, n=2)
    assert [c.text for c in echoed.choices] == [prompt + HELLO] * 2 and [c.index for c in echoed.choices] == [0, 1]
    sampled = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.5, seed=4, n=2)
    single = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.5, seed=5)
    assert sampled.choices[1].text == single.choices[0].text


def test_completion_logprobs_in_the_legacy_shape(client, hi_prompt):
    completion = client.completions.create(model=MODEL, prompt=hi_prompt["prompt"], max_tokens=20, temperature=0,
                                           logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens) == HELLO
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs)
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert top[token] == pytest.approx(logprob) and len(top) == 2 and max(top.values()) == pytest.approx(logprob)


def test_completion_stream_adds_up_to_the_non_streamed(client, hi_prompt):
    whole = client.completions.create(model=MODEL, prompt=hi_prompt["prompt"], max_tokens=20, temperature=0, logprobs=1)
    text, tokens, finish, usage = "", [], None, None
    for chunk in client.completions.create(model=MODEL, prompt=hi_prompt["prompt"], max_tokens=20, temperature=0,
                                           logprobs=1, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
            tokens += choice.logprobs.tokens if choice.logprobs else []
            finish = choice.finish_reason or finish
    assert (text, finish) == (whole.choices[0].text, "stop")
    assert tokens == whole.choices[0].logprobs.tokens
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_completion_has_no_tool_parsing(client, trained_server):
    render = httpx.post(trained_server.url + "/v1/chat/completions/render",
                        json={"model": MODEL, "messages": PARIS, "tools": WEATHER_TOOLS}).json()
    completion = client.completions.create(model=MODEL, prompt=render["prompt"], max_tokens=30, temperature=0)
    assert completion.choices[0].text == 'Action: get_weather\nAction Input: {"city": "Paris"}'


# --- /tokenize, /detokenize, render ------------------------------------------------------------------


def test_tokenize_and_detokenize_in_vllm_shapes(trained_server, hi_prompt):
    url = trained_server.url
    by_prompt = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": hi_prompt["prompt"],
                                                    "return_token_strs": True}).json()
    assert by_prompt["tokens"] == hi_prompt["token_ids"] and by_prompt["count"] == hi_prompt["count"]
    assert by_prompt["max_model_len"] == 4096 and by_prompt["token_strs"][0] == "<|im_start|>"
    by_messages = httpx.post(url + "/tokenize", json={"model": MODEL, "messages": HI}).json()
    assert by_messages["tokens"] == hi_prompt["token_ids"]
    back = httpx.post(url + "/detokenize", json={"model": MODEL, "tokens": by_prompt["tokens"]}).json()
    assert back == {"prompt": hi_prompt["prompt"]}


def test_render_route_shows_the_forced_prefix_and_tool_names(trained_server):
    body = {"model": "any", "messages": PARIS, "tools": WEATHER_TOOLS, "tool_choice": "required"}
    render = httpx.post(trained_server.url + "/v1/chat/completions/render", json=body).json()
    assert render["prompt"].endswith("<|im_start|>assistant\nAction:")
    assert render["forced_prefix"] == "Action:" and render["tool_names"] == ["get_weather"]
    assert len(render["token_ids"]) == render["count"]
    tokenized = httpx.post(trained_server.url + "/tokenize", json={"prompt": render["prompt"]}).json()
    assert tokenized["tokens"] == render["token_ids"]


def test_cli_render_prints_the_golden_prompt(tmp_path, qwen_tokenizer_dir):
    from tests.test_render import GOLDEN

    case = GOLDEN[1]
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": MODEL, "messages": case["messages"], "tools": case["tools"]}), "utf-8")
    done = subprocess.run([sys.executable, "-m", "server", "render", str(request), "--tokenizer", str(qwen_tokenizer_dir)],
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout == case["prompt"]
    assert "tokens]" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "server", "render", "-"], input='{"messages": [{"role": "assistant", '
                         '"content": "x"}]}', capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "messages" in bad.stderr


def test_new_routes_have_their_own_metrics_label(client, trained_server):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    httpx.post(trained_server.url + "/tokenize", json={"prompt": "Hi"})
    httpx.get(trained_server.url + "/v1/responses/resp_unknown")
    metrics = httpx.get(trained_server.url + "/metrics").text
    for route, status in (("/v1/completions", 200), ("/tokenize", 200), ("/v1/responses/{id}", 404)):
        lines = [line for line in metrics.splitlines() if line.startswith("agent_server_requests_total")]
        assert any(f'route="{route}"' in line and f'status="{status}"' in line for line in lines), route
