"""Child of test_release_swap: `sorterd run` on the simulated machine with the test's config
overrides (JSON), until its stones are sorted or a SIGTERM stops it (the daemon's stop: no new
stones, those in flight finished, the summary written); exits as `sorterd run` does (128 + the
signal when one stopped it).  The test waits on what the run records -- stones.db, the store's
state.json -- and stops it when it has seen what it needs, however slowly a loaded machine got there.
    python tests/release_run_child.py OVERRIDES.json STONES SUMMARY.json
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from sorterd import config, journal
from sorterd.cli.compose import load_config
from sorterd.cli.run import RunOptions, run


def main() -> int:
    overrides, stones, summary = json.loads(Path(sys.argv[1]).read_text()), int(sys.argv[2]), Path(sys.argv[3])
    journal.configure(logging.INFO, "%(asctime)s %(name)s %(levelname)s %(message)s")  # the swap, the verdict
    cfg = load_config(config.sim_config_path(), overrides)
    result = run(cfg, RunOptions(stones=stones, json_path=summary, progress=False))
    return 0 if result.stop_signal is None else 128 + result.stop_signal


if __name__ == "__main__":
    sys.exit(main())
