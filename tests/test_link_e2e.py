"""The link end to end (issue 10's Done-when, §5.1): real `sorterd trainer` and `sorterd run`
processes with keys made by `sorterd keys generate`, killed with SIGKILL, two sorters at once, a
trainer whose disk fills up.  Every check is against what each side wrote down: the sorter's
stones.db and outbox.db, the trainer's unlabelled.jsonl (tests/linke2e.py).

The invariant everywhere: every stone the sorter held durably reaches the trainer's dataset
exactly once -- 0 lost, 0 duplicated -- and every stone the trainer ACKed is in its dataset.
The soak (trainer offline for most of a 2x-rate run, RSS, misses) is bench/link_soak.py; its
short version runs here.
"""

from __future__ import annotations

import json
import random
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib
from linke2e import (
    PY,
    REPO,
    SOAK_SORT_CONFIDENCE,
    Keys,
    StoneKey,
    Trainer,
    dataset_keys,
    duplicates,
    env,
    flagged_in_batches,
    free_port,
    make_keys,
    outbox_pending,
    run_args,
    sorter_config,
    wait_for,
    write_config,
)

from sorterd.cli import build_parser
from sorterd.cli.compose import load_config
from sorterd.cli.run import _link_options

CHILD = REPO / "tests" / "link_kill_child.py"
FLAGGY = {"decision": {"sort_confidence": SOAK_SORT_CONFIDENCE}, "sim": {"clock": "wall", "rate_per_s": 40.0}}


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys", ("sorter-1", "sorter-2"))


@pytest.fixture
def trainer(tmp_path: Path, keys: Keys) -> Iterator[Trainer]:
    t = Trainer(tmp_path / "ds", keys, free_port(), tmp_path / "trainer.log")
    t.start()
    yield t
    t.stop()


class Child:
    """tests/link_kill_child.py: an Outbox + LinkClient; its D (durable) and A (acked) lines collected."""

    def __init__(self, tmp: Path, keys: Keys, trainer: Trainer, batch: str, n: int) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [PY, str(CHILD), str(tmp / "outbox"), str(keys.sorter_secret("sorter-1")), str(keys.trainer_public),
             trainer.endpoint, "sorter-1", batch, str(n)], stdout=subprocess.PIPE, text=True, env=env())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def keys(self, tag: str) -> set[StoneKey]:
        out = set()
        for line in list(self.lines):
            if line.startswith(tag + " "):
                k = tuple(line[2:].split(" ")[0].split("|"))
                if not k[2].startswith("session"):
                    out.add((k[0], k[1], k[2]))
        return out

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join(10)

    def finish(self, timeout: float) -> None:
        wait_for(lambda: "EMPTY" in self.lines or self.proc.poll() is not None, timeout, "the outbox to drain")
        assert "EMPTY" in self.lines, self.lines[-5:]
        assert self.proc.wait(30) == 0
        self._reader.join(10)


def exactly_once(data: Path, want: set[StoneKey]) -> None:
    got = dataset_keys(data)
    assert duplicates(got) == []
    missing, extra = want - set(got), set(got) - want
    assert not missing and not extra, (sorted(missing)[:5], sorted(extra)[:5])


@pytest.mark.slow
def test_sorter_killed_22_times_while_sending_every_stone_arrives_once(tmp_path: Path, keys: Keys,
                                                                      trainer: Trainer) -> None:
    rng = random.Random(10)
    durable: set[StoneKey] = set()
    acked: set[StoneKey] = set()
    for i in range(22):
        child = Child(tmp_path, keys, trainer, f"k{i:02d}", 25)
        wait_for(lambda c=child: "ready" in c.lines, 60, "the child to start")  # type: ignore[misc]
        time.sleep(rng.uniform(0.0, 2.5))  # a random moment: queueing, sending, between ack and removal
        child.kill()
        pending = outbox_pending(tmp_path / "outbox")  # opens clean, integrity ok, every time
        assert child.keys("D") - child.keys("A") <= pending | set(dataset_keys(trainer.data))
        # Durable: what the child said, and what the outbox holds (committed, killed before it said so,
        # or before the ack it had said it got was applied).
        durable |= child.keys("D") | child.keys("A") | pending
        acked |= child.keys("A")
    last = Child(tmp_path, keys, trainer, "last", 5)
    last.finish(180)
    durable |= last.keys("D")
    assert len(durable) > 100 and acked  # the kills landed while records were being made and sent
    assert outbox_pending(tmp_path / "outbox") == set()
    exactly_once(trainer.data, durable)


