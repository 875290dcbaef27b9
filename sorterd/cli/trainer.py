"""`sorterd trainer`: the training PC's end of the link -- flagged stones from the sorters into a §7.1 dataset.

    sorterd trainer --data DIR --key TRAINER.key_secret --allowed DIR [--bind tcp://127.0.0.1:5591]
                    [--metrics-port N]

Composes `sorterd.link.server.LinkServer` (CurveZMQ ROUTER, ZAP allow-list: one sorter public key
file per sorter in --allowed, its stem the sorter id) with the inbox `sorterd.trainer.inbox`
(imported when the command runs).  Binds to localhost unless --bind says otherwise.

Exit status: 0 never (it serves until stopped); 2 bad input (key, allow-list, address);
5 the inbox module is missing from this install; 130/143 stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from sorterd.link.server import DEFAULT_ENDPOINT

log = logging.getLogger(__name__)
EXIT_BAD_INPUT, EXIT_MISSING = 2, 5


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    t = sub.add_parser("trainer", help="receive flagged stones from sorters (the link's trainer end, §5.1)")
    t.add_argument("--data", required=True, type=Path, help="the §7.1 dataset directory the stones go into")
    t.add_argument("--bind", default=DEFAULT_ENDPOINT, metavar="ENDPOINT",
                   help=f"ZeroMQ endpoint to listen on (default {DEFAULT_ENDPOINT}: this machine only; "
                        "e.g. tcp://0.0.0.0:5591 for the workshop network)")
    t.add_argument("--key", required=True, type=Path, metavar="PATH",
                   help="the trainer's secret key file (sorterd keys generate --name trainer; mode 0600)")
    t.add_argument("--allowed", required=True, type=Path, metavar="DIR",
                   help="directory of the allowed sorters' public key files (NAME.key: NAME is the sorter id)")
    t.add_argument("--metrics-port", type=int, metavar="N", help="serve Prometheus metrics on this port")
    t.set_defaults(func=cmd_trainer)


def cmd_trainer(args: argparse.Namespace) -> int:
    from sorterd.link.keys import KeyFileError, load_allowed, load_secret

    try:
        public, secret = load_secret(args.key)
        allowed, problems = load_allowed(args.allowed)
    except KeyFileError as exc:
        print(f"sorterd trainer: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for p in problems:
        print(f"sorterd trainer: warning: --allowed: {p}", file=sys.stderr)
    if not allowed:
        print(f"sorterd trainer: warning: --allowed {args.allowed}: no sorter keys yet: nobody can connect",
              file=sys.stderr)
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        print(f"sorterd trainer: --metrics-port {args.metrics_port}: a port in [0, 65535]", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        from sorterd.trainer.inbox import open_inbox  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        print(f"sorterd trainer: the inbox (sorterd.trainer.inbox) is not in this install: {exc}", file=sys.stderr)
        return EXIT_MISSING
    return asyncio.run(_serve(args, public, secret, open_inbox(args.data)))


async def _serve(args: argparse.Namespace, public: bytes, secret: bytes, inbox: Any) -> int:
    import zmq

    from sorterd.link.server import LinkServer, ServerCollector

    server = LinkServer(args.bind, public, secret, args.allowed, inbox)
    stopped: list[int] = []
    loop = asyncio.get_running_loop()

    def stop(sig: int) -> None:
        stopped.append(sig)
        server.close()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    metrics = None
    try:
        try:
            await server.start()
        except zmq.ZMQError as exc:
            print(f"sorterd trainer: --bind {args.bind}: cannot listen there: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.metrics_port is not None:
            from prometheus_client import CollectorRegistry, start_http_server

            registry = CollectorRegistry()
            registry.register(ServerCollector(server))
            metrics = start_http_server(args.metrics_port, registry=registry)
        print(f"sorterd trainer: listening on {server.endpoint}, data in {args.data}", file=sys.stderr)
        await server.run()
    finally:
        server.close()
        inbox.close()
        if isinstance(metrics, tuple):
            metrics[0].shutdown()
    return 128 + stopped[0] if stopped else 0
