"""The link end to end, as an operator runs it: helpers shared by tests/test_link_e2e.py and
bench/link_soak.py (issue 10's Done-when; §5.1).

Everything goes through the real commands in their own processes: `sorterd keys generate`,
`sorterd trainer --data DIR --key K --allowed DIR --bind tcp://127.0.0.1:PORT`, and
`sorterd run --config C.toml` where C.toml is the shipped sorterd/configs/sim.toml with a
`[link]` section (and any other overrides) merged in.  The checks read what each side wrote
down: the sorter's stones.db (flagged = 1 classified rows), its outbox.db, and the trainer's
unlabelled.jsonl (one line per stored stone, keyed (sorter_id, batch, sorter_stone_id)).
"""

from __future__ import annotations

import collections
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import tomllib

from sorterd import config
from sorterd.link.outbox import DB_NAME, Outbox
from sorterd.link.records import StoneRecord
from sorterd.sorting.record import read_rows

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
# ~20 % flagged (issue 10's soak): the shipped sim flags ~2 %; a stone is flagged when its combined
# confidence is below decision.sort_confidence, so raising it (0.80 -> SOAK_SORT_CONFIDENCE)
# flags the least confident fifth of the same lot.  Measured by the soak (bench/RESULTS.md).
SOAK_SORT_CONFIDENCE = 0.97
StoneKey = tuple[str, str, str]  # (sorter_id, batch, stone_id): the link's idempotency key


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def sorterd(*args: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    """`sorterd ARGS` in a child process (this checkout's code), output captured."""
    return subprocess.run([PY, "-m", "sorterd", *map(str, args)], capture_output=True, text=True, env=env(),
                          check=False, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Keys:
    """A workshop's key files as the README says to lay them out: the trainer's pair, one pair per
    sorter, and the trainer's allow-list holding a copy of each sorter's public key."""

    root: Path
    sorters: tuple[str, ...]

    @property
    def trainer_secret(self) -> Path:
        return self.root / "trainer" / "trainer.key_secret"

    @property
    def trainer_public(self) -> Path:
        return self.root / "trainer" / "trainer.key"

    @property
    def allowed(self) -> Path:
        return self.root / "allowed"

    def sorter_secret(self, name: str) -> Path:
        return self.root / name / f"{name}.key_secret"


def make_keys(root: Path, sorters: tuple[str, ...]) -> Keys:
    """`sorterd keys generate` for the trainer and each sorter; each sorter's .key copied to allowed/."""
    keys = Keys(root, sorters)
    for name in ("trainer", *sorters):
        done = sorterd("keys", "generate", "--name", name, "--dir", root / name)
        assert done.returncode == 0, done.stderr
    keys.allowed.mkdir(parents=True)
    for name in sorters:
        (keys.allowed / f"{name}.key").write_bytes((root / name / f"{name}.key").read_bytes())
    return keys


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is a JSON string for what we write
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_config(path: Path, overrides: Mapping[str, Mapping[str, object]]) -> Path:
    """sorterd/configs/sim.toml with `overrides` merged in, section by section, written to `path`."""
    doc: dict[str, dict[str, Any]] = tomllib.loads(config.sim_config_path().read_text())
    for section, values in overrides.items():
        doc.setdefault(section, {}).update(values)
    lines = []
    for section, values in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def sorter_config(path: Path, work: Path, name: str, keys: Keys, port: int, *, link: bool = True,
                  sorting: Mapping[str, Mapping[str, object]] | None = None) -> Path:
    """A simulated sorter `name` with its log dir and outbox under `work`, sending to 127.0.0.1:port."""
    over: dict[str, dict[str, object]] = {
        "machine": {"name": name}, "record": {"log_dir": str(work / "logs")}, "metrics": {"enabled": False},
        "link": {"enabled": link, "sorter_id": name, "trainer": f"tcp://127.0.0.1:{port}",
                 "trainer_key": str(keys.trainer_public), "secret_key": str(keys.sorter_secret(name)),
                 "outbox_dir": str(work / "outbox"), "heartbeat_s": 0.5, "reconnect_max_s": 1.0,
                 "ack_timeout_s": 5.0}}
    for section, values in (sorting or {}).items():
        over.setdefault(section, {}).update(values)
    return write_config(path, over)


def run_args(cfg: Path, *extra: str | Path) -> list[str]:
    return [PY, "-m", "sorterd", "run", "--config", str(cfg), "--no-progress", *map(str, extra)]


class Trainer:
    """`sorterd trainer` in a child process; started, killed, restarted on the same dataset."""

    def __init__(self, data: Path, keys: Keys, port: int, log: Path, nice: int = 0) -> None:
        self.data, self.keys, self.port, self.log = data, keys, port, log
        self.nice = nice  # > 0: a trainer sharing the sorter's box yields it the CPU (as if on its own PC)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self._log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [*(["nice", "-n", str(self.nice)] if self.nice else []), PY, "-m", "sorterd", "trainer", "--data", str(self.data), "--key", str(self.keys.trainer_secret),
             "--allowed", str(self.keys.allowed), "--bind", self.endpoint],
            stdout=self._log, stderr=subprocess.STDOUT, env=env())
        wait_for(lambda: b"listening on" in self.log.read_bytes() or self.proc is None or self.proc.poll() is not None,
                 timeout, "the trainer to listen")
        assert self.proc.poll() is None, self.log.read_text()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self.kill()


def wait_for(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    """Poll `cond` until it holds (never a fixed sleep: the box is shared and loaded)."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def dataset_keys(data: Path) -> list[StoneKey]:
    """Every stone in the trainer's queue, as its key, in arrival order (duplicates kept)."""
    q = data / "unlabelled.jsonl"
    if not q.exists():
        return []
    out = []
    for line in q.read_bytes().split(b"\n")[:-1]:  # a torn last line (a killed trainer) is not a stone yet
        d = json.loads(line)
        out.append((d["sorter_id"], d["batch"], d["sorter_stone_id"]))
    return out


def duplicates(keys: list[StoneKey]) -> list[StoneKey]:
    return [k for k, n in collections.Counter(keys).items() if n > 1]


def flagged_in_batches(log_dir: Path, sorter_id: str) -> set[StoneKey]:
    """The sorter's own list of what it must send: flagged = 1 classified rows of every stones.db."""
    out: set[StoneKey] = set()
    for db in sorted(log_dir.glob("batch_*/stones.db")):
        batch = db.parent.name.removeprefix("batch_")
        out |= {(sorter_id, batch, r["stone_id"]) for r in read_rows(db) if r["flagged"] and r["p_blue"] is not None}
    return out


def outbox_pending(directory: Path) -> set[StoneKey]:
    """Open the outbox as the next run would (it must open clean, SQLite's integrity check too) and
    return the keys of the stones waiting in it."""
    with sqlite3.connect(directory / DB_NAME) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    box = Outbox(directory, 10**9)
    try:
        return {r.key for r in box.pending(100_000, frozenset()) if isinstance(r, StoneRecord)}
    finally:
        box.close()


def outbox_entries(directory: Path) -> int:
    """Open the outbox as the next run would (it must open clean) and say how many entries wait."""
    box = Outbox(directory, 10**9)
    try:
        return box.depth()[0]
    finally:
        box.close()
