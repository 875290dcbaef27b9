"""The trainer's inbox (sorterd.trainer.inbox): link records into a §7.1 dataset, durably and once."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from sorterd.data.dataset import _SAFE_ID, load_crops, open_dataset
from sorterd.data.session import SessionMeta
from sorterd.domain import uncertainty_score
from sorterd.link.records import STONE_IMAGES, RecordKey
from sorterd.trainer.inbox import (
    QUEUE_FILE,
    Disk,
    Inbox,
    dataset_session,
    dataset_stone_id,
    is_inbox_name,
    open_inbox,
    priority_boosts,
)
from sorterd.trainer.status import status_table
from tests.inbox_kill_child import stone_key
from tests.inbox_records import png, session, stone, with_image

REPO = Path(__file__).resolve().parent.parent


def queue(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / QUEUE_FILE).read_text().splitlines() if line.strip()]


def files_of(root: Path, line: dict) -> dict[str, Path]:
    sid, raw = line["stone_id"], root / "images" / "raw" / line["session_id"]
    return {"backlit_crop": root / "images/processed/backlit" / f"{sid}.png",
            "toplit_crop": root / "images/processed/toplit" / f"{sid}.png",
            "backlit_full": raw / "backlit" / f"{sid}.png", "toplit_full": raw / "toplit" / f"{sid}.png"}


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and p.parent.name != "inbox"}


def check_consistent(root: Path) -> set[RecordKey]:
    """Every queue line complete (its four files there, byte for byte), one line per key, no temp
    file, no uncommitted stone file; returns the stone keys in the queue."""
    lines = queue(root)
    keys = [(q["sorter_id"], q["batch"], q["sorter_stone_id"]) for q in lines]
    assert len(set(keys)) == len(keys), "a key twice in the queue"
    assert len({q["stone_id"] for q in lines}) == len(lines)
    for q in lines:
        for name, path in files_of(root, q).items():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == q["images"][name], f"{path} incomplete"
    assert not [p for p in root.rglob("*.tmp")], "a temp file survived the open"
    committed = {q["stone_id"] for q in lines}
    pngs = [p for p in root.rglob("*.png") if p.parent.name in ("backlit", "toplit") and is_inbox_name(p.stem)]
    assert {p.stem for p in pngs} <= committed, "a stone file without its queue line"
    return set(keys)


# -- ids -------------------------------------------------------------------------------


def test_dataset_ids_are_safe_deterministic_and_distinct() -> None:
    assert dataset_stone_id("press1", "2026-03-01_morning", "S000001") == "press1.2026-03-01_morning.S000001"
    assert dataset_session("press1", "2026-03-01_001") == "press1.2026-03-01_001"
    triples = [("a.b", "c", "S1"), ("a", "b.c", "S1"), ("a", "b", "c.S1"), ("a", "b", "c.S1x"),
               ("p" * 64, "b" * 64, "S000001"), ("p" * 64, "b" * 64, "S000002"), ("x.y", "b", "S1")]
    ids = [dataset_stone_id(*t) for t in triples]
    assert len(set(ids)) == len(ids)
    assert all(_SAFE_ID.match(i) for i in ids), ids
    assert all(is_inbox_name(i) for i in ids)
    assert ids == [dataset_stone_id(*t) for t in triples]  # the same on every call (and every trainer)
    assert not is_inbox_name("S000001") and not is_inbox_name("S000011.1")  # sim/rig stones are never touched


# -- a stored stone is a training example ----------------------------------------------


def test_reviewed_stones_load_through_the_dataset_api(tmp_path: Path) -> None:
    inbox = open_inbox(tmp_path)
    assert open_dataset(tmp_path).labels == []  # an empty inbox is already a (empty) dataset
    recs = [stone(1), stone(2), stone(3, sorter="press2")]
    assert inbox.store("press1", session()).status == "stored"
    for rec in recs:
        assert inbox.store(rec.sorter_id, rec).status == "stored"
    lines = queue(tmp_path)
    assert [q["sorter_stone_id"] for q in lines] == ["S000001", "S000002", "S000003"]
    # The review page's output: label lines for two of the stones, names taken from the queue.
    with open(tmp_path / "labels.jsonl", "a") as f:
        for q, color in zip(lines[::2], ("blue", "inky"), strict=True):
            f.write(json.dumps({"stone_id": q["stone_id"], "color": color, "clarity": "transparent",
                                "lot_id": q["lot_id"], "session_id": q["session_id"]}) + "\n")
    ds = open_dataset(tmp_path)
    assert [lab.stone_id for lab in ds.labels] == [lines[0]["stone_id"], lines[2]["stone_id"]]
    assert ds.crop_mm() == 6.4
    assert ds.sessions["press1.2026-03-01_001"].pixels_per_mm == 20.0  # press1's session record
    crops = load_crops(ds, ds.labels, 128)
    for k, rec in enumerate((recs[0], recs[2])):
        for m, name in enumerate(("backlit_crop", "toplit_crop")):
            sent = cv2.imdecode(np.frombuffer(rec.images[name], np.uint8), cv2.IMREAD_COLOR)
            assert np.array_equal(crops[k, :, :, 3 * m:3 * m + 3], sent[:, :, ::-1])
    meta = SessionMeta.from_json(tmp_path / "images/raw/press1.2026-03-01_001/session_meta.json")
    assert meta.session_id == "press1.2026-03-01_001" and meta.lot_id == "LOT-2026-007"


def test_two_sorters_stone_one_lands_as_two_stones(tmp_path: Path) -> None:
    inbox = open_inbox(tmp_path)
    a, b = stone(1, sorter="press1"), stone(1, sorter="press2")
    assert a.stone_id == b.stone_id == "S000001" and a.images != b.images
    assert inbox.store("press1", a).status == inbox.store("press2", b).status == "stored"
    # Their sessions share an id too (each sorter's first session of the day): two session folders.
    assert inbox.store("press1", session("press1")).status == inbox.store("press2", session("press2")).status == "stored"
    lines = queue(tmp_path)
    assert len({q["stone_id"] for q in lines}) == 2 and len({q["session_id"] for q in lines}) == 2
    for q, rec in zip(lines, (a, b), strict=True):
        assert (q["sorter_id"], q["batch"], q["sorter_stone_id"]) == rec.key
        assert files_of(tmp_path, q)["backlit_crop"].read_bytes() == rec.images["backlit_crop"]
    assert len(open_dataset(tmp_path).sessions) == 2  # read_sessions: no clash of session ids


def test_queue_line_fields_and_priority(tmp_path: Path) -> None:
    inbox = open_inbox(tmp_path)
    boundary = stone(1, p_color=(0.9, 0.05, 0.05), p_clarity=(0.5, 0.45, 0.05))  # CUT vs FLIP
    rare = stone(2, p_color=(0.1, 0.1, 0.8), p_clarity=(0.9, 0.05, 0.05), confidence=0.8)  # inky_transparent
    near = stone(3, p_color=(0.1, 0.78, 0.12), p_clarity=(0.05, 0.9, 0.05), confidence=0.78)  # light_translucent
    plain = stone(4, p_color=(0.1, 0.6, 0.3), p_clarity=(0.1, 0.6, 0.3), confidence=0.6)
    for rec in (boundary, rare, near, plain):
        inbox.store("press1", rec)
    lines = {q["sorter_stone_id"]: q for q in queue(tmp_path)}
    assert lines["S000001"]["boosts"] == ["cut_flip_boundary"]
    assert lines["S000002"]["boosts"] == ["rare_class"] and lines["S000002"]["predicted"] == "inky_transparent"
    assert lines["S000003"]["boosts"] == ["near_threshold"]
    assert lines["S000004"]["boosts"] == []
    for n, q in lines.items():
        rec = {"S000001": boundary, "S000002": rare, "S000003": near, "S000004": plain}[n]
        assert q["uncertainty"] == pytest.approx(uncertainty_score(rec.p_color, rec.p_clarity), abs=1e-6)
        assert q["priority"] >= q["uncertainty"]
        assert q["images"] == {k: hashlib.sha256(rec.images[k]).hexdigest() for k in STONE_IMAGES}
        assert q["lot_id"] == "LOT-2026-007" and q["model_version"] == "v003" and q["decision"] == "CUT"
    assert lines["S000001"]["priority"] - lines["S000001"]["uncertainty"] == pytest.approx(1.0)
    assert priority_boosts(boundary) == ["cut_flip_boundary"]


def test_uncertainty_score_is_the_5_3_formula() -> None:
    third = (1 / 3, 1 / 3, 1 / 3)
    assert uncertainty_score(third, third) == pytest.approx(1.0)
    assert uncertainty_score((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)) == pytest.approx(0.0, abs=1e-6)
    p = (0.9, 0.05, 0.05)
    h = -sum(x * np.log2(x) for x in p)
    assert uncertainty_score(p, third) == pytest.approx((h + np.log2(3)) / (2 * np.log2(3)))


# -- idempotency -----------------------------------------------------------------------


def test_same_key_is_stored_once_across_restarts(tmp_path: Path) -> None:
    inbox = open_inbox(tmp_path)
    rec, ses = stone(1), session()
    assert inbox.store("press1", rec).status == "stored"
    assert inbox.store("press1", ses).status == "stored"
    before = {p: p.stat().st_mtime_ns for p in all_files(tmp_path)}
    assert inbox.store("press1", rec).status == "duplicate"
    assert inbox.store("press1", ses).status == "duplicate"
    inbox.close()
    again = open_inbox(tmp_path)
    assert again.store("press1", rec).status == "duplicate"
    assert again.store("press1", replace(ses, batch="2026-03-01_evening")).status == "duplicate"  # same session
    assert {p: p.stat().st_mtime_ns for p in all_files(tmp_path)} == before  # nothing written again
    assert len(queue(tmp_path)) == 1
    state = again.sorters()["press1"]
    assert (state.stones_received, state.sessions_received, state.duplicates) == (1, 1, 4)


# -- refused ---------------------------------------------------------------------------


GOOD = stone(1)
REFUSED = {
    "truncated": (with_image(GOOD, "toplit_crop", GOOD.images["toplit_crop"][:-200]), "truncated"),
    "garbage": (with_image(GOOD, "backlit_full", b"\x89PNG\r\n\x1a\n" + b"\0" * 500 + b"IEND\xaeB`\x82"),
                "cannot be decoded"),
    "jpeg": (with_image(GOOD, "backlit_crop", cv2.imencode(".jpg", np.zeros((128, 128, 3), np.uint8))[1].tobytes()),
             "not a PNG"),
    "missing": (with_image(GOOD, "toplit_full", None), "missing toplit_full"),
    "extra": (with_image(GOOD, "thumbnail", GOOD.images["toplit_crop"]), "unknown thumbnail"),
    "tiny": (with_image(with_image(GOOD, "backlit_crop", png((8, 8), 1, 90)), "toplit_crop", png((8, 8), 2, 90)),
             "8x8 pixels, implausible"),
    "pair_sizes": (with_image(GOOD, "toplit_crop", png((96, 96), 1, 90)), "a pair's two images have one size"),
    "probs": (replace(GOOD, p_color=(0.9, 0.9, 0.1)), "p_color"),
    "nan": (replace(GOOD, confidence=float("nan")), "confidence"),
    "bin": (replace(GOOD, decision="MAYBE"), "decision 'MAYBE'"),
    "id": (replace(GOOD, stone_id="../../etc/passwd"), "stone_id '../../etc/passwd'"),
    "sorter": (replace(GOOD, sorter_id="press9"), "came from 'press1'"),
    "session_meta": (session(pixels_per_mm=None), "pixels_per_mm"),
    "session_meta_id": (replace(session(), meta={**session().meta, "session_id": "2026-03-01_009"}), "differs"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_with_a_reason_and_nothing_written(tmp_path: Path, case: str) -> None:
    inbox = open_inbox(tmp_path)
    before = all_files(tmp_path)
    rec, words = REFUSED[case]
    got = inbox.store("press1", rec)
    assert got.status == "refused" and words in got.reason, got
    assert "\n" not in got.reason
    assert all_files(tmp_path) == before and queue(tmp_path) == []
    assert inbox.sorters()["press1"].refused == 1
    assert sum(s.value for m in inbox.metrics.refused.collect() for s in m.samples if s.name.endswith("_total")) == 1
    assert inbox.store("press1", stone(2)).status == "stored"  # the inbox goes on


def test_crop_size_of_the_dataset_is_kept(tmp_path: Path) -> None:
    inbox = open_inbox(tmp_path)
    assert inbox.store("press1", stone(1)).status == "stored"
    got = inbox.store("press2", replace(stone(1, sorter="press2"), crop_mm=8.0))
    assert got.status == "refused" and "6.4 mm" in got.reason
    inbox.close()
    assert open_inbox(tmp_path).store("press2", replace(stone(2, sorter="press2"), crop_mm=8.0)).status == "refused"


# -- unavailable -----------------------------------------------------------------------


class FailingDisk(Disk):
    """The real disk, but the `at`-th call of `op` (and every later one while `broken`) raises `code`."""

    def __init__(self, op: str, at: int, code: int) -> None:
        self.op, self.at, self.code, self.calls, self.broken = op, at, code, 0, False

    def _maybe_fail(self, op: str, path: Path) -> None:
        if op == self.op:
            self.calls += 1
            if self.broken or self.calls == self.at:
                self.broken = True
                raise OSError(self.code, os.strerror(self.code), str(path))

    def write(self, path: Path, data: bytes) -> None:
        self._maybe_fail("write", path)
        super().write(path, data)

    def fsync_dir(self, path: Path) -> None:
        self._maybe_fail("fsync_dir", path)
        super().fsync_dir(path)

    def append(self, path: Path, data: bytes) -> None:
        self._maybe_fail("append", path)
        super().append(path, data)


@pytest.mark.parametrize(("op", "at", "code"), [
    ("write", 1, errno.ENOSPC), ("write", 3, errno.ENOSPC), ("write", 4, errno.EACCES),
    ("fsync_dir", 2, errno.EIO), ("append", 1, errno.ENOSPC), ("write", 2, errno.EROFS),
])
def test_disk_failure_is_unavailable_leaves_nothing_and_recovers(tmp_path: Path, op: str, at: int, code: int) -> None:
    inbox = open_inbox(tmp_path)
    assert inbox.store("press1", stone(1)).status == "stored"
    before = all_files(tmp_path)
    disk = FailingDisk(op, at, code)
    inbox.disk = disk
    got = inbox.store("press1", stone(2))
    assert got.status == "unavailable" and errno.errorcode[code] in got.reason, got
    assert all_files(tmp_path) == before, "a failed store left files behind"
    assert len(queue(tmp_path)) == 1
    assert inbox.metrics.unavailable._value.get() == 1
    disk.broken = False
    disk.at = -1  # the disk is back
    assert inbox.store("press1", stone(2)).status == "stored"
    assert check_consistent(tmp_path) == {stone(1).key, stone(2).key}


def test_append_cut_short_by_a_full_disk_leaves_no_torn_line(tmp_path: Path) -> None:
    inbox = open_inbox(tmp_path)
    inbox.store("press1", stone(1))

    class HalfWrite(Disk):
        def append(self, path: Path, data: bytes) -> None:  # the real append, the device full half-way
            real = os.write
            calls = []

            def short(fd: int, buf: memoryview | bytes) -> int:
                calls.append(1)
                if len(calls) > 1:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(fd, bytes(buf)[:len(buf) // 2])

            os.write = short  # type: ignore[assignment]
            try:
                super().append(path, data)
            finally:
                os.write = real

    inbox.disk = HalfWrite()
    assert inbox.store("press1", stone(2)).status == "unavailable"
    assert (tmp_path / QUEUE_FILE).read_bytes().endswith(b"\n") and len(queue(tmp_path)) == 1
    inbox.disk = Disk()
    assert inbox.store("press1", stone(2)).status == "stored"
    check_consistent(tmp_path)


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 3 MiB tmpfs (root only: mount); skipped where it cannot be mounted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_real_full_and_read_only_disk(small_fs: Path) -> None:
    root = small_fs / "data"
    inbox = open_inbox(root)
    stored: list[int] = []
    n = 1
    while True:  # fill the disk: ~200 KB a stone
        got = inbox.store("press1", stone(n))
        if got.status != "stored":
            break
        stored.append(n)
        n += 1
    assert got.status == "unavailable" and "ENOSPC" in got.reason and len(stored) >= 3
    assert check_consistent(root) == {stone(k).key for k in stored}  # the failed stone left nothing
    # Space comes back (the tmpfs grows; the data is untouched): the same stone is stored.
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_fs)], check=True)
    assert inbox.store("press1", stone(n)).status == "stored"
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    got = inbox.store("press1", stone(n + 1))
    assert got.status == "unavailable" and "EROFS" in got.reason
    subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    assert inbox.store("press1", stone(n + 1)).status == "stored"
    inbox.close()
    assert check_consistent(root) == {stone(k).key for k in [*stored, n, n + 1]}


# -- crash recovery --------------------------------------------------------------------


def test_torn_last_line_and_uncommitted_files_are_cleared_at_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inbox = open_inbox(tmp_path)
    for n in (1, 2):
        inbox.store("press1", stone(n))
    inbox.close()
    # A store killed mid-commit: its files in place, its queue line half-written, a temp file left.
    third = stone(3)
    sid = dataset_stone_id(*third.key)
    (tmp_path / "images/processed/backlit" / f"{sid}.png").write_bytes(third.images["backlit_crop"])
    (tmp_path / "images/processed/toplit" / f".{sid}.png.abc.tmp").write_bytes(b"half")
    whole = (tmp_path / QUEUE_FILE).read_bytes()
    with open(tmp_path / QUEUE_FILE, "ab") as f:
        f.write(b'{"stone_id": "' + sid.encode() + b'", "sorter_id": "pre')
    caplog.set_level("WARNING")
    again = open_inbox(tmp_path)
    assert (tmp_path / QUEUE_FILE).read_bytes() == whole
    assert any("torn last line" in r.message for r in caplog.records)
    assert check_consistent(tmp_path) == {stone(1).key, stone(2).key}
    assert again.store("press1", third).status == "stored"  # never acknowledged: stored when resent
    assert check_consistent(tmp_path) == {stone(1).key, stone(2).key, third.key}


def test_a_labelled_file_is_never_taken_for_an_orphan(tmp_path: Path) -> None:
    inbox = open_inbox(tmp_path)
    inbox.store("press1", stone(1))
    inbox.close()
    # A stone copied in by hand (with its label) under an inbox-like name, with no queue line.
    name = "bench1.2025-12-01_old.S000009"
    for mode in ("backlit", "toplit"):
        (tmp_path / "images/processed" / mode / f"{name}.png").write_bytes(stone(9).images["backlit_crop"])
    with open(tmp_path / "labels.jsonl", "a") as f:
        f.write(json.dumps({"stone_id": name, "color": "blue", "clarity": "opaque"}) + "\n")
    open_inbox(tmp_path)
    assert [lab.stone_id for lab in open_dataset(tmp_path).labels] == [name]


def test_middle_line_damage_is_an_error_naming_the_line(tmp_path: Path) -> None:
    from sorterd.trainer.inbox import InboxError

    inbox = open_inbox(tmp_path)
    inbox.store("press1", stone(1))
    inbox.store("press1", stone(2))
    lines = (tmp_path / QUEUE_FILE).read_text().splitlines()
    (tmp_path / QUEUE_FILE).write_text("\n".join(["{broken", lines[1]]) + "\n")
    with pytest.raises(InboxError, match=rf"{QUEUE_FILE}:1: not a queue line"):
        open_inbox(tmp_path)


def _expected_keys(reported: set[int]) -> tuple[set[RecordKey], set[str]]:
    stones = {stone_key(n) for n in reported if n % 10}
    sessions = {dataset_session("press1", f"2026-03-01_{n // 10:03d}") for n in reported if n % 10 == 0}
    return stones, sessions


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A trainer killed (SIGKILL) at >= 20 random moments while storing: after each restart every
    record it had answered "stored" is there and complete, nothing is there twice or in part."""
    caplog.set_level("INFO", logger="sorterd.trainer.inbox")
    repaired = 0  # restarts that found a store cut short (a temp file, uncommitted files, a torn line)
    rng = random.Random(10)
    root = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reported: set[int] = set()
    kills = 0
    start = 0
    while kills < 20:
        child = subprocess.Popen([sys.executable, str(REPO / "tests/inbox_kill_child.py"), str(root), str(start), "16"],
                                 stdout=subprocess.PIPE, env=env, text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        out = child.stdout.read().split()
        child.wait()
        kills += 1
        got = [int(n) for status, n in zip(out[0::2], out[1::2], strict=False) if status in ("stored", "duplicate")]
        reported |= set(got)
        caplog.clear()
        inbox = open_inbox(root)  # the restart: repairs, rebuilds the key set
        repaired += any(w in r.message for r in caplog.records for w in ("removing", "torn"))
        stones, sessions = _expected_keys(reported)
        assert stones <= check_consistent(root), "a record answered 'stored' was lost"
        for name in sessions:
            SessionMeta.from_json(root / "images/raw" / name / "session_meta.json")
        inbox.close()
        start = max(0, max(reported, default=-1) - 1)  # resend the last one or two (some were in flight)
    assert len(reported) >= 20, f"only {len(reported)} records stored over {kills} kills: the kills came too early"
    assert len(open_dataset(root).sessions) == len(_expected_keys(reported)[1])
    assert repaired >= 1, "no kill landed inside a store: the test did not test the commit order"


# -- per-sorter state, status, metrics -------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_772_000_000.0

    def __call__(self) -> float:
        return self.now


def test_sorter_state_status_table_and_metrics(tmp_path: Path) -> None:
    clock = Clock()
    inbox: Inbox = open_inbox(tmp_path, clock=clock, connected_s=10.0)
    inbox.sorter_seen("press1", 12, 3_400_000)
    inbox.store("press1", stone(1))
    inbox.store("press1", stone(1))
    inbox.store("press2", with_image(stone(1, sorter="press2"), "toplit_crop", b"nope"))
    st = inbox.sorters()
    assert (st["press1"].connected, st["press1"].stones_received, st["press1"].duplicates) == (True, 1, 1)
    assert (st["press1"].outbox_entries, st["press2"].refused) == (12, 1)
    reg = inbox.metrics.registry
    assert reg.get_sample_value("sorterd_trainer_received_total", {"sorter": "press1"}) == 1
    assert reg.get_sample_value("sorterd_trainer_duplicates_total", {"sorter": "press1"}) == 1
    assert reg.get_sample_value("sorterd_trainer_refused_total", {"sorter": "press2", "reason": "bad_image"}) == 1
    assert reg.get_sample_value("sorterd_trainer_sorter_connected", {"sorter": "press1"}) == 1
    assert reg.get_sample_value("sorterd_trainer_sorter_outbox_entries", {"sorter": "press1"}) == 12
    clock.now += 11
    assert not inbox.sorters()["press1"].connected
    assert reg.get_sample_value("sorterd_trainer_sorter_connected", {"sorter": "press1"}) == 0
    inbox.close()
    table = status_table(tmp_path, now=clock.now).splitlines()
    assert table[0].split()[:2] == ["sorter", "connected"]
    assert table[1].split()[:2] == ["press1", "no"] and " 12 (3.4 MB)" in table[1]
    assert status_table(tmp_path, now=clock.now - 5).splitlines()[1].split()[1] == "yes"
    # Counts survive a restart (received from the dataset itself, the rest from sorters.json).
    st = open_inbox(tmp_path, clock=clock).sorters()
    assert (st["press1"].stones_received, st["press1"].duplicates, st["press2"].refused) == (1, 1, 1)


def test_status_without_state_is_one_clear_line(tmp_path: Path) -> None:
    from sorterd.trainer.status import StatusError

    with pytest.raises(StatusError, match=r"sorters.json: missing \(no trainer inbox has run"):
        status_table(tmp_path)
