"""`agent-server serve|merge|finetune` (also `python -m server`)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import MISSING, fields

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
            kind = int if str(f.type).startswith("int") else str
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="agent-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    merge_cmd = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    merge_cmd.add_argument("--base", required=True, help="base model directory")
    merge_cmd.add_argument("--adapter", required=True, help="LoRA adapter directory (peft)")
    merge_cmd.add_argument("--out", required=True, help="output directory")
    merge_cmd.add_argument("--dtype", default="auto", help="auto (fp32 on CPU), float32, bfloat16, float16")
    from server.finetune import cli as finetune_cli

    finetune_cli.add_parser(sub)
    args = parser.parse_args(argv)
    {"serve": serve, "merge": merge, "finetune": finetune_cli.run}[args.command](args)
