"""A full or failing disk under the production log (sorting/record.Recorder): the writer survives,
retries when space returns, keeps rows in a bounded buffer, counts what it loses, and the stop is
bounded.  The disk is a real 3 MB tmpfs where mounting is allowed, else a failing SQLite connection
(the real library's class with its writes refused or hung)."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from sorterd.metrics import Metrics
from sorterd.sorting.record import (
    ImageJob,
    Recorder,
    RecordError,
    StoneRow,
    UnseenRow,
    open_db,
    read_rows,
    read_unseen,
)


def row(i: int) -> StoneRow:
    return StoneRow(
        stone_id=f"S{i:06d}", capture_seq=i, t_trigger_ns=i, t_backlit_ns=i, t_toplit_ns=i, t_decided_ns=i,
        x_mm=1.0, y_mm=1.0, speed_mm_s=500.0, size_mm=2.5, length_mm=3.0, cluster=0,
        p_blue=0.9, p_light=0.05, p_inky=0.05, p_transparent=0.9, p_translucent=0.05, p_opaque=0.05,
        color="blue", clarity="transparent", confidence=0.9, bin="CUT", route="CUT", reason="sorted",
        flagged=0, deadline_miss=0, planned_on_ns=None, planned_off_ns=None, actual_on_ns=None,
        actual_off_ns=None, valve_status="fired", model_version="v001", wall_time="2026-12-02T10:00:00")


class Disk:
    """What the recorder's SQLite connection writes to: it can fill up or hang inside a write."""

    def __init__(self) -> None:
        self.full = False
        self.hung = threading.Event()
        self.released = threading.Event()

    def write(self) -> None:
        if self.hung.is_set():
            self.released.wait(30.0)
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")

    def connect(self, path: Path) -> sqlite3.Connection:
        disk = self

        class OnDisk(sqlite3.Connection):
            def executemany(self, sql: str, params: Any, /) -> sqlite3.Cursor:
                disk.write()
                return super().executemany(sql, params)

        return open_db(path, OnDisk)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def submit_all(rec: Recorder, rows: Sequence[StoneRow]) -> None:
    """Submit rows no faster than the writer takes them off the queue (no queue overflow)."""
    for r in rows:
        wait_for(lambda: rec.depth == 0, "the writer to take the queue")
        assert rec.submit(r)


def spilled_ids(batch: Path) -> list[str]:
    path = batch / "stones.spill.jsonl"
    return [json.loads(line)["stone_id"] for line in path.read_text().splitlines()] if path.exists() else []


def db_ids(batch: Path) -> list[str]:
    return [r["stone_id"] for r in read_rows(batch / "stones.db")]


def test_refused_rows_are_kept_and_written_when_the_disk_takes_them_again(tmp_path: Path) -> None:
    disk = Disk()
    rec = Recorder(tmp_path, 0.01, 50, connect=disk.connect)
    disk.full = True
    submit_all(rec, [row(i) for i in range(20)])
    rec.submit(UnseenRow(7, 8, "w", "passed unseen: test"))
    wait_for(lambda: rec.stalled and rec.buffered == 21, "the writer to hold the refused rows")
    assert rec._db_thread.is_alive() and rec.rows_written == 0 and rec.errors >= 1
    disk.full = False
    wait_for(lambda: rec.rows_written == 20, "the retry")
    assert not rec.stalled and rec.unseen_written == 1
    rec.close()
    assert db_ids(tmp_path) == [f"S{i:06d}" for i in range(20)]
    assert [u["trigger_ns"] for u in read_unseen(tmp_path / "stones.db")] == [7]
    assert rec.records_lost() == 0 and rec.rows_spilled == 0 and spilled_ids(tmp_path) == []


