#!/usr/bin/env python3
"""The seed project's agent, on the official openai SDK: ask, run the tools the model calls, answer.

    python examples/seed_agent.py                       # the seed's three questions, live web APIs
    python examples/seed_agent.py --offline             # canned tool data, no internet needed
    python examples/seed_agent.py --offline "鸡蛋壳属于哪种类型的垃圾?"
    python examples/seed_agent.py --base-url http://gpu-box:8000/v1 --api-key "$KEY"

For each question it sends the seed's system prompt, the question and the three tools; runs every
tool call in the answer; sends the calls back as an assistant message with `tool_calls` followed by
one `tool` message per call (with its `tool_call_id`); and repeats until the model answers in text.

Like the seed client, the follow-up request that carries the tool results offers no tools, so the
model answers from them (the seed's second request; the tiny demo model is trained on exactly that
prompt). `--keep-tools` offers the tools on every request instead, so the model can chain calls
(`--max-rounds` bounds the loop).

Requests use temperature 0 (`--temperature`): the server, like OpenAI, samples at 1.0 by default,
and tool calls should be deterministic.

Standalone on purpose: it needs only `openai` and the standard library, not this repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

#: The seed client's system prompt.
SYSTEM_PROMPT = "你是一个有用的小助手,请调用下面的工具来回答用户的问题,参考工具输出进行回答。"

#: The seed client's questions (the default when no question is given).
SEED_QUESTIONS = [
    "鸡蛋壳属于哪种类型的垃圾?",
    "爱在西元前是谁唱的,来自哪张专辑?",
    "动漫《棋魂》是哪个国家的,什么时候上映的?",
]

#: Prefix of every tool message, as the seed client sends it.
TOOL_RESULT_PREFIX = "工具输出结果为: "


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


#: The seed client's three tools. The model was fine-tuned on prompts rendered from these exact
#: texts: keep them byte for byte (the server renders tools into the prompt verbatim).
TOOLS: list[dict[str, Any]] = [
    _tool(
        "get_rubbish_category",
        "适用于生活垃圾分类时,判断物品属于哪种类型的垃圾?",
        {"keyword": {"type": "string", "description": "物品名称,用于垃圾分类"}},
        ["keyword"],
    ),
    _tool(
        "get_cartoon_information",
        "根据用户提供的动漫标题,查询该动漫的相关信息。",
        {"title": {"type": "string", "description": "动漫"}},
        ["title"],
    ),
    _tool(
        "get_song_information",
        "根据用户提供的歌曲名称,查询歌曲相关信息,包括歌手、时长、专辑名称等。",
        {"keyword": {"type": "string", "description": "歌曲名称"}},
        ["keyword"],
    ),
]

# ---------------------------------------------------------------------------------------------
# Tools, online: the public JSON APIs the seed used (no key needed). Any failure is returned as
# tool output text, so the model can still answer ("the lookup failed") and the loop never crashes.

API_BASE = os.environ.get("SEED_AGENT_API_BASE", "https://api.timelessq.com")
HTTP_TIMEOUT = 10.0


class ToolError(Exception):
    """A tool could not produce its answer; the message becomes the tool output."""


def fetch_json(path: str, **params: str) -> Any:
    url = f"{API_BASE}{path}?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(url, headers={"User-Agent": "agent-server-seed-example/1.0"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            body = json.loads(response.read().decode("utf-8"))
    except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, bad JSON
        raise ToolError(f"请求 {url} 失败: {exc}") from None
    if not isinstance(body, dict) or "data" not in body:
        raise ToolError(f"{url} 返回了意外的内容")
    return body["data"]


def _first(items: Any, what: str) -> dict[str, Any]:
    if isinstance(items, dict):
        items = items.get("list")
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        raise ToolError(f"没有找到{what}")
    return items[0]


def rubbish_online(keyword: str) -> str:
    items = fetch_json("/garbage", keyword=keyword)
    if not isinstance(items, list) or not items:
        raise ToolError(f"没有找到 {keyword} 的垃圾分类")
    # The API spells the field "categroy"; accept the correct spelling too.
    return "\n".join(f"{i.get('name', '?')}: {i.get('categroy') or i.get('category') or '?'}" for i in items if isinstance(i, dict))


def song_online(keyword: str) -> str:
    song = _first(fetch_json("/music/tencent/search", keyword=keyword), f"歌曲 {keyword}")
    singers = song.get("singer") or []
    singer = "、".join(s.get("name", "") for s in singers if isinstance(s, dict)) or "未知"
    return f"歌曲: {song.get('songname') or keyword}\n歌手: {singer}\n时长: {song.get('interval', '?')}秒\n专辑名称: {song.get('albumname') or '未知'}"


def cartoon_online(title: str) -> str:
    show = _first(fetch_json("/bangumi", title=title), f"动漫 {title}")
    return (
        f"标题: {show.get('title') or title}\n类型: {show.get('type', '?')}\n语言: {show.get('lang', '?')}\n"
        f"官网: {show.get('officialSite') or '未知'}\n上映时间: {show.get('begin') or '未知'}\n完结时间: {show.get('end') or '未知'}"
    )


# ---------------------------------------------------------------------------------------------
# Tools, offline: small canned answers in the same shape as the online ones.

OFFLINE_DATA: dict[str, dict[str, str]] = {
    "get_rubbish_category": {
        "鸡蛋壳": "熟鸡蛋壳: 湿垃圾\n生鸡蛋壳: 湿垃圾\n鸡蛋壳: 湿垃圾\n包裹着鸡蛋壳的餐巾纸: 干垃圾",
        "电池": "电池: 有害垃圾\n废电池: 有害垃圾\n充电电池: 有害垃圾",
        "塑料瓶": "塑料瓶: 可回收物\n饮料瓶: 可回收物",
    },
    "get_song_information": {
        "爱在西元前": "歌曲: 爱在西元前\n歌手: 周杰伦\n时长: 234秒\n专辑名称: 范特西",
        "凉凉": "歌曲: 凉凉\n歌手: 杨宗纬、张碧晨\n时长: 335秒\n专辑名称: 凉凉",
    },
    "get_cartoon_information": {
        "棋魂": "标题: 棋魂\n类型: TV\n国家: 日本\n语言: ja\n上映时间: 2001-10-10\n完结时间: 2003-03-26",
    },
}


def offline(name: str, argument: str) -> Callable[[str], str]:
    def lookup(value: str) -> str:
        try:
            return OFFLINE_DATA[name][value]
        except KeyError:
            raise ToolError(f"离线数据里没有 {value} ({argument})") from None

    return lookup


def tool_functions(use_offline: bool) -> dict[str, tuple[str, Callable[[str], str]]]:
    """Tool name -> (its one argument, implementation)."""
    if use_offline:
        return {
            "get_rubbish_category": ("keyword", offline("get_rubbish_category", "keyword")),
            "get_song_information": ("keyword", offline("get_song_information", "keyword")),
            "get_cartoon_information": ("title", offline("get_cartoon_information", "title")),
        }
    return {
        "get_rubbish_category": ("keyword", rubbish_online),
        "get_song_information": ("keyword", song_online),
        "get_cartoon_information": ("title", cartoon_online),
    }


def run_tool(functions: dict[str, tuple[str, Callable[[str], str]]], name: str, arguments: str) -> str:
    """Run one call; every failure (unknown tool, bad arguments, lookup error) is output text."""
    if name not in functions:
        return f"工具调用失败: 没有名为 {name} 的工具"
    argument, function = functions[name]
    try:
        args = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        return f"工具调用失败: 参数不是合法的 JSON ({exc})"
    value = args.get(argument) if isinstance(args, dict) else None
    if not isinstance(value, str) or not value:
        return f"工具调用失败: 缺少字符串参数 {argument}"
    try:
        return function(value)
    except ToolError as exc:
        return f"工具调用失败: {exc}"
    except Exception as exc:  # a tool must never take the agent down
        return f"工具调用失败: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------
# The agent loop


def ask(client: Any, args: argparse.Namespace, question: str, functions: dict[str, Any]) -> str | None:
    """Answer one question, printing each tool call and result; None if no answer in max rounds."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": question},
    ]
    print(f"question: {question}", flush=True)
    offer_tools = True
    for _ in range(args.max_rounds):
        request: dict[str, Any] = {
            "model": args.model,
            "messages": messages,
            "temperature": args.temperature,
            "max_tokens": args.max_tokens,
        }
        if offer_tools:
            request["tools"] = TOOLS
        message = client.chat.completions.create(**request).choices[0].message
        calls = message.tool_calls or []
        if not calls:
            return message.content or ""
        messages.append(
            {
                "role": "assistant",
                "content": message.content,
                "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                    for c in calls
                ],
            }
        )
        for call in calls:
            print(f"tool call: {call.function.name} {call.function.arguments}", flush=True)
            result = run_tool(functions, call.function.name, call.function.arguments)
            print("tool result: " + result.replace("\n", " | "), flush=True)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT_PREFIX + result})
        offer_tools = args.keep_tools
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("questions", nargs="*", metavar="QUESTION", help="questions to ask (default: the seed's three)")
    parser.add_argument("--base-url", default="http://localhost:8000/v1", help="server URL, with /v1 (default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or "none", help="API key (default: $OPENAI_API_KEY or 'none')")
    parser.add_argument("--model", default="Qwen1.5-4B-agent", help="served model name (default: %(default)s)")
    parser.add_argument("--offline", action="store_true", help="answer tool calls from canned local data instead of web APIs")
    parser.add_argument("--keep-tools", action="store_true", help="offer the tools on every request, not only until the first results")
    parser.add_argument("--max-rounds", type=int, default=5, help="requests per question at most (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=512, help="max tokens per answer (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default: %(default)s)")
    args = parser.parse_args(argv)

    import openai

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout, max_retries=1)
    functions = tool_functions(args.offline)
    failed = 0
    for question in args.questions or SEED_QUESTIONS:
        try:
            answer = ask(client, args, question, functions)
        except openai.OpenAIError as exc:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return 2
        if answer is None:
            print(f"no answer: still calling tools after {args.max_rounds} requests", flush=True)
            failed += 1
        else:
            print(f"answer: {answer}", flush=True)
        print(flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
