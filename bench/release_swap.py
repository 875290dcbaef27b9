"""A release swap's effect on pair latency under full simulated load (issue 12 "Done when").

    python bench/release_swap.py [--stones 3000] [--rate 50] [--swap-at 20] [--out bench/results/release_swap.json]
    python bench/release_swap.py --via link ...   # the release pushed by the trainer over the link

`--via activate` (the default): release 2 is already in the sorter's store and the operator activates it.
`--via link`: the whole §5.4 step 6 path.  A real `sorterd trainer` (its own process, `nice -n 10` as
if on its own PC; CurveZMQ keys from `sorterd keys generate`) is the sorter's link peer in *both*
runs, so the link's own cost is in the control too.  `--swap-at` s into sorting the swap run offers
release 2 (`offer_bundle`, what `sorterd models offer` runs); the trainer offers it on the sorter's
next heartbeat, the sorter downloads it in 256 KiB chunks into staging/2.part (each fsynced), stages
it (verification + QA gate), activates it (`[models] auto_activate = true`) and the watcher swaps it
in.  "during" then runs from the offer to 2 s after the first pair on release 2, so it holds the
download, the staging and the swap; the download's start and end and the acceptance are taken from
the sorter's own log lines, and the trainer's book (releases/results.json) must say "accepted".

Two runs of `sorterd run --sim` on the *wall* clock in one invocation, same seed: the control
(release 1 all along) and the swap run (release 1 at start-up; release 2 activated `--swap-at`
seconds into sorting, as `sorterd models activate 2` would; the watcher's helper process
(`sorterd.release.prepare`, lowest priority) re-verifies it and runs the golden inputs and the
reference kit, then the watcher opens the session in its low-priority thread and swaps it in
between two frame pairs).  Per window -- before the activation, during (activation to 2 s after the
first pair on release 2), after -- the pair latency (toplit exposure to decided, the slowest
stone of each pair) p50/p99 and the deadline misses; the control is cut at the same offsets.
Also: stones lost (fed - landed in a bin; a cluster of touching stones is one row, one decision)
and that every row names the release that classified it.
The machine is shared: read the swap run's windows against the control's, in one invocation.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.cli.run import RunOptions, run
from sorterd.release.keys import generate, load_private, load_public
from sorterd.release.qa import KIT_FILE, save_kit
from sorterd.release.sign import sign_release
from sorterd.release.store import ReleaseStore
from sorterd.sorting.record import read_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import linke2e as L  # noqa: E402  (the e2e tests' helpers: one way to start the real trainer)

from sorterd.trainer.releases import offer_bundle, read_book  # noqa: E402
from tests.release_fakes import DEFAULT, faithful_kit  # noqa: E402

DURING_TAIL_S = 2.0
SORTER_ID = "sorter-1"


class Marks(logging.Handler):
    """The monotonic time of the first log record of each kind the bench times (the sorter's own
    lines: no hook in the daemon for the bench)."""

    KINDS = {"download_started": "link: downloading release 2 ", "downloaded": "link: release 2 downloaded",
             "accepted": "release 2 from"}

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.at: dict[str, int] = {}
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "release 2" in msg:
            self.lines.append(msg)
        for kind, prefix in self.KINDS.items():
            if kind not in self.at and msg.startswith(prefix):
                self.at[kind] = time.monotonic_ns()


def _pct(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"pairs": 0}
    a = np.asarray(values)
    return {"pairs": len(values), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2)}


def _windows(rows: list[dict[str, Any]], t_start: int, t_act: int, t_end: int) -> dict[str, Any]:
    """Pair latency and deadline misses in [t_start, t_act), [t_act, t_end], (t_end, ...)."""
    pairs: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        pairs.setdefault(r["capture_seq"], []).append(r)
    out: dict[str, Any] = {}
    for name, lo, hi in (("before", t_start, t_act), ("during", t_act, t_end + 1), ("after", t_end + 1, 2**63)):
        sel = [p for p in pairs.values() if lo <= p[0]["t_toplit_ns"] < hi]
        lat = [max(r["t_decided_ns"] - r["t_toplit_ns"] for r in p) / 1e6 for p in sel]
        out[name] = {**_pct(lat), "deadline_misses": sum(r["deadline_miss"] for p in sel for r in p)}
    return out


def _one(tmp: Path, args: argparse.Namespace, swap: bool) -> dict[str, Any]:
    pub, sec = generate(tmp / "keys", "trainer")
    key: Ed25519PrivateKey = load_private(sec)
    store = ReleaseStore(tmp / "state", [load_public(pub)], 10**9)
    link = args.via == "link"
    for n in (1, 2):
        signed = sign_release(DEFAULT, tmp / f"r{n}", key, n, "bench")
        if n == 1 or not link:
            store.stage(signed, None)
    store.activate(1)
    logs = tmp / "logs"
    over: dict[str, dict[str, Any]] = {
        "sim": {"rate_per_s": args.rate, "seed": args.seed, "clock": "wall"},
        "record": {"log_dir": str(logs)}, "metrics": {"port": 0}, "calibration": {"dir": str(tmp / "cal")},
        "models": {"dir": str(tmp / "state"), "trusted_keys": [str(pub)], "poll_s": 0.2, "auto_activate": link}}
    trainer = None
    if link:
        keys = L.make_keys(tmp / "link-keys", (SORTER_ID,))
        port = L.free_port()
        trainer = L.Trainer(tmp / "trainer-data", keys, port, tmp / "trainer.log", nice=10)
        trainer.start()
        over["machine"] = {"name": SORTER_ID}
        over["link"] = {"enabled": True, "sorter_id": SORTER_ID, "trainer": trainer.endpoint,
                        "trainer_key": str(keys.trainer_public), "secret_key": str(keys.sorter_secret(SORTER_ID)),
                        "outbox_dir": str(tmp / "outbox"), "heartbeat_s": 0.5}
    cfg = load_config(config.sim_config_path(), over)
    day = tmp / "cal" / cfg.machine.name / date.today().isoformat()  # the reference kit, as calibration records it
    day.mkdir(parents=True)
    save_kit(day / KIT_FILE, faithful_kit())
    t_act: list[int] = []

    def activate() -> None:
        while not any(logs.glob("*/stones.db")):
            time.sleep(0.05)
        time.sleep(args.swap_at)
        t_act.append(time.monotonic_ns())  # the wall clock's now_ns: the rows' time base
        if swap and link:
            offer_bundle(tmp / "r2", tmp / "trainer-data", [load_public(pub)])
        elif swap:
            store.activate(2)

    if swap:
        assert store.state().active == 1
    marks = Marks()
    logging.getLogger("sorterd").addHandler(marks)
    logging.getLogger("sorterd").setLevel(logging.INFO)
    t = threading.Thread(target=activate, daemon=True)
    t.start()
    try:
        res = run(cfg, RunOptions(stones=args.stones, progress=False), io.StringIO())
    finally:
        logging.getLogger("sorterd").removeHandler(marks)
        if trainer is not None:
            trainer.stop()
    t.join(5)
    s = res.summary
    rows = sorted(read_rows(res.batch_dir / "stones.db"), key=lambda r: r["t_toplit_ns"])
    versions = list(dict.fromkeys(r["model_version"] for r in rows))
    t0, ta = rows[0]["t_toplit_ns"], t_act[0]
    new = [r["t_toplit_ns"] for r in rows if r["model_version"].endswith("@r2")]
    if swap and not new:
        raise SystemExit("release_swap: release 2 never went live (see the log): nothing to measure")
    swap_s = (min(new) - ta) / 1e9 if new else None
    t_end = (min(new) if new else ta) + int(DURING_TAIL_S * 1e9)
    out = {"swap": swap, "via": args.via, "versions": versions, "stones_fed": s["stones_fed"],
           "binned": sum(s["bins"].values()), "rows": len(rows), "objects_decided": s["objects_decided"],
           "clusters": s["clusters"], "lost": s["stones_fed"] - sum(s["bins"].values()),
           "deadline_misses": s["deadline_misses"],
           "activation_to_first_new_pair_s": None if swap_s is None else round(swap_s, 3),
           "windows": _windows(rows, t0, ta, t_end), "wall_s": s.get("wall_s"),
           "event_loop_lag": s.get("event_loop_lag"),
           "rows_on": _rows_on(rows, new)}
    if link and swap:
        book = read_book(tmp / "trainer-data").get(SORTER_ID, {}).get("results", {}).get("2")
        if not book or book.get("status") != "accepted":
            raise SystemExit(f"release_swap: the trainer's book says {book!r} for release 2, not accepted")
        size = sum(p.stat().st_size for p in (tmp / "trainer-data" / "releases" / "signed" / "2").iterdir())
        at = {k: round((v - ta) / 1e9, 3) for k, v in marks.at.items()}
        out["push"] = {"release_bytes": size, "seconds_after_offer": at, "trainer_book": book,
                       "log": marks.lines[:8]}
        if "download_started" in marks.at and "accepted" in marks.at:
            secs = (marks.at["accepted"] - marks.at["download_started"]) / 1e9
            out["push"]["download_and_stage_s"] = round(secs, 3)
            out["push"]["mb_per_s_incl_staging"] = round(size / 1e6 / secs, 2) if secs > 0 else None
    return out


def _rows_on(rows: list[dict[str, Any]], new: list[int]) -> dict[str, Any]:
    """Every row's release against the swap instant: rows before the first pair on the new release
    must all name the old one, rows from it on the new one (a pair is classified by one model)."""
    if not new:
        return {"mixed_after_swap": 0, "new_before_swap": 0}
    first = min(new)
    return {"mixed_after_swap": sum(1 for r in rows if r["t_toplit_ns"] >= first and r["model_version"]
                                    and not r["model_version"].endswith("@r2")),
            "new_before_swap": sum(1 for r in rows if r["t_toplit_ns"] < first
                                   and r["model_version"].endswith("@r2"))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stones", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--swap-at", type=float, default=20.0, help="seconds of sorting before release 2 is activated")
    ap.add_argument("--via", choices=("activate", "link"), default="activate",
                    help="activate: release 2 is in the store and activated; link: the trainer pushes it")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    load = os.getloadavg()
    result: dict[str, Any] = {"stones": args.stones, "rate": args.rate, "swap_at_s": args.swap_at, "via": args.via,
                              "loadavg_start": [round(x, 2) for x in load]}
    for name, swap in (("control", False), ("swap", True)):
        with tempfile.TemporaryDirectory() as tmp:
            result[name] = _one(Path(tmp), args, swap)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    w, c = result["swap"]["windows"], result["control"]["windows"]
    result["p99_swap_over_control"] = {k: round(w[k]["p99_ms"] / c[k]["p99_ms"], 2)
                                       for k in w if w[k].get("pairs") and c[k].get("pairs")}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