def test_rows_beyond_the_buffer_go_to_the_spill_file_and_none_is_missing(tmp_path: Path) -> None:
    disk = Disk()
    rec = Recorder(tmp_path, 0.01, 10, connect=disk.connect)
    disk.full = True
    submitted = [row(i) for i in range(25)]
    submit_all(rec, submitted)
    wait_for(lambda: rec.rows_spilled == 15, "the overflow to be spilled")
    disk.full = False
    wait_for(lambda: rec.rows_written == 10, "the buffered rows to be written")
    rec.close()
    in_db, spilled = db_ids(tmp_path), spilled_ids(tmp_path)
    assert not set(in_db) & set(spilled)
    assert sorted(in_db + spilled) == [r.stone_id for r in submitted]
    assert rec.records_lost() == 0


def test_what_neither_the_database_nor_the_spill_file_takes_is_counted_lost(tmp_path: Path) -> None:
    disk = Disk()
    (tmp_path / "stones.spill.jsonl").mkdir()  # the spill file cannot be written either
    rec = Recorder(tmp_path, 0.01, 10, connect=disk.connect)
    metrics = Metrics()
    metrics.watch_recorder(rec)
    disk.full = True
    submit_all(rec, [row(i) for i in range(25)])
    wait_for(lambda: rec.lost_counts()["rows"] == 15, "the overflow to be counted")
    assert rec._db_thread.is_alive()
    scrape = generate_latest(metrics.registry).decode()
    assert 'sorterd_record_lost_total{what="rows"} 15.0' in scrape
    assert "sorterd_record_writer_stalled 1.0" in scrape
    rec.close()  # the disk is still full: the buffered ten are lost too, and counted
    assert rec.lost_counts()["rows"] == 25 == rec.records_lost()
    assert rec.summary()["lost"]["rows"] == 25 and rec.summary()["rows_written"] == 0


def test_close_is_bounded_with_the_writer_stuck_in_the_disk_and_a_tiny_queue(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk = Disk()
    disk.hung.set()
    rec = Recorder(tmp_path, 0.01, 10, connect=disk.connect, close_timeout_s=0.3)
    taken = [rec.submit(row(i)) for i in range(40)]  # the writer hangs in its first commit: the queue fills
    assert taken.count(False) == rec.rows_overflow > 0
    assert len([r for r in caplog.records if "record queue full" in r.getMessage()]) == 1  # not one per stone
    closer = threading.Thread(target=rec.close)
    closer.start()
    closer.join(15.0)
    try:
        assert not closer.is_alive(), "Recorder.close hung on a stuck writer"
        assert rec.lost_counts()["rows"] == 40  # nothing reached the disk, and every row is accounted for
    finally:
        disk.released.set()


def test_images_yield_to_rows_below_the_free_space_floor(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, 0.01, 50, min_free_bytes=1 << 62)  # more than any disk has
    (tmp_path / "thumbnails").mkdir()
    (tmp_path / "flagged").mkdir()
    img = np.zeros((20, 40, 3), np.uint8)
    for i in range(3):
        rec.submit_images(ImageJob(f"S{i:06d}", img, {"backlit": img, "toplit": img} if i == 0 else None))
        rec.submit(row(i))
    rec.close()
    assert db_ids(tmp_path) == ["S000000", "S000001", "S000002"]
    assert not list((tmp_path / "thumbnails").iterdir()) and not list((tmp_path / "flagged").iterdir())
    lost = rec.lost_counts()
    assert (lost["thumbnails"], lost["flagged_images"], rec.images_low_disk) == (3, 1, 4)
    assert rec.records_lost() == 0  # images are not stone records


def test_a_failing_image_write_is_counted_and_the_image_writer_goes_on(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, 0.01, 50)
    (tmp_path / "thumbnails").write_text("")  # a file where the folder should be: every write fails
    (tmp_path / "flagged").mkdir()
    img = np.zeros((20, 40, 3), np.uint8)
    for i in range(3):
        rec.submit_images(ImageJob(f"S{i:06d}", img, None))
    rec.submit_images(ImageJob("S000003", None, {"backlit": img}))
    rec.close()
    assert rec.lost_counts()["thumbnails"] == 3 and rec.errors == 3
    assert (tmp_path / "flagged" / "S000003_backlit.png").exists()  # written after the failures


def test_an_unopenable_database_is_one_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "stones.db").mkdir()
    with pytest.raises(RecordError, match=r"cannot open the batch database .*stones\.db: unable to open"):
        Recorder(tmp_path, 0.01, 50)


