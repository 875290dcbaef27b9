"""Logs to journald with structured fields, when the daemon runs under systemd.

`journalctl -u sorterd STONE_ID=S000123` or `journalctl -u sorterd STAGE=record` then find a
stone's or a stage's lines.  Fields sent with every line: MESSAGE, PRIORITY (syslog levels),
SYSLOG_IDENTIFIER=sorterd, LOGGER, THREAD_NAME, CODE_FILE/CODE_LINE/CODE_FUNC, and:

  SORTER    machine.name of the run             (set_context, once the run knows it)
  BATCH     the batch folder's name             (set_context)
  STAGE     the stage that logged: `extra={"stage": ...}`, else the logger's last part
  STONE_ID  the stone concerned, where there is one: `extra={"stone_id": ...}`

Under systemd, stderr is connected to the journal and $JOURNAL_STREAM holds its device and
inode (systemd.exec(5)); only then are lines sent to the journal, otherwise they go to stderr
as before.  They are sent with systemd-python's `systemd.journal.send` when installed (the
`systemd` extra), or else over the journal's native protocol -- one datagram to
/run/systemd/journal/socket, each field `KEY=value\\n`, or, for a value with a newline,
`KEY\\n` + its length as 64-bit little-endian + the value + `\\n`
(https://systemd.io/JOURNAL_NATIVE_PROTOCOL/, a stable interface).  A line the journal cannot
take is dropped, never blocking or failing the sorter (the socket is non-blocking).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
MAX_MESSAGE = 48_000  # a line longer than this is cut: one datagram must carry it

_context: dict[str, str] = {}  # SORTER, BATCH: written by set_context (loop thread), read by any


def set_context(*, sorter: str | None = None, batch: str | None = None) -> None:
    """Fields every later line carries (the run's sorter and batch)."""
    for key, value in (("SORTER", sorter), ("BATCH", batch)):
        if value is None:
            _context.pop(key, None)
        else:
            _context[key] = value


def under_journal(env: Mapping[str, str] = os.environ, fd: int | None = None) -> bool:
    """Is stderr the journal?  $JOURNAL_STREAM is "<device>:<inode>" of the stream systemd gave us."""
    value = env.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno() if fd is None else fd)
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _priority(levelno: int) -> int:
    """syslog priority of a logging level."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def encode(fields: Mapping[str, str]) -> bytes:
    """One native-protocol datagram."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class NativeSender:
    """Sends datagrams to the journal's socket (non-blocking: a full journal drops the line)."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self.dropped = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._lock = threading.Lock()

    def __call__(self, fields: Mapping[str, str]) -> None:
        try:
            with self._lock:
                self._sock.sendto(encode(fields), self.path)
        except OSError:
            self.dropped += 1

    def close(self) -> None:
        self._sock.close()


def _systemd_python_sender() -> Callable[[Mapping[str, str]], None] | None:
    try:
        from systemd import journal  # type: ignore[import-not-found,attr-defined]
    except ImportError:
        return None

    def send(fields: Mapping[str, str]) -> None:
        rest = dict(fields)
        journal.send(rest.pop("MESSAGE"), **rest)

    return send


class JournalHandler(logging.Handler):
    """A logging handler whose records become journal entries with the fields above."""

    def __init__(self, sender: Callable[[Mapping[str, str]], None] | None = None, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.sender = sender or _systemd_python_sender() or NativeSender()

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        stage = getattr(record, "stage", None) or record.name.rsplit(".", 1)[-1]
        out = {"MESSAGE": message[:MAX_MESSAGE], "PRIORITY": str(_priority(record.levelno)),
               "SYSLOG_IDENTIFIER": "sorterd", "LOGGER": record.name, "THREAD_NAME": record.threadName or "",
               "CODE_FILE": record.pathname, "CODE_LINE": str(record.lineno), "CODE_FUNC": record.funcName,
               "STAGE": str(stage), **_context}
        stone = getattr(record, "stone_id", None)
        if stone is not None:
            out["STONE_ID"] = str(stone)
        return out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sender(self.fields(record))
        except Exception:  # noqa: BLE001 -- logging never takes the sorter down
            self.handleError(record)


def configure(level: int, fmt: str) -> None:
    """The root logger: the journal under systemd, stderr otherwise."""
    if under_journal():
        logging.basicConfig(level=level, handlers=[JournalHandler()])
    else:
        logging.basicConfig(level=level, format=fmt)
