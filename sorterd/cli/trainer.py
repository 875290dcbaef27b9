"""`sorterd trainer`: the training PC's end of the link -- flagged stones from the sorters into a §7.1 dataset.

    sorterd trainer --data DIR --key TRAINER.key_secret --allowed DIR [--bind tcp://127.0.0.1:5591]
                    [--metrics-port N] [--metrics-host 127.0.0.1] [--review-port N [--review-host 127.0.0.1]]
                    [--retrain-model BUNDLE [--retrain-every S] [--retrain-test-lots LOT,..] [--retrain-train-args A]]
    sorterd trainer status --data DIR      the sorters as the inbox last saw them (DIR/inbox/sorters.json)
                                           and the releases each runs (DIR/releases/results.json)

Composes `sorterd.link.server.LinkServer` (CurveZMQ ROUTER, ZAP allow-list: one sorter public key
file per sorter in --allowed, its stem the sorter id) with the inbox `sorterd.trainer.inbox`
(imported when the command runs), and with the release shelf `sorterd.trainer.releases`: the
newest signed release in DIR/releases/signed/<N>/ (`sorterd models offer`) is offered to every
sorter that runs an older one; what each answers is kept in DIR/releases/results.json.  Binds to localhost unless --bind says otherwise.  With
--review-port the same process serves the review page (`sorterd.trainer.review`, the trainer extra)
on the same dataset, as `sorterd review` would.  With --retrain-model the same process runs the §5.4
schedule (`sorterd.trainer.retrain.watch`: 500 new labels, weekly with >= 100, or the page's "retrain
now"), each run in a child process so the link and the page never wait; stopping the trainer ends a
run in progress (its status then reads "interrupted").

Exit status: 0 never (it serves until stopped); 2 bad input (key, allow-list, address, an
unreadable dataset); 130/143 stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sorterd.link.server import DEFAULT_ENDPOINT

if TYPE_CHECKING:
    from aiohttp import web

    from sorterd.trainer.inbox import Inbox
    from sorterd.trainer.releases import ReleaseBook

log = logging.getLogger(__name__)
EXIT_BAD_INPUT = 2


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    t = sub.add_parser("trainer", help="receive flagged stones from sorters (the link's trainer end, §5.1)")
    t.add_argument("action", nargs="?", choices=("serve", "status"), default="serve",
                   help="serve (default): receive from the sorters; status: print each sorter's state and exit")
    t.add_argument("--data", required=True, type=Path, help="the §7.1 dataset directory the stones go into")
    t.add_argument("--bind", default=DEFAULT_ENDPOINT, metavar="ENDPOINT",
                   help=f"ZeroMQ endpoint to listen on (default {DEFAULT_ENDPOINT}: this machine only; "
                        "e.g. tcp://0.0.0.0:5591 for the workshop network)")
    t.add_argument("--key", type=Path, metavar="PATH",
                   help="the trainer's secret key file (sorterd keys generate --name trainer; mode 0600)")
    t.add_argument("--allowed", type=Path, metavar="DIR",
                   help="directory of the allowed sorters' public key files (NAME.key: NAME is the sorter id)")
    t.add_argument("--metrics-port", type=int, metavar="N", help="serve Prometheus metrics on this port")
    t.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR",
                   help="address of the metrics endpoint (default 127.0.0.1: this machine only)")
    t.add_argument("--review-port", type=int, metavar="N",
                   help="also serve the review page (§3.1) on this port (needs the trainer extra: aiohttp)")
    t.add_argument("--review-host", default="127.0.0.1", metavar="ADDR",
                   help="address of the review page (default 127.0.0.1: this machine only)")
    t.add_argument("--retrain-model", type=Path, metavar="BUNDLE",
                   help="run the §5.4 retraining schedule, fine-tuning from this model bundle (the current model)")
    t.add_argument("--retrain-every", type=float, default=10.0, metavar="S",
                   help="with --retrain-model: seconds between checks of the trigger (default 10)")
    t.add_argument("--retrain-test-lots", default="", metavar="LOT[,LOT]",
                   help="with --retrain-model: held-out lots for sorterd train (default: its choice)")
    t.add_argument("--retrain-train-args", default="", metavar="ARGS",
                   help="with --retrain-model: more `sorterd train` options, one shell-quoted string")
    t.set_defaults(func=cmd_trainer)


def cmd_trainer(args: argparse.Namespace) -> int:
    from sorterd.link.keys import KeyFileError, load_allowed, load_secret

    if args.action == "status":
        from sorterd.trainer.status import status_main

        return status_main(args.data)
    missing = [flag for flag, value in (("--key", args.key), ("--allowed", args.allowed)) if value is None]
    if missing:
        print(f"sorterd trainer: {' and '.join(missing)} required to serve (the trainer's secret key file and the "
              "directory of allowed sorter public keys; see sorterd keys generate)", file=sys.stderr)
        return EXIT_BAD_INPUT
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
    if args.review_port is not None and not 0 <= args.review_port <= 65535:
        print(f"sorterd trainer: --review-port {args.review_port}: a port in [0, 65535]", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.retrain_model is not None:
        problem = _retrain_problem(args)
        if problem:
            print(f"sorterd trainer: {problem}", file=sys.stderr)
            return EXIT_BAD_INPUT
    from sorterd.trainer.inbox import InboxError, open_inbox

    try:
        inbox = open_inbox(args.data)
    except (InboxError, OSError) as exc:
        print(f"sorterd trainer: --data {args.data}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from sorterd.trainer.releases import OfferError, ReleaseBook, book_path

    try:
        book = ReleaseBook(book_path(args.data))  # what each sorter said of the releases offered
    except OfferError as exc:
        inbox.close()
        print(f"sorterd trainer: --data {args.data}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return asyncio.run(_serve(args, public, secret, inbox, book))


async def _serve(args: argparse.Namespace, public: bytes, secret: bytes, inbox: Inbox, book: ReleaseBook) -> int:
    import zmq

    from sorterd.link.server import LinkServer, ServerCollector
    from sorterd.trainer.releases import OfferShelf, signed_dir

    # Signed releases offered to the sorters: DATA/releases/signed/<N>/ (sorterd models offer).
    server = LinkServer(args.bind, public, secret, args.allowed, inbox, shelf=OfferShelf(signed_dir(args.data)),
                        ledger=book)
    stopped: list[int] = []
    loop = asyncio.get_running_loop()

    def stop(sig: int) -> None:
        stopped.append(sig)
        server.close()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    metrics = None
    review = None
    retrain: asyncio.Task[None] | None = None
    try:
        try:
            await server.start()
        except zmq.ZMQError as exc:
            print(f"sorterd trainer: --bind {args.bind}: cannot listen there: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.metrics_port is not None:
            # One endpoint: the link's figures join the inbox's own registry.
            inbox.metrics.registry.register(ServerCollector(server))
            port = inbox.metrics.serve(args.metrics_host, args.metrics_port)
            metrics = inbox.metrics
            print(f"sorterd trainer: metrics on http://{args.metrics_host}:{port}/metrics", file=sys.stderr)
        if args.review_port is not None:
            review = await _start_review(args)
            if review is None:
                return EXIT_BAD_INPUT
        if args.retrain_model is not None:
            retrain = asyncio.create_task(_retrain_watch(args), name="retrain-watch")
            print(f"sorterd trainer: retraining from {args.retrain_model} (§5.4 schedule, checked every "
                  f"{args.retrain_every:g} s)", file=sys.stderr)
        print(f"sorterd trainer: listening on {server.endpoint}, data in {args.data}", file=sys.stderr)
        await server.run()
    finally:
        if retrain is not None:
            retrain.cancel()
            await asyncio.gather(retrain, return_exceptions=True)
        if review is not None:
            await review.cleanup()
        server.close()
        inbox.close()
        if metrics is not None:
            metrics.close()
    return 128 + stopped[0] if stopped else 0


def _retrain_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the --retrain-* options (one line), or None."""
    if not (args.retrain_model / "manifest.json").is_file():
        return f"--retrain-model {args.retrain_model}: not a model bundle (no manifest.json); give the current model's folder"
    if not 1.0 <= args.retrain_every <= 86400.0:
        return f"--retrain-every {args.retrain_every:g}: seconds in [1, 86400]"
    try:
        shlex.split(args.retrain_train_args)
    except ValueError as exc:
        return f"--retrain-train-args {args.retrain_train_args!r}: not a shell-quoted string ({exc})"
    return None


