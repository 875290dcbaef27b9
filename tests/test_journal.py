"""Journal logging (sorterd/journal.py): the native protocol against a fake journal socket."""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from sorterd import journal


def parse(datagram: bytes) -> dict[str, str]:
    """The journal's side of the native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL)."""
    out, i = {}, 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = nl + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", datagram[nl + 1:nl + 9])
            value = datagram[nl + 9:nl + 9 + size]
            assert datagram[nl + 9 + size:nl + 10 + size] == b"\n"
            i = nl + 10 + size
        out[key.decode()] = value.decode()
    return out


@pytest.fixture
def fake_journal(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "journal.sock"))
    sock.settimeout(5.0)
    yield sock
    sock.close()


def _logger(handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger("sorterd.sorting.pipeline.test_journal")
    log.propagate = False
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)
    return log


def test_a_stone_line_reaches_the_journal_with_its_fields(tmp_path: Path, fake_journal: socket.socket) -> None:
    sender = journal.NativeSender(str(tmp_path / "journal.sock"))
    log = _logger(journal.JournalHandler(sender))
    journal.set_context(sorter="sorter-7", batch="2024-05-01_sorter-7_080000")
    try:
        log.warning("%s: deadline miss (%s): falls to REJECT", "S000042", "late", extra={"stone_id": "S000042",
                                                                                         "stage": "eject"})
        got = parse(fake_journal.recv(65536))
    finally:
        journal.set_context()
        sender.close()
    assert got["MESSAGE"] == "S000042: deadline miss (late): falls to REJECT"
    assert (got["STONE_ID"], got["STAGE"], got["SORTER"], got["BATCH"]) == (
        "S000042", "eject", "sorter-7", "2024-05-01_sorter-7_080000")
    assert got["PRIORITY"] == "4" and got["SYSLOG_IDENTIFIER"] == "sorterd"
    assert got["CODE_FILE"] == __file__ and got["CODE_FUNC"] == "test_a_stone_line_reaches_the_journal_with_its_fields"


def test_a_traceback_travels_as_one_multiline_field(tmp_path: Path, fake_journal: socket.socket) -> None:
    sender = journal.NativeSender(str(tmp_path / "journal.sock"))
    log = _logger(journal.JournalHandler(sender))
    try:
        try:
            raise ValueError("bad\nframe")
        except ValueError:
            log.exception("capture failed")
        got = parse(fake_journal.recv(65536))
    finally:
        sender.close()
    assert got["MESSAGE"].startswith("capture failed\nTraceback") and "ValueError: bad\nframe" in got["MESSAGE"]
    assert got["PRIORITY"] == "3" and got["STAGE"] == "test_journal"  # no stage given: the logger's last part
    assert "STONE_ID" not in got and "SORTER" not in got


def test_a_journal_that_is_gone_drops_the_line_without_failing(tmp_path: Path) -> None:
    sender = journal.NativeSender(str(tmp_path / "nobody.sock"))
    log = _logger(journal.JournalHandler(sender))
    log.error("nobody listens")
    sender.close()
    assert sender.dropped == 1


def test_only_the_stream_systemd_gave_is_the_journal(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as f:
        st = os.fstat(f.fileno())
        assert journal.under_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f.fileno())
        assert not journal.under_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f.fileno())
        assert not journal.under_journal({}, f.fileno())
        assert not journal.under_journal({"JOURNAL_STREAM": "garbage"}, f.fileno())
