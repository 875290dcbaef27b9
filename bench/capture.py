"""Triggers and strobes on the simulated machine, compared in one sitting.

    python bench/capture.py --stones 1000 --rate 20 [--out bench/results/capture.json]

Rows (same stones, same seeds):
  * beam   -- the simulated break-beam (sim trigger), sim strobes, virtual clock;
  * vision -- the vision trigger (200 Hz previews of the entry zone), virtual clock;
  * mcu    -- sim trigger, valves AND strobes on the controller firmware's host
              build over a pty, wall clock: strobe edge error as the controller
              reports it (through the clock sync), lighting faults.
Each row: stones seen, landed as decided, captures per seen stone, deadline
misses, lighting faults, exposure->pulse p50/p99, and for mcu the strobe and
valve edge errors.  Read medians; this machine is shared.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.cli.run import RunOptions, run

ROWS: dict[str, dict[str, dict[str, Any]]] = {
    "beam": {},
    "vision": {"trigger": {"type": "vision"}},
    "mcu": {"valves": {"type": "mcu"}, "lights": {"type": "mcu"}, "sim": {"clock": "wall"}},
}


def one(name: str, stones: int, rate: float, seed: int) -> dict[str, Any]:
    over = {k: dict(v) for k, v in ROWS[name].items()}
    with tempfile.TemporaryDirectory() as tmp:
        over.setdefault("sim", {}).update(rate_per_s=rate, seed=seed)
        over["record"] = {"log_dir": tmp}
        over["metrics"] = {"port": 0}
        cfg = load_config(config.sim_config_path(), over)
        s = run(cfg, RunOptions(stones=stones, progress=False), io.StringIO()).summary
    row = {
        "stones_fed": s["stones_fed"], "stones_seen": s["stones_seen"],
        "landed_as_decided_rate": s["landed_as_decided_rate"],
        "captures_per_seen": round(s["captures"] / max(1, s["stones_seen"]), 3),
        "deadline_misses": s["deadline_misses"], "lighting_faults": s["lighting_faults"],
        "exposure_to_pulse_ms": s["latency_ms"]["exposure_to_pulse"],
    }
    for key in ("strobe_error_us", "strobe_refusals", "fire_error_us", "sync_error_us"):
        if key in s:
            row[key] = s[key]
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stones", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result: dict[str, Any] = {"machine": f"{platform.node()} {platform.machine()}", "stones": args.stones,
                              "rate": args.rate, "seed": args.seed, "rows": {}}
    for name in args.rows.split(","):
        result["rows"][name] = one(name, args.stones, args.rate, args.seed)
        print(name, json.dumps(result["rows"][name]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
