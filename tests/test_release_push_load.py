"""A release pushed by a real `sorterd trainer` and swapped in while the simulated sorter runs at
its full rate on the wall clock (issue 12's first Done-when item, the short version of
`bench/release_swap.py --via link`): the trainer offers it, the sorter downloads, stages, activates
([models] auto_activate) and swaps it between two frame pairs; no stone is lost, every row names
the release that classified it (old before the first pair on the new one, new from it on), and the
trainer's book has the sorter's "accepted".  Latency and deadline misses are the bench's figures
(bench/RESULTS.md), not asserted here: this box is shared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_push_and_swap_under_load_loses_nothing_and_rows_name_their_release(tmp_path: Path) -> None:
    out = tmp_path / "push.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "release_swap.py"), "--via", "link", "--stones", "400",
                           "--rate", "50", "--swap-at", "1.5", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    for name in ("control", "swap"):
        run = report[name]
        assert run["lost"] == 0 and run["stones_fed"] == 400 == run["binned"], run
        assert run["rows"] == run["objects_decided"] > 0, run  # one row per decided object (a cluster is one)
    swap = report["swap"]
    v = json.loads((REPO / "models" / "default" / "manifest.json").read_text())["version"]  # bench signs the default
    assert swap["versions"] == [f"{v}@r1", f"{v}@r2"]
    assert swap["rows_on"] == {"mixed_after_swap": 0, "new_before_swap": 0}
    assert report["control"]["versions"] == [f"{v}@r1"]
    push = swap["push"]
    assert push["trainer_book"]["status"] == "accepted", push
    assert set(push["seconds_after_offer"]) == {"download_started", "downloaded", "accepted"}, push
    assert push["release_bytes"] > 1_000_000
