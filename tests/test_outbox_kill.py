"""The outbox opens clean after a SIGKILL at any instant (§4a: disk before ack; nothing lost).

A child process writes and acknowledges records as fast as it can, saying on stdout each
record its future reported durable ("D key") and each ack before it asks for it ("A key").
It is killed at a random moment, 22 times over, on the same outbox.  After every kill the
database must open, pass SQLite's integrity check, hold every record reported durable and
not acknowledged, and show no half-written record (an entry without all its images, an
image without its entry, a size that does not add up).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sorterd.link.outbox import DB_NAME, Outbox
from sorterd.link.records import SESSION_IMAGES, STONE_IMAGES

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import random, sys
from pathlib import Path
import numpy as np
from sorterd.link.outbox import Outbox
from sorterd.link.records import SessionRecord, StoneRecord

directory, rnd, seed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
img = np.random.default_rng(seed)
box = Outbox(directory, 10**9, queue_size=8)
print("ready", flush=True)
durable = []

def images(names, px):
    return {n: img.integers(0, 256, (px, px, 3), dtype=np.uint8) for n in names}

for i in range(100000):
    if i % 25 == 0:
        rec = SessionRecord("sorter-1", rnd, f"s{i}", {"session_id": f"s{i}", "pixels_per_mm": 20.0})
        fut = box.submit_session(rec, images(("reference_backlit", "reference_toplit"), 64))
        session = f"s{i}"
    else:
        rec = StoneRecord("sorter-1", rnd, f"S{i:06d}", session, "", "t", "v", (0.5, 0.3, 0.2), (0.6, 0.3, 0.1),
                          "FLIP", "FLIP", 0.5, 2.0, 0.8, rng.choice(["flagged", "drift"]), 20.0, 6.4)
        fut = box.submit_stone(rec, images(("backlit_crop", "toplit_crop", "backlit_full", "toplit_full"), 24))
    if fut is None:
        continue
    if fut.result():
        print("D " + "|".join(rec.key), flush=True)
        durable.append(rec.key)
    if durable and rng.random() < 0.3:
        key = durable.pop(rng.randrange(len(durable)))
        print("A " + "|".join(key), flush=True)
        box.acknowledged(key)
"""


def _check_db(path: Path) -> set[tuple[str, str, str]]:
    """The database is whole; returns the keys it holds."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        keys = set()
        for entry, sorter, batch, ident, kind, meta, size in conn.execute(
                "SELECT id, sorter_id, batch, ident, kind, meta, size FROM entries"):
            images = dict(conn.execute("SELECT name, length(png) FROM images WHERE entry = ?", (entry,)).fetchall())
            assert set(images) == set(SESSION_IMAGES if kind == "session" else STONE_IMAGES), (ident, images)
            assert size == len(meta) + sum(images.values()), ident
            json.loads(meta)
            keys.add((sorter, batch, ident))
        orphans = conn.execute("SELECT COUNT(*) FROM images WHERE entry NOT IN (SELECT id FROM entries) "
                               "AND entry NOT IN (SELECT id FROM refused)").fetchone()[0]
        assert orphans == 0
        return keys
    finally:
        conn.close()


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_durable(tmp_path: Path) -> None:
    rng = random.Random(20261203)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    durable: set[tuple[str, str, str]] = set()
    acked: set[tuple[str, str, str]] = set()
    kills = 0
    for rnd in range(22):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), f"r{rnd}", str(rnd)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready", child.stderr.read() if child.stderr else ""
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        out, err = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL, err
        kills += 1
        for line in out.splitlines():
            tag, _, key = line.partition(" ")
            k = tuple(key.split("|"))
            assert len(k) == 3, line  # a line cut short by the kill never reaches here: print flushes whole lines
            (durable if tag == "D" else acked).add(k)  # type: ignore[arg-type]
        held = _check_db(tmp_path / DB_NAME)
        missing = durable - acked - held
        assert not missing, f"round {rnd}: durable records lost: {sorted(missing)[:5]}"
        # A record committed whose "D" line the kill cut off: the child waits for each record, so
        # at most one per round (never acknowledged: it stays).
        undeclared = [k[1] for k in held - durable]
        assert len(undeclared) == len(set(undeclared)), undeclared
        box = Outbox(tmp_path, 10**9)  # and the outbox itself opens on it
        assert box.depth()[0] == len(held)
        box.close()
    assert kills >= 20
    assert len(durable) > 50, "the child barely wrote anything: the kills proved little"

