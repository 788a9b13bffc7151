"""`agent-server serve|merge|render|eval|finetune` (also `python -m server`)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import MISSING, fields

from server.eval.cli import add_eval_parser, run_eval
from server.settings import ENV_PREFIX, Settings


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the OpenAI-compatible server")
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata.get('help', '')} (env {env}; default {default})"
        if str(f.type).startswith("bool"):
            serve.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            serve.add_argument(flag, type=kind, default=None, help=help_text)


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from server.api.app import create_app

    settings = Settings.from_env(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    if not settings.model and not settings.demo:
        sys.exit("agent-server serve: pass --model DIR (or --demo for the tiny offline demo model)")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,  # server.api.middleware logs each request with its request id
        timeout_graceful_shutdown=5,
    )


def merge(args: argparse.Namespace) -> None:
    """Merge a LoRA adapter into its base model and save model + tokenizer (the seed's merge step)."""
    from server.engine.builtin import load_model

    model, tokenizer = load_model(args.base, args.adapter, dtype=args.dtype, device="cpu")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"merged {args.adapter} into {args.base} -> {args.out}")


def render(args: argparse.Namespace) -> None:
    """Print the exact prompt a chat request (a JSON file, `-` for stdin) becomes, as
    POST /v1/chat/completions/render shows it: the first thing to look at when a fine-tune "does
    not call tools". Token ids need the model's tokenizer (`--tokenizer DIR`); the text does not."""
    import json

    from pydantic import ValidationError

    from prompts import load_format
    from server.api.chat import render_chat
    from server.api.errors import APIError
    from server.api.protocol import ChatCompletionRequest
    from server.format.render import PromptEncoder

    raw = sys.stdin.read() if args.request == "-" else open(args.request, encoding="utf-8").read()
    try:
        body = json.loads(raw)
        if isinstance(body, dict):
            body.setdefault("model", "")  # not checked here
        request = ChatCompletionRequest.model_validate(body)
        if args.tokenizer:
            from transformers import AutoTokenizer

            encoder = PromptEncoder.from_tokenizer(AutoTokenizer.from_pretrained(args.tokenizer))
        else:  # text only: the renderer's text does not depend on the tokenizer
            encoder = PromptEncoder({"<|im_start|>": 0, "<|im_end|>": 0, "<|endoftext|>": 0}, lambda text: [])
        prompt = render_chat(request, load_format(), encoder)
    except (json.JSONDecodeError, ValidationError) as exc:
        sys.exit(f"agent-server render: not a chat completion request: {exc}")
    except APIError as exc:
        sys.exit(f"agent-server render: {exc.param}: {exc.message}")
    sys.stdout.write(prompt.text + prompt.forced_prefix)
    if args.tokenizer:
        print(f"\n[{len(prompt.ids)} tokens] {prompt.ids}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="agent-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    merge_cmd = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    merge_cmd.add_argument("--base", required=True, help="base model directory")
    merge_cmd.add_argument("--adapter", required=True, help="LoRA adapter directory (peft)")
    merge_cmd.add_argument("--out", required=True, help="output directory")
    merge_cmd.add_argument("--dtype", default="auto", help="auto (fp32 on CPU), float32, bfloat16, float16")
    render_cmd = sub.add_parser("render", help="print the exact prompt a chat request (JSON file) becomes")
    render_cmd.add_argument("request", help="a /v1/chat/completions request body as JSON (- for stdin)")
    render_cmd.add_argument("--tokenizer", help="the model (or tokenizer) directory: also print the token ids on stderr")
    add_eval_parser(sub)
    from server.finetune import cli as finetune_cli  # imports torch: only when the CLI runs

    finetune_cli.add_parser(sub)
    args = parser.parse_args(argv)
    {"serve": serve, "merge": merge, "render": render, "eval": run_eval, "finetune": finetune_cli.run}[args.command](args)
