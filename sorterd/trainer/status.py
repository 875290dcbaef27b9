"""`sorterd trainer status --data DIR`: the per-sorter table, read from DIR/inbox/sorters.json.

The running trainer rewrites that file (atomically, at most once a second and at close);
this reads it without touching the inbox, so it works while the trainer runs or not.  The
release columns come from DIR/releases/results.json (`sorterd.trainer.releases.ReleaseBook`):
the release each sorter runs ("bundle": its configured one), the last offered to it, and its
last answer (accepted; refused or rolled-back with the check and why).  A
sorter is shown connected when its last heartbeat or record is within the file's
``connected_s`` of now (a trainer that is off shows every sorter disconnected).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sorterd.trainer.inbox import CONNECTED_S, SORTERS_FILE, STATE_DIR
from sorterd.trainer.releases import OfferError, describe, read_book

COLUMNS = ("sorter", "connected", "last seen", "stones", "sessions", "duplicates", "refused", "outbox", "release",
           "offered", "last release result")


class StatusError(ValueError):
    """No readable state under DIR (names the file and what is wrong)."""


def read_sorters(data: Path) -> tuple[float, dict[str, dict[str, Any]]]:
    """(connected_s, sorter -> saved fields) from DATA/inbox/sorters.json."""
    path = Path(data) / STATE_DIR / SORTERS_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StatusError(f"{path}: missing (no trainer inbox has run with --data {data})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StatusError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("sorters"), dict):
        raise StatusError(f"{path}: must hold {{\"sorters\": {{<sorter>: {{...}}}}}}")
    return float(saved.get("connected_s", CONNECTED_S)), saved["sorters"]


def status_table(data: Path, now: float | None = None) -> str:
    """The table, one row per sorter (sorted by id); raises StatusError."""
    try:
        book = read_book(data)
    except OfferError as exc:
        raise StatusError(str(exc)) from None
    try:
        connected_s, sorters = read_sorters(data)
    except StatusError:
        if not book:
            raise
        connected_s, sorters = CONNECTED_S, {}  # releases offered, no inbox state yet
    now = time.time() if now is None else now
    rows = [COLUMNS] + [_row(sid, sorters.get(sid, {}), now, connected_s) + describe(book.get(sid, {}))
                        for sid in sorted(set(sorters) | set(book))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _row(sid: str, f: dict[str, Any], now: float, connected_s: float) -> tuple[str, ...]:
    seen = f.get("last_seen")
    if isinstance(seen, (int, float)):
        ago = now - seen
        connected = "yes" if ago <= connected_s else "no"
        last = f"{datetime.fromtimestamp(seen).isoformat(timespec='seconds')} ({ago:.0f} s ago)"
    else:
        connected, last = "no", "never"
    outbox = f"{f.get('outbox_entries', 0)} ({f.get('outbox_bytes', 0) / 1e6:.1f} MB)"
    return (sid, connected, last, str(f.get("stones_received", 0)), str(f.get("sessions_received", 0)),
            str(f.get("duplicates", 0)), str(f.get("refused", 0)), outbox)


def status_main(data: Path) -> int:
    """Print the table; 0, or 2 with a one-line error when there is no state to show."""
    try:
        print(status_table(data))
    except StatusError as exc:
        print(f"sorterd trainer status: {exc}")
        return 2
    return 0
