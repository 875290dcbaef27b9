"""Files written by atomic rename: a reader, or a process killed at any instant, sees the old file or the new one.

Every state file on both sides (manifests, session metadata, calibration
profiles and baselines, reference frames, recorded frames) goes through here
(DESIGN §4a).  The bytes go to a temporary file in the target's own directory
(os.replace is only atomic within one filesystem), which is then renamed over
the target.  Files are mode 0644 whatever the umask of the writer: the daemon,
the trainer and an operator's tools may run as different users.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

FILE_MODE = 0o644


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, durably (fsync before the rename).

    NaN and infinity are refused (ValueError): they are not JSON, and the
    files are read by other tools.
    """
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    _replace(path, text.encode("utf-8"), durable=True)


def write_png_atomic(path: Path, image: np.ndarray) -> None:
    """Write ``image`` as a lossless PNG (BGR as OpenCV holds it).

    Not fsynced: frames are bulk data written by the dozen per second while
    recording, where a flush per file would stall an SD card; the rename alone
    already means no reader ever sees half an image.
    """
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    _replace(path, buf.tobytes(), durable=False)


def _replace(path: Path, payload: bytes, *, durable: bool, before_rename: Callable[[], None] | None = None) -> None:
    """Write payload to a temp file beside path, then rename it over path; the temp never survives a
    failure the process lives through (a SIGKILL or a power cut leaves it: `.<name>.*.tmp`, which the
    owner of the directory removes at its start, e.g. `ReleaseStore.clean_staging`, `engine_cache.clean`)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, payload: bytes, *, before_rename: Callable[[], None] | None = None) -> None:
    """Write raw bytes durably (fsync before the rename): engines, golden arrays, anything a
    reader must see whole or not at all.  `before_rename` is called once the temporary file is
    whole and fsynced, just before the rename (the engine cache's crash point `engine.writing`)."""
    _replace(path, payload, durable=True, before_rename=before_rename)


def copy_synced(src: Path, dst: Path) -> None:
    """Copy file `src` to `dst` and fsync the copy's data (its name: `fsync_dir` on dst's folder)."""
    shutil.copyfile(src, dst)
    fsync_path(dst)


def fsync_dir(path: Path) -> None:
    """Make the names in directory `path` durable (a rename into it, a new file): POSIX
    puts a file's name in its directory, which has its own fsync."""
    fsync_path(path)


def fsync_path(path: Path) -> None:
    """fsync a file's data, or a directory's names, by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
