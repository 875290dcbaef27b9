"""`sorterd keys generate --name NAME --dir DIR [--kind link|release]`: a CurveZMQ key pair for the
link (sorterd/link/keys.py), or with `--kind release` an Ed25519 release-signing pair
(sorterd/release/keys.py: NAME.release.pub, NAME.release.key 0600).

Exit status: 0 written; 2 bad input (a bad name, an existing key, a directory that cannot be written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    k = sub.add_parser("keys", help="CurveZMQ key pairs for the link to the trainer")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    g = ksub.add_parser("generate", help="write NAME.key (public, 0644) and NAME.key_secret (0600) in DIR")
    g.add_argument("--name", required=True, help="the key's name: a sorter's id (its file stem in the trainer's "
                                                 "allow-list), or e.g. 'trainer'")
    g.add_argument("--dir", required=True, type=Path, help="where to write the two files (created if missing)")
    g.add_argument("--kind", choices=("link", "release"), default="link",
                   help="link: CurveZMQ pair for the link (default); release: Ed25519 pair signing model releases")
    g.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from sorterd.link.keys import KeyFileError, generate
    from sorterd.release import keys as release_keys

    try:
        if args.kind == "release":
            public, secret = release_keys.generate(args.dir, args.name)
            print(f"{public}: release public key (list it in the sorters' [models] trusted_keys)")
            print(f"{secret}: release private key (mode 0600; stays on the trainer: sorterd models sign --key)")
            return 0
        public, secret = generate(args.dir, args.name)
    except KeyFileError as exc:
        print(f"sorterd keys generate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sorterd keys generate: --dir {args.dir}: cannot write there: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"{public}: public key (give it to the other side: a sorter's goes in the trainer's --allowed DIR)")
    print(f"{secret}: secret key (mode 0600; never copy it off this machine)")
    return 0