@pytest.mark.slow
def test_trainer_killed_mid_receive_loses_nothing_it_acked(tmp_path: Path, keys: Keys, trainer: Trainer) -> None:
    child = Child(tmp_path, keys, trainer, "t", 80)
    for kill in range(4):
        seen = len(dataset_keys(trainer.data))
        wait_for(lambda s=seen: len(dataset_keys(trainer.data)) >= s + 5, 120, "the trainer to store more")  # type: ignore[misc]
        trainer.kill()
        acked = child.keys("A")  # after the kill: nothing more can be acked
        assert acked <= set(dataset_keys(trainer.data)), f"kill {kill}: an acknowledged stone is not in the dataset"
        trainer.start()  # same dataset: it cuts a torn line, removes orphans, rebuilds its key set
    child.finish(240)
    exactly_once(trainer.data, child.keys("D"))
    assert len(child.keys("D")) == 80


@pytest.mark.slow
def test_real_sorter_killed_then_restarted_resends_what_it_held(tmp_path: Path, keys: Keys, trainer: Trainer) -> None:
    """`sorterd run` itself, SIGKILLed 3 times mid-batch on one outbox: what the outbox held at each
    kill arrives once; the last run drains; nothing arrives twice and every flagged stone of the
    last batch arrives."""
    cfg = sorter_config(tmp_path / "s1.toml", tmp_path, "sorter-1", keys, trainer.port, sorting=FLAGGY)
    rng = random.Random(3)
    held: set[StoneKey] = set()
    killed_batches = set()
    for i in range(3):
        proc = subprocess.Popen(run_args(cfg, "--stones", "400", "--seed", str(i + 1)), env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda n=i + 1: len(list((tmp_path / "logs").glob("batch_*/stones.db"))) >= n,  # type: ignore[misc]
                 120, "the run to start its batch")
        time.sleep(rng.uniform(1.0, 4.0))
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
        held |= outbox_pending(tmp_path / "outbox")
        killed_batches |= {p.name.removeprefix("batch_") for p in (tmp_path / "logs").glob("batch_*")}
    done = subprocess.run(run_args(cfg, "--stones", "60", "--seed", "9", "--link-drain", "120",
                                   "--json", tmp_path / "last.json"), env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "last.json").read_text())
    assert summary["link"]["pending"]["entries"] == 0 and outbox_pending(tmp_path / "outbox") == set()
    got = dataset_keys(trainer.data)
    assert duplicates(got) == []
    assert held <= set(got)
    every = flagged_in_batches(tmp_path / "logs", "sorter-1")
    last = {k for k in every if k[1] not in killed_batches}
    assert last and last <= set(got)
    assert {k for k in got if k[1] not in killed_batches} == last


