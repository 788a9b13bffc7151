"""The OpenAI Agents SDK (openai-agents, the `clients` extra) on its default model, the Responses
API, pointed at the trained demo model: a real agent loop with a function tool.

The tool is the demo's `get_weather` with the exact schema the model was trained on, so the
tiny model calls it for "What's the weather in Paris?" and, given "18C, sunny", answers.
"""

from __future__ import annotations

import asyncio
import json

import openai
from agents import Agent, FunctionTool, ModelSettings, RunConfig, Runner
from agents.models.openai_provider import OpenAIProvider
from agents.models.openai_responses import OpenAIResponsesModel

from server.demo import WEATHER_TOOLS

MODEL = "Qwen1.5-4B-agent"
ANSWER = "It is 18C and sunny in Paris."


def weather_agent(calls: list[dict]) -> Agent:
    spec = WEATHER_TOOLS[0]["function"]

    async def get_weather(_context, arguments: str) -> str:
        calls.append(json.loads(arguments))
        return "18C, sunny"

    tool = FunctionTool(name=spec["name"], description=spec["description"], params_json_schema=spec["parameters"],
                        on_invoke_tool=get_weather, strict_json_schema=False)
    return Agent(name="weather", model=MODEL, tools=[tool], model_settings=ModelSettings(temperature=0))


def run_config(trained_server) -> RunConfig:
    client = openai.AsyncOpenAI(base_url=trained_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return RunConfig(model_provider=OpenAIProvider(openai_client=client), tracing_disabled=True)


def test_the_default_model_is_the_responses_api(trained_server):
    model = run_config(trained_server).model_provider.get_model(MODEL)
    assert isinstance(model, OpenAIResponsesModel)


def test_agent_loop_calls_the_tool_and_answers(trained_server):
    calls: list[dict] = []
    result = asyncio.run(Runner.run(weather_agent(calls), "What's the weather in Paris?",
                                    run_config=run_config(trained_server), max_turns=4))
    assert calls == [{"city": "Paris"}]
    assert result.final_output == ANSWER
    assert [r.response_id.startswith("resp_") for r in result.raw_responses] == [True, True]


def test_streamed_agent_loop(trained_server):
    calls: list[dict] = []

    async def main():
        result = Runner.run_streamed(weather_agent(calls), "What's the weather in Paris?",
                                     run_config=run_config(trained_server), max_turns=4)
        kinds = [event.type async for event in result.stream_events()]
        return result, kinds

    result, kinds = asyncio.run(main())
    assert calls == [{"city": "Paris"}]
    assert result.final_output == ANSWER
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
