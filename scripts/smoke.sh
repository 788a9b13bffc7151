#!/usr/bin/env bash
# Smoke-test a running agent-server: health, models, chat, chat with tools, streaming.
#
#   scripts/smoke.sh BASE_URL [API_KEY]
#   scripts/smoke.sh http://localhost:8000
#   scripts/smoke.sh https://gpu-box.example:8000 "$AGENT_SERVER_API_KEY"
#
# BASE_URL is the server root (a trailing /v1 is accepted too). Prints one line per check,
# `ok   NAME` or `FAIL NAME: why`, and exits 1 if any check failed (2 on bad usage).
# With an API key it also checks that /v1/models refuses a request without it.
# Needs bash, curl and python3. Environment: SMOKE_TIMEOUT (seconds per request, default 120),
# SMOKE_MODEL (model name to request; default: the first one /v1/models lists).
set -u

if [ $# -lt 1 ] || [ $# -gt 2 ] || [ -z "$1" ]; then
    echo "usage: $0 BASE_URL [API_KEY]" >&2
    exit 2
fi
for tool in curl python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "FAIL setup: $tool not found" >&2; exit 2; }
done

base=${1%/}
base=${base%/v1}
key=${2:-}
timeout=${SMOKE_TIMEOUT:-120}
model=${SMOKE_MODEL:-}
failures=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

ok() { printf 'ok   %s\n' "$1"; }
fail() { printf 'FAIL %s: %s\n' "$1" "$2"; failures=$((failures + 1)); }

# request NAME METHOD PATH [BODY_FILE] [--no-auth]: the body goes to $work/NAME, the status to $status.
request() {
    local name=$1 method=$2 path=$3 body=${4:-} auth=${5:-}
    local args=(-sS -N --max-time "$timeout" -o "$work/$name" -w '%{http_code}' -X "$method")
    if [ -n "$key" ] && [ "$auth" != --no-auth ]; then
        args+=(-H "Authorization: Bearer $key")
    fi
    if [ -n "$body" ]; then
        args+=(-H 'Content-Type: application/json' --data-binary "@$body")
    fi
    status=$(curl "${args[@]}" "$base$path" 2>"$work/$name.err") || status="error"
}

# problem NAME EXPECTED_STATUS: why the last request did not get EXPECTED_STATUS (empty if it did).
problem() {
    if [ "$status" = error ]; then
        tr '\n' ' ' <"$work/$1.err" | sed 's/ *$//'
    elif [ "$status" != "$2" ]; then
        printf 'HTTP %s (expected %s): %s' "$status" "$2" "$(head -c 200 "$work/$1" 2>/dev/null | tr '\n' ' ')"
    fi
}

# check NAME PYTHON: run the Python check on the JSON body in $work/NAME (as `body`);
# it prints nothing when fine, else the reason.
check() {
    local name=$1 code=$2
    python3 - "$work/$name" <<EOF 2>&1 | head -c 400
import json, sys
text = open(sys.argv[1], encoding="utf-8").read()
try:
    body = json.loads(text)
except ValueError:
    print("not JSON: " + text[:200].replace("\n", " "))
    sys.exit()
try:
$(printf '%s\n' "$code" | sed 's/^/    /')
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}; body: " + text[:200].replace("\n", " "))
EOF
}

# verdict NAME EXPECTED_STATUS PYTHON: the status and the check together.
verdict() {
    local name=$1 expected=$2 code=$3 why
    why=$(problem "$name" "$expected")
    [ -z "$why" ] && why=$(check "$name" "$code")
    if [ -n "$why" ]; then fail "$name" "$why"; else ok "$name"; fi
}

# --- health: no auth, 200 {"status": "ok"}
request health GET /health
verdict health 200 'assert body.get("status") == "ok", "status is not ok"'