@pytest.mark.slow
def test_two_sorters_into_one_trainer_each_stone_once_under_its_id(tmp_path: Path, keys: Keys,
                                                                   trainer: Trainer) -> None:
    procs, cfgs = [], {}
    for name in ("sorter-1", "sorter-2"):
        work = tmp_path / name
        cfgs[name] = sorter_config(tmp_path / f"{name}.toml", work, name, keys, trainer.port, sorting=FLAGGY)
        with (tmp_path / f"{name}.log").open("w") as log:  # a file: an unread pipe would stop the sorter
            procs.append(subprocess.Popen(run_args(cfgs[name], "--stones", "120", "--seed", "4", "--link-drain", "120",
                                                   "--json", work / "sum.json"), env=env(), stdout=log, stderr=log))
    for p, name in zip(procs, cfgs, strict=True):
        assert p.wait(300) == 0, (tmp_path / f"{name}.log").read_text()[-2000:]
    want: set[StoneKey] = set()
    for name in cfgs:
        mine = flagged_in_batches(tmp_path / name / "logs", name)
        assert mine and all(k[0] == name for k in mine)
        want |= mine
        assert json.loads((tmp_path / name / "sum.json").read_text())["link"]["pending"]["entries"] == 0
    exactly_once(trainer.data, want)
    # Same seed, same stone ids (S000001...) on both sorters: two distinct dataset stones each.
    lines = [json.loads(x) for x in (trainer.data / "unlabelled.jsonl").read_text().splitlines()]
    assert len({x["stone_id"] for x in lines}) == len(lines)
    assert all(x["stone_id"].startswith(x["sorter_id"] + ".") for x in lines)
    shared = {k[2] for k in want if k[0] == "sorter-1"} & {k[2] for k in want if k[0] == "sorter-2"}
    assert shared  # the same sorter stone id landed twice, once under each sorter
    status = subprocess.run([PY, "-m", "sorterd", "trainer", "status", "--data", str(trainer.data)],
                            capture_output=True, text=True, env=env())
    assert status.returncode == 0 and "sorter-1" in status.stdout and "sorter-2" in status.stdout


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs for the trainer's dataset (root only: mount); skipped where it cannot be mounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.slow
def test_trainer_disk_full_sorter_keeps_sorting_and_its_outbox_then_all_arrive(tmp_path: Path, keys: Keys,
                                                                              small_disk: Path) -> None:
    trainer = Trainer(small_disk / "ds", keys, free_port(), tmp_path / "trainer.log")
    trainer.start()
    try:
        cfg = sorter_config(tmp_path / "s1.toml", tmp_path, "sorter-1", keys, trainer.port, sorting=FLAGGY)
        full = subprocess.run(run_args(cfg, "--stones", "120", "--seed", "5", "--link-drain", "8",
                                       "--json", tmp_path / "full.json"), env=env(), capture_output=True, text=True)
        assert full.returncode == 0, full.stderr[-2000:]
        s = json.loads((tmp_path / "full.json").read_text())
        assert s["stones_fed"] == 120 and s["landed_as_routed_rate"] == 1.0  # it kept sorting
        assert s["link"]["client"]["nacked"] > 0  # the trainer said "not now" (NACK retry), never lost them
        assert not any(s["link"]["dropped"].values())
        held = outbox_pending(tmp_path / "outbox")
        flagged = flagged_in_batches(tmp_path / "logs", "sorter-1")
        assert held and held | set(dataset_keys(trainer.data)) >= flagged  # every flagged stone is somewhere
        assert not held & set(dataset_keys(trainer.data))
        assert "still wait in the outbox" in full.stdout + full.stderr
        subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)  # the disk comes back
        again = subprocess.run(run_args(cfg, "--stones", "20", "--seed", "6", "--link-drain", "120",
                                        "--json", tmp_path / "back.json"), env=env(), capture_output=True, text=True)
        assert again.returncode == 0, again.stderr[-2000:]
        assert outbox_pending(tmp_path / "outbox") == set()
        exactly_once(trainer.data, flagged_in_batches(tmp_path / "logs", "sorter-1"))
    finally:
        trainer.stop()


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Two machines: the sorter and the trainer")
    return text[start:text.index("\n## ", start + 1)]


def blocks(section: str, lang: str) -> list[str]:
    parts = section.split(f"```{lang}\n")[1:]
    return [p.split("```")[0] for p in parts]