async def _retrain_watch(args: argparse.Namespace) -> None:
    """`retrain.watch` until cancelled; a crash of the watcher is logged, the link and page serve on."""
    from sorterd.trainer import retrain as rt

    try:
        await rt.watch(args.data.resolve(), args.retrain_model.resolve(), interval_s=args.retrain_every,
                       test_lots=[s for s in args.retrain_test_lots.split(",") if s],
                       train_args=shlex.split(args.retrain_train_args))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("the retraining watcher stopped; the link and the page keep serving")


async def _start_review(args: argparse.Namespace) -> web.AppRunner | None:
    """The review page beside the link (None, with the reason printed, when it cannot start)."""
    try:
        from sorterd.trainer.labels import LabelError
        from sorterd.trainer.review.app import make_app, start_site
    except ModuleNotFoundError as exc:
        print(f"sorterd trainer: --review-port needs the trainer extra ({exc.name} missing): "
              "pip install -e '.[trainer]'", file=sys.stderr)
        return None
    try:
        runner, port = await start_site(make_app(args.data), args.review_host, args.review_port)
    except (LabelError, OSError) as exc:
        print(f"sorterd trainer: --review-host {args.review_host} --review-port {args.review_port}: {exc}",
              file=sys.stderr)
        return None
    print(f"sorterd trainer: review page on http://{args.review_host}:{port}/", file=sys.stderr)
    return runner
