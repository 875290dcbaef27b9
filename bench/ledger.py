"""How well the daemon counts the stones it never saw (the trigger ledger).

    python bench/ledger.py [--stones 600] [--out bench/results/ledger.json]

The simulated machine (virtual clock) is overloaded on purpose: every Nth frame
pair is exposed D ms after its trigger, as a starved capture loop would, so
stones pass the view between pairs.  For each row the daemon's own counts
(`passed_unseen`, `untriggered`) are set against the simulator's truth
(`unseen_stones`; `unseen_beam_events` = beam interruptions none of whose
stones was decided, what a trigger can know), with close and touching stones
in the stream.  `landed_as_routed` says whether any stone went somewhere no
record or counter says.
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
from sorterd.sorting.pipeline import Pipeline

# (name, every Nth pair late, by ms, sim overrides)
ROWS: list[tuple[str, int, float, dict[str, Any]]] = [
    ("healthy", 0, 0.0, {}),
    ("every 4th pair 80 ms late", 4, 80.0, {}),
    ("every 2nd pair 60 ms late", 2, 60.0, {}),
    ("every 3rd pair 80 ms late, 20% close, 5% touching", 3, 80.0,
     {"close_pair_prob": 0.2, "touching_pair_prob": 0.05}),
    ("same, 800 mm/s", 3, 80.0, {"close_pair_prob": 0.2, "touching_pair_prob": 0.05, "speed_mm_s": 800.0}),
]


def one(every: int, late_ms: float, sim: dict[str, Any], stones: int, seed: int) -> dict[str, Any]:
    real = Pipeline._capture

    async def late_capture(self: Pipeline, seq: int, ev: Any) -> Any:
        if every and seq % every == every - 1:
            await self.clock.sleep_until(self.clock.now_ns() + int(late_ms * 1e6))
        return await real(self, seq, ev)

    Pipeline._capture = late_capture  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(config.sim_config_path(), {
                "record": {"log_dir": tmp}, "metrics": {"enabled": False},
                "sim": {"rate_per_s": 40.0, "seed": seed, **sim}})
            s = run(cfg, RunOptions(stones=stones, progress=False), io.StringIO()).summary
    finally:
        Pipeline._capture = real  # type: ignore[method-assign]
    return {k: s[k] for k in ("stones_fed", "unseen_stones", "unseen_beam_events", "passed_unseen", "untriggered",
                              "clusters", "landed_as_routed_rate")} | {
        "trigger_to_exposure_ms": s["latency_ms"]["trigger_to_exposure"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stones", type=int, default=600)
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    print(f"{'row':52} {'unseen':>6} {'beam ev':>7} {'ledger':>6} {'untrig':>6} {'routed':>7}")
    for name, every, late, sim in ROWS:
        r = one(every, late, sim, args.stones, args.seed)
        rows.append({"row": name, **r})
        print(f"{name:52} {r['unseen_stones']:6d} {r['unseen_beam_events']:7d} {r['passed_unseen']:6d} "
              f"{r['untriggered']:6d} {r['landed_as_routed_rate']:7.2%}")
    if args.out:
        args.out.write_text(json.dumps({"machine": platform.node(), "stones": args.stones, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