def test_readme_two_machines_commands_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's two-machine walk-through, run as written in one directory (both sides' keys in
    keys/): the key commands, the allow-list copy, the trainer (on a free localhost port instead of
    the workshop address) and its status; `sorterd run`'s flags parse; the [link] snippet merged
    into the sim config loads and its key paths are the ones the commands wrote."""
    section = readme_section()
    [bash], [toml] = blocks(section, "bash"), blocks(section, "toml")
    commands = [line.split(" #")[0].strip() for line in bash.splitlines() if line.strip() and not line.startswith("#")]
    assert any(c.startswith("sorterd trainer --") and "--bind tcp://0.0.0.0:" in c for c in commands)
    assert "trainer status" in section and "Firewall" in section
    ran = set()
    for cmd in commands:
        argv = shlex.split(cmd)
        if argv[0] != "sorterd":
            assert subprocess.run(["bash", "-c", cmd], cwd=tmp_path).returncode == 0, cmd
            continue
        build_parser().parse_args(argv[1:])  # every flag as the CLI knows it (SystemExit otherwise)
        if argv[1] == "keys" or argv[1:3] == ["trainer", "status"]:
            done = subprocess.run([PY, "-m", "sorterd", *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                                  env=env())
            assert done.returncode == 0, (cmd, done.stderr)
            ran.add(" ".join(argv[1:3]))
        elif argv[1] == "trainer":
            port = free_port()
            argv[argv.index("--bind") + 1] = f"tcp://127.0.0.1:{port}"
            log = tmp_path / "trainer.log"
            with log.open("w") as f:
                proc = subprocess.Popen([PY, "-m", "sorterd", *argv[1:]], cwd=tmp_path, stdout=f,
                                        stderr=subprocess.STDOUT, env=env())
            try:
                wait_for(lambda p=proc, f=log: "listening on" in f.read_text() or p.poll() is not None,  # type: ignore[misc]
                         60, "the trainer")
                assert proc.poll() is None, log.read_text()
            finally:
                proc.terminate()
                proc.wait(30)
            ran.add("trainer serve")
    assert ran == {"keys generate", "trainer serve", "trainer status"}
    link = tomllib.loads(toml)["link"]
    cfg = load_config(write_config(tmp_path / "sorterd.toml", {"link": link}))
    monkeypatch.chdir(tmp_path)
    options = _link_options(cfg)  # reads keys/trainer.key and keys/sorter-1.key_secret as written above
    assert options.sorter_id == "sorter-1" and options.endpoint == link["trainer"]


@pytest.mark.slow
def test_soak_short_trainer_offline_then_started(tmp_path: Path) -> None:
    """bench/link_soak.py's short version: 2x the nominal rate, ~20 % flagged, the trainer started
    after 80 % of the sorting time.  Checked here from the files it left, not from its report."""
    work = tmp_path / "work"
    done = subprocess.run([PY, str(REPO / "bench" / "link_soak.py"), "--stones", "200", "--work", str(work),
                           "--results", str(tmp_path / "results"), "--label", "t", "--no-plot", "--drain", "180"],
                          capture_output=True, text=True, env=env(), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "results" / "link_soak_t.json").read_text())
    assert report["trainer_started_s"] is not None
    flagged = flagged_in_batches(work / "link" / "logs", "sorter-1")
    assert 0.1 <= len(flagged) / 200 <= 0.4  # ~20 % flagged (of the stones fed; some pass unseen)
    exactly_once(work / "ds", flagged)
    assert outbox_pending(work / "link" / "outbox") == set()
    for run in ("plain", "link"):
        s = json.loads((work / f"{run}.json").read_text())
        assert s["stones_fed"] == 200 and s["landed_as_routed_rate"] == 1.0
        assert s["passed_unseen"] == s["unseen_beam_events"]
    link = json.loads((work / "link.json").read_text())["link"]
    assert link["delivered"] == link["queued"] == len(flagged) + 1  # and the session record
    assert not any(link["dropped"].values())
    assert (report["lost"], report["duplicated"], report["extra"]) == (0, 0, 0)

