"""Child of test_trainer_inbox's SIGKILL test: stores records START.. into the inbox at DIR,
printing `stored N` (flushed) after each one the inbox answered "stored", until killed.

Every 10th record is a session record (for the session of the stones after it), so kills land
in session stores too.  Records are made before `ready`, so kills land in stores, not in encoding.
    python tests/inbox_kill_child.py DIR START COUNT
"""

from __future__ import annotations

import sys
from pathlib import Path

from sorterd.link.records import Record
from sorterd.trainer.inbox import open_inbox
from tests.inbox_records import session, stone


def record(n: int) -> Record:
    """Record number n of the test's sequence (the parent recomputes keys with the same rule)."""
    if n % 10 == 0:
        return session(session_id=f"2026-03-01_{n // 10:03d}")
    return stone(n, session=f"2026-03-01_{n // 10:03d}")


def stone_key(n: int) -> tuple[str, str, str]:
    """The key of stone record n (n % 10 != 0), without making its images."""
    return ("press1", "2026-03-01_morning", f"S{n:06d}")


def main() -> None:
    root, start, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    records = [(n, record(n)) for n in range(start, start + count)]
    inbox = open_inbox(root)
    print("ready", flush=True)
    for n, rec in records:
        result = inbox.store(rec.sorter_id, rec)
        print(f"{result.status} {n}", flush=True)
    inbox.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