# -- a real full disk -------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs (root and a kernel that lets this process mount; skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte with a ballast file."""
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)
    return ballast


def test_a_real_full_disk_is_survived_and_rows_are_written_once_space_returns(small_disk: Path) -> None:
    batch = small_disk / "batch"
    (batch / "thumbnails").mkdir(parents=True)
    (batch / "flagged").mkdir()
    rec = Recorder(batch, 0.01, 200)
    ballast = fill(small_disk)
    noise = np.random.default_rng(1).integers(0, 255, (96, 192, 3), np.uint8)
    rows = [row(i) for i in range(100)]
    for r in rows:
        rec.submit_images(ImageJob(r.stone_id, noise, {"backlit": noise}))
        rec.submit(r)
    wait_for(lambda: rec.stalled, "the database to refuse a write")
    wait_for(lambda: rec._images.qsize() == 0, "the image writer to get through its queue")
    assert rec._db_thread.is_alive() and rec._img_thread.is_alive()
    assert rec.lost_counts()["flagged_images"] > 0  # counted, not a dead thread
    ballast.unlink()
    wait_for(lambda: rec.rows_written + rec.rows_spilled == 100, "the rows to reach the disk")
    rec.close()
    in_db, spilled = db_ids(batch), spilled_ids(batch)
    assert sorted(in_db + spilled) == [r.stone_id for r in rows] and not set(in_db) & set(spilled)
    assert rec.records_lost() == 0


# -- the daemon -------------------------------------------------------------

SIM_RUN = ["run", "--sim", "--stones", "30", "--rate", "20", "--seed", "3", "--no-progress", "--metrics-port", "0"]


def test_an_unopenable_database_ends_the_run_at_start_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from sorterd.cli import EXIT_CANNOT_RECORD, main
    from sorterd.cli import run as run_module

    def batch_with_a_folder_for_its_database(log_dir: Path, name: str) -> Path:
        path = make_batch_dir(log_dir, name)
        (path / "stones.db").mkdir()
        return path

    make_batch_dir = run_module.make_batch_dir
    monkeypatch.setattr(run_module, "make_batch_dir", batch_with_a_folder_for_its_database)
    assert main([*SIM_RUN, "--log-dir", str(tmp_path)]) == EXIT_CANNOT_RECORD
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "stones.db" in line]
    assert len(lines) == 1 and lines[0].startswith("sorterd: cannot record: cannot open the batch database ")


@pytest.mark.slow
def test_the_run_stops_in_bounded_time_with_a_stuck_writer_and_a_tiny_queue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The sorter goes on and stops; every stone's lost row is counted, and the exit code says so."""
    from sorterd.cli import EXIT_RECORDS_LOST, main
    from sorterd.cli import run as run_module

    disk = Disk()
    disk.hung.set()

    class StuckRecorder(Recorder):
        def __init__(self, batch_dir: Path, commit_interval_s: float, _queue_size: int, *args: Any, **kw: Any) -> None:
            super().__init__(batch_dir, commit_interval_s, 10, *args, **kw, connect=disk.connect, close_timeout_s=0.5)

    monkeypatch.setattr(run_module, "Recorder", StuckRecorder)
    code: list[int | BaseException] = []

    def sort() -> None:
        try:
            code.append(main([*SIM_RUN, "--log-dir", str(tmp_path), "--json", str(tmp_path / "s.json")]))
        except BaseException as exc:  # noqa: BLE001 -- reported by the assertion below, not lost in the thread
            code.append(exc)

    runner = threading.Thread(target=sort)
    runner.start()
    runner.join(180.0)
    try:
        assert not runner.is_alive(), "the run hung on a stuck record writer"
    finally:
        disk.released.set()
    assert code == [EXIT_RECORDS_LOST]
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["stones_fed"] == 30 and s["objects_decided"] > 0
    assert s["record"]["lost"]["rows"] == s["objects_decided"]  # not one row reached the disk, all counted
    assert s["record"]["rows_overflow"] > 0
    assert "stone records lost" in capsys.readouterr().err