# --- models: the served model is listed (and its name used below)
request models GET /v1/models
verdict models 200 '
assert body.get("object") == "list", "object is not list"
assert body["data"] and body["data"][0]["id"], "no model listed"'
if [ -z "$model" ]; then
    model=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["data"][0]["id"])' "$work/models" 2>/dev/null) || model=""
    model=${model:-Qwen1.5-4B-agent}
fi

# --- auth: with a key configured, a request without it is refused
if [ -n "$key" ]; then
    request noauth GET /v1/models "" --no-auth
    verdict noauth 401 'assert body["error"]["message"], "no error message"'
fi

# --- request bodies (json.dumps, so any model name is quoted correctly)
MODEL="$model" python3 - "$work" <<'EOF'
import json, os, sys

work, model = sys.argv[1], os.environ["MODEL"]
system = "你是一个有用的小助手,请调用下面的工具来回答用户的问题,参考工具输出进行回答。"


def tool(name, description, prop, prop_description):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {prop: {"type": "string", "description": prop_description}}, "required": [prop]}}}


# The seed client's tools, byte for byte (the model was fine-tuned on prompts rendered from them).
tools = [
    tool("get_rubbish_category", "适用于生活垃圾分类时,判断物品属于哪种类型的垃圾?", "keyword", "物品名称,用于垃圾分类"),
    tool("get_cartoon_information", "根据用户提供的动漫标题,查询该动漫的相关信息。", "title", "动漫"),
    tool("get_song_information", "根据用户提供的歌曲名称,查询歌曲相关信息,包括歌手、时长、专辑名称等。", "keyword", "歌曲名称"),
]
bodies = {
    "chat": {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32, "temperature": 0},
    "chat-tools": {"model": model, "temperature": 0, "max_tokens": 64, "tools": tools, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": "鸡蛋壳属于哪种类型的垃圾?"}]},
    "stream": {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32, "temperature": 0,
               "stream": True},
}
for name, body in bodies.items():
    with open(os.path.join(work, name + ".json"), "w", encoding="utf-8") as f:
        json.dump(body, f, ensure_ascii=False)
EOF

# --- chat: a plain answer
request chat POST /v1/chat/completions "$work/chat.json"
verdict chat 200 '
choice = body["choices"][0]
assert choice["message"]["role"] == "assistant", "no assistant message"
assert isinstance(choice["message"]["content"], str), "content is not text"
assert choice["finish_reason"] in ("stop", "length"), "finish_reason " + repr(choice["finish_reason"])'

# --- chat-tools: the seed's rubbish question comes back as a tool call
request chat-tools POST /v1/chat/completions "$work/chat-tools.json"
verdict chat-tools 200 '
choice = body["choices"][0]
calls = choice["message"].get("tool_calls")
assert isinstance(calls, list) and calls, "no tool_calls in the answer: " + repr(choice["message"].get("content"))[:120]
names = {"get_rubbish_category", "get_cartoon_information", "get_song_information"}
for call in calls:
    assert call["function"]["name"] in names, "unknown tool " + repr(call["function"]["name"])
    assert isinstance(json.loads(call["function"]["arguments"]), dict), "arguments are not a JSON object"
assert choice["finish_reason"] == "tool_calls", "finish_reason " + repr(choice["finish_reason"])'

# --- stream: server-sent chunks ending in [DONE]
request stream POST /v1/chat/completions "$work/stream.json"
why=$(problem stream 200)
if [ -n "$why" ]; then
    fail stream "$why"
elif ! grep -q '"chat.completion.chunk"' "$work/stream"; then
    fail stream "no chat.completion.chunk event: $(head -c 200 "$work/stream" | tr '\n' ' ')"
elif ! grep -qx 'data: \[DONE\]' <(tr -d '\r' <"$work/stream"); then
    fail stream "the stream does not end with data: [DONE]: $(tail -c 200 "$work/stream" | tr '\n' ' ')"
else
    ok stream
fi

[ "$failures" -eq 0 ]
