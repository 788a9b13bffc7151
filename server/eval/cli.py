"""`agent-server eval`: argument parsing and the two modes (run datasets / compare two reports).

Only the standard library is imported at module level: `server.cli` registers this subcommand for every
`agent-server` invocation, and `serve` must neither wait for nor need the `eval` extra (openai, tqdm,
matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import pathlib
import sys
import time

from server.eval.cases import DatasetError
from server.eval.compare import ReportError, compare_chart, compare_table, load_report
from server.eval.datasets import KINDS, load_dataset


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `eval` subcommand on `agent-server`'s subparsers."""
    cmd = sub.add_parser(
        "eval",
        help="measure function calling through an OpenAI-compatible server (BFCL, glaive, ACEBench)",
        description="Send each case of the datasets to /v1/chat/completions with its tools, judge the answers "
        "by BFCL's AST rules and write a report; or compare two reports.",
    )
    cmd.add_argument("--base-url", help="the server's OpenAI base URL, e.g. http://localhost:8000/v1")
    cmd.add_argument("--api-key", default="EMPTY", help="API key sent as a bearer token (default EMPTY)")
    cmd.add_argument("--model", help="model name to send (default: the first one the server lists)")
    cmd.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="KIND:PATH",
        help=f"a data file; KIND is one of {', '.join(KINDS)} (repeatable)",
    )
    cmd.add_argument("--report", metavar="OUT.json", help="where to write the JSON report")
    cmd.add_argument(
        "--no-bfcl-hint",
        action="store_true",
        help="send BFCL function descriptions as written, without the ' Note that the provided function is in "
        "Python 3 syntax.' BFCL appends (its include_language_specific_hint=False)",
    )
    cmd.add_argument("--limit", type=int, help="only the first N cases of each dataset")
    cmd.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    cmd.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    cmd.add_argument("--max-tokens", type=int, help="max_tokens per request (default: the server's)")
    cmd.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    cmd.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="show two reports side by side instead")
    cmd.add_argument("--chart", metavar="OUT.png", help="with --compare: also draw the accuracies as a PNG chart")


def _compare(args: argparse.Namespace) -> None:
    a, b = (load_report(path) for path in args.compare)
    labels = (pathlib.Path(args.compare[0]).stem, pathlib.Path(args.compare[1]).stem)
    if labels[0] == labels[1]:
        labels = ("A", "B")
    print(compare_table(a, b, labels))
    if args.chart:
        compare_chart(a, b, labels, args.chart)
        print(f"chart: {args.chart}")


def _run(args: argparse.Namespace) -> None:
    from server.eval.report import build_report, format_table, write_report
    from server.eval.runner import ClientOptions, run_cases

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    if args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    # Every file is read and checked before the first request.
    datasets = [load_dataset(spec, bfcl_language_hint=not args.no_bfcl_hint) for spec in args.dataset]
    if args.limit is not None:
        datasets = [dataclasses.replace(d, cases=d.cases[: args.limit]) for d in datasets]
    options = ClientOptions(
        base_url=args.base_url,
        api_key=args.api_key,
        model=args.model,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout,
    )
    started = time.time()
    cases = [case for d in datasets for case in d.cases]
    model, results = asyncio.run(run_cases(cases, options, concurrency=args.concurrency, progress=not args.no_progress))
    runs, start = [], 0
    for dataset in datasets:
        runs.append((dataset, results[start : start + len(dataset.cases)]))
        start += len(dataset.cases)
    meta = {
        "base_url": args.base_url,
        "model": model,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "limit": args.limit,
        "bfcl_language_hint": not args.no_bfcl_hint,
        "concurrency": args.concurrency,
        "started_at": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 2),
    }
    report = build_report(runs, meta)
    write_report(report, args.report)
    print(format_table(report))
    print(f"report: {args.report} ({len(report['failures'])} failing cases in it)")


def run_eval(args: argparse.Namespace) -> None:
    """Entry point from `server.cli`; bad input exits with a one-line message naming the culprit."""
    if args.compare:
        runner = _compare
    else:
        missing = [flag for flag, value in (("--base-url", args.base_url), ("--dataset", args.dataset), ("--report", args.report)) if not value]
        if missing:
            sys.exit(f"agent-server eval: {', '.join(missing)} required (or --compare A.json B.json)")
        runner = _run
    try:
        import openai
    except ImportError:
        sys.exit('agent-server eval: needs the eval extra: pip install "agent-server[eval]"')
    try:
        runner(args)
    except (DatasetError, ReportError, ValueError, RuntimeError, openai.OpenAIError) as exc:
        sys.exit(f"agent-server eval: {exc}")
