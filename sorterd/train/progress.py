"""Training progress for a person: one live line on a terminal, periodic lines in a log.

On a TTY the line is rewritten in place (carriage return) at most ~5 times a
second; epoch summaries stay on screen.  Elsewhere (CI, `nohup`, a pipe) a
batch line is printed at most every `log_every_s` seconds plus every epoch
summary, so a log file shows steady progress without a line per batch.

torch-free: it only formats what the trainer reports (`StepEvent`-shaped).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Protocol, TextIO

from sorterd.data.files import write_json_atomic


class StepLike(Protocol):
    """What the bar reads of a `sorterd.train.loop.StepEvent` (read-only)."""

    @property
    def epoch(self) -> int: ...
    @property
    def total_epochs(self) -> int: ...
    @property
    def phase(self) -> str: ...
    @property
    def batch(self) -> int: ...
    @property
    def n_batches(self) -> int: ...
    @property
    def loss(self) -> float: ...
    @property
    def color_acc(self) -> float: ...
    @property
    def clarity_acc(self) -> float: ...


class ProgressBar:
    """Feed it `step(event)` per batch and `line(text)` for messages; call `close()` at the end."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, log_every_s: float = 30.0,
                 enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.log_every_s = log_every_s
        self.enabled = enabled
        self._first: tuple[float, int] | None = None  # (time, steps done) at the first step seen
        self._last_draw = -float("inf")  # the first step is always shown
        self._live = False  # a live line is on screen and must be cleared first

    def step(self, e: StepLike) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        done = (e.epoch - 1) * e.n_batches + e.batch
        total = e.total_epochs * e.n_batches
        if self._first is None:
            # The rate is measured from the first batch: loading the data is not training time.
            self._first = (now, done)
        interval = 0.2 if self.tty else self.log_every_s
        if now - self._last_draw < interval and e.batch != e.n_batches:
            return
        self._last_draw = now
        text = (f"epoch {e.epoch}/{e.total_epochs} {e.phase:<5} batch {e.batch}/{e.n_batches} "
                f"loss {e.loss:.3f} colour {e.color_acc:.3f} clarity {e.clarity_acc:.3f} "
                f"{_eta(now - self._first[0], done - self._first[1], total - self._first[1])}")
        if self.tty:
            self._draw_live(f"{_bar(done / max(total, 1))} {text}")
        elif e.batch != e.n_batches:
            self._print(text)

    def line(self, text: str) -> None:
        """A message that stays (epoch summaries, warnings); per-batch trainer lines are dropped."""
        if not self.enabled or " batch " in text and " done " not in text:
            return
        self._print(text)

    def close(self) -> None:
        if self._live:
            self.stream.write("\n")
            self.stream.flush()
            self._live = False

    def _draw_live(self, text: str) -> None:
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r" + text[:width].ljust(width))
        self.stream.flush()
        self._live = True

    def _print(self, text: str) -> None:
        if self._live:
            self.stream.write("\r" + " " * (shutil.get_terminal_size((100, 20)).columns - 1) + "\r")
            self._live = False
        self.stream.write(text + "\n")
        self.stream.flush()


def _bar(fraction: float, width: int = 24) -> str:
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:3.0f}%"


def _eta(elapsed: float, done: int, total: int) -> str:
    """Elapsed and remaining time (planned epochs; early stopping may end sooner)."""
    if done <= 0:
        return f"{_clock(elapsed)}"
    remaining = elapsed / done * max(total - done, 0)
    return f"{_clock(elapsed)} elapsed, ~{_clock(remaining)} left"


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class JsonProgress:
    """The same steps, for a program: `path` rewritten atomically (`write_json_atomic`) at most every `every_s`.

    What `sorterd train --progress-json PATH` writes, and what `sorterd.trainer.retrain` reads
    for its status (the review page's progress bar):

        {"phase": "heads"|"full"|..., "epoch": 3, "epochs": 8, "batch": 12, "batches": 40,
         "fraction": 0.29, "elapsed_s": 41.0, "eta_s": 99.5, "loss": 0.61, "updated": <unix time>}

    ``eta_s`` is null until a batch has been timed (the planned epochs; early stopping may end
    sooner).  The last batch of every epoch is always written.
    """

    def __init__(self, path: Path, every_s: float = 1.0) -> None:
        self.path = path
        self.every_s = every_s
        self._first: tuple[float, int] | None = None
        self._last = -float("inf")

    def step(self, e: StepLike) -> None:
        now = time.monotonic()
        done = (e.epoch - 1) * e.n_batches + e.batch
        total = max(e.total_epochs * e.n_batches, 1)
        if self._first is None:
            self._first = (now, done)
        if now - self._last < self.every_s and e.batch != e.n_batches:
            return
        self._last = now
        elapsed, timed = now - self._first[0], done - self._first[1]
        eta = elapsed / timed * max(total - done, 0) if timed > 0 else None
        write_json_atomic(self.path, {
            "phase": e.phase, "epoch": e.epoch, "epochs": e.total_epochs, "batch": e.batch,
            "batches": e.n_batches, "fraction": round(done / total, 4), "elapsed_s": round(elapsed, 1),
            "eta_s": None if eta is None else round(eta, 1), "loss": round(float(e.loss), 4),
            "updated": time.time()})
