"""`sorterd review`: the review page (§3.1) on a §7.1 dataset, without the link.

    sorterd review --data DIR [--host 127.0.0.1] [--port 8765]

The same page `sorterd trainer --review-port N` serves beside the link (`sorterd.trainer.review`);
it needs the trainer extra (pip install -e '.[trainer]': aiohttp).  Binds to localhost unless
--host says otherwise.  Exit status: 2 bad input (no dataset, port taken, aiohttp missing);
130/143 stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

EXIT_BAD_INPUT = 2
DEFAULT_PORT = 8765


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a port number in [0, 65535] (0: any free port)")
    return value


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    r = sub.add_parser("review", help="the review page: label flagged stones in a browser (§3.1)")
    r.add_argument("--data", required=True, type=Path, help="the §7.1 dataset (the trainer's --data DIR)")
    r.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    r.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    r.set_defaults(func=cmd_review)


def cmd_review(args: argparse.Namespace) -> int:
    try:
        import aiohttp  # noqa: F401
    except ModuleNotFoundError:
        print("sorterd review: needs aiohttp: pip install -e '.[trainer]'", file=sys.stderr)
        return EXIT_BAD_INPUT
    from sorterd.trainer.labels import LabelError
    from sorterd.trainer.review.app import make_app

    try:
        app = make_app(args.data)
    except (LabelError, OSError) as exc:
        print(f"sorterd review: --data {args.data}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return asyncio.run(_serve(app, args.host, args.port))


async def _serve(app: web.Application, host: str, port: int) -> int:
    from sorterd.trainer.review.app import start_site

    try:
        runner, bound = await start_site(app, host, port)
    except OSError as exc:
        print(f"sorterd review: --host {host} --port {port}: cannot listen there: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"sorterd review: http://{host}:{bound}/", file=sys.stderr, flush=True)
    stopped: list[int] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stop(sig: int) -> None:
        stopped.append(sig)
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        await done.wait()
    finally:
        await runner.cleanup()
    return 128 + stopped[0]
