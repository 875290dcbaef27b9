"""Does the daemon's memory grow with every stone?  RSS sampled over a long virtual-clock run.

    python bench/memory.py --stones 100000 --label after            # the fakes' pipeline (fast)
    python bench/memory.py --driver sim --stones 20000 --label sim   # sorterd run --sim, in-process
    python bench/memory.py --plot before after                       # table + bench/results/memory.png

`--driver fakes` drives the real Pipeline, Recorder and metrics over the fakes of
tests/test_pipeline_fakes (a camera drawing discs, a model reading their colour,
hardware-timed valves) on the virtual clock: every stage of the daemon runs, the
simulator's rendering and the ONNX model do not, so 100,000 stones take minutes.
`--driver sim` is `sorterd run --sim --stones N` in this process (its simulator holds
the fed stones and the jets it saw: its own truth, not the daemon's).

A thread samples VmRSS from /proc/self/status every `--every` seconds of wall time
with the stones decided so far; the table goes to bench/results/memory_<label>.csv.
Run it on main and on a branch with the same arguments for a before/after (the
script uses only the Pipeline's constructor and its stats.objects counter).
"""

from __future__ import annotations

import argparse
import csv
import io
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


class Sampler(threading.Thread):
    """(wall s, stones decided, RSS kB) every `every` seconds, from a count read off the loop thread."""

    def __init__(self, decided: Callable[[], int], every: float, csv_path: Path | None = None) -> None:
        super().__init__(daemon=True)
        self.decided, self.every = decided, every
        self.rows: list[tuple[float, int, int]] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.csv_path = csv_path  # written as it goes: a run cut short still leaves its table

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        self.rows.append((round(time.monotonic() - self.t0, 2), self.decided(), rss_kb()))
        if self.csv_path is not None and (len(self.rows) % 10 == 0 or self.stop.is_set()):
            write_csv(self.csv_path, self.rows)


def write_csv(path: Path, rows: list[tuple[float, int, int]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["wall_s", "stones", "rss_kb"])
        w.writerows(rows)
    tmp.replace(path)


def track_pipelines() -> list[Any]:
    """Every Pipeline constructed from now on (the sim driver builds its own inside `run`)."""
    from sorterd.sorting.pipeline import Pipeline

    made: list[Any] = []
    init = Pipeline.__init__

    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    Pipeline.__init__ = recording_init  # type: ignore[method-assign]
    return made


def decided_by(made: list[Any]) -> Callable[[], int]:
    return lambda: int(made[-1].stats.objects) if made else 0


def run_sim(n: int, every: float, tmp: Path, out: Path) -> list[tuple[float, int, int]]:
    from sorterd import config
    from sorterd.cli.compose import load_config
    from sorterd.cli.run import RunOptions, run

    made = track_pipelines()
    cfg = load_config(config.sim_config_path(), {"metrics": {"enabled": False},
                                                 "record": {"log_dir": str(tmp), "thumbnail_px": 0}})
    sampler = Sampler(decided_by(made), every, out)
    sampler.start()
    run(cfg, RunOptions(stones=n, progress=False), out=io.StringIO())
    sampler.stop.set()
    sampler.sample()
    return sampler.rows


def run_fakes(n: int, every: float, tmp: Path, out: Path) -> list[tuple[float, int, int]]:
    sys.path.append(str(ROOT))  # tests.test_pipeline_fakes; sorterd comes from PYTHONPATH (main or a branch)
    import bisect

    import cv2

    from sorterd import config
    from sorterd.cli.compose import load_config
    from sorterd.clock import VirtualClock
    from sorterd.metrics import Metrics
    from sorterd.parts import Parts
    from sorterd.parts.camera import Frame
    from sorterd.sorting.pipeline import Pipeline
    from sorterd.sorting.record import Recorder, make_batch_dir
    from tests.test_pipeline_fakes import (
        BACK_STONE,
        GAP_NS,
        PPM,
        START_NS,
        STONES,
        FakeCamera,
        FakeLights,
        FakeModel,
        FakeTrigger,
        FakeValves,
        Stone,
    )

    class WindowCamera(FakeCamera):
        async def grab(self, mode: str, t_ns: int) -> Frame:
            await self.clock.sleep_until(t_ns)
            img = self.reference(mode)
            lo = bisect.bisect_left(edges, t_ns - 200_000_000)
            for s in self.stones[lo:bisect.bisect_right(edges, t_ns + 50_000_000)]:
                colour = BACK_STONE if mode == "backlit" else s.top
                for cx in s.centres_mm(t_ns):
                    cv2.circle(img, (round(cx * PPM * 16), round(s.y_mm * PPM * 16)),
                               round(s.size_mm / 2 * PPM * 16), (colour, colour, colour), -1, cv2.LINE_AA, shift=4)
            return Frame(img, t_ns, mode)

    # No thumbnails nor flagged frames: 100,000 PNGs would measure the disk, not the daemon's memory.
    cfg = load_config(config.sim_config_path(), {"metrics": {"enabled": False},
                                                 "record": {"thumbnail_px": 0, "flagged_images": False}})
    clock = VirtualClock()
    loop = clock.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(2))
    kinds = [s for s, _ in STONES]
    edges: list[int] = []
    made: list[Any] = []
    sampler = Sampler(decided_by(made), every, out)

    async def main() -> None:
        t0 = clock.now_ns() + START_NS
        stones = [Stone(t0 + i * GAP_NS, k.size_mm, k.y_mm, k.top, k.twin_mm)
                  for i, k in ((i, kinds[i % len(kinds)]) for i in range(n))]
        edges.extend(s.edge_ns for s in stones)
        parts = Parts(camera=WindowCamera(stones, clock), lights=FakeLights(),
                      trigger=FakeTrigger(edges, clock), valves=FakeValves(clock))
        # The fakes keep what they did (the tests read it): that memory is not the daemon's.
        parts.camera.grabs = _Discard()  # type: ignore[attr-defined]
        parts.lights.strobes = _Discard()  # type: ignore[attr-defined]
        parts.valves.scheduled = _Discard()  # type: ignore[attr-defined]
        model = FakeModel()
        model.seen = _Discard()  # type: ignore[assignment]
        recorder = Recorder(make_batch_dir(tmp, "bench"), 0.05, 10_000, 0)
        made.append(Pipeline(cfg, clock, parts, model, recorder, Metrics()))  # type: ignore[arg-type]
        sampler.start()
        try:
            await made[-1].run()
        finally:
            recorder.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    sampler.stop.set()
    sampler.sample()
    return sampler.rows


class _Discard(list):  # type: ignore[type-arg]
    def append(self, _: object) -> None:
        pass


def at(rows: list[tuple[float, int, int]], stones: int) -> int | None:
    """RSS (kB) at the first sample with at least `stones` decided."""
    return next((kb for _, n, kb in rows if n >= stones), None)


def slope_kb_per_1000(rows: list[tuple[float, int, int]]) -> float:
    """Least-squares RSS growth over the second half of the run (after warm-up), kB per 1000 stones."""
    import numpy as np

    top = max(n for _, n, _ in rows)
    half = [(n, kb) for _, n, kb in rows if n >= top / 2]
    if len(half) < 2:
        return float("nan")
    x, y = np.array(half, dtype=float).T
    return float(np.polyfit(x, y, 1)[0] * 1000)


def read_csv(label: str) -> list[tuple[float, int, int]]:
    with (RESULTS / f"memory_{label}.csv").open() as f:
        return [(float(r["wall_s"]), int(r["stones"]), int(r["rss_kb"])) for r in csv.DictReader(f)]


def table(labels: list[str]) -> str:
    marks = (10_000, 50_000, 100_000)
    lines = ["| run | " + " | ".join(f"RSS at {m // 1000}k stones (MB)" for m in marks)
             + " | slope, 2nd half (kB / 1000 stones) |", "|---" * (len(marks) + 2) + "|"]
    for label in labels:
        rows = read_csv(label)
        cells = [f"{kb / 1024:.1f}" if (kb := at(rows, m)) is not None else "-" for m in marks]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {slope_kb_per_1000(rows):.1f} |")
    return "\n".join(lines)


def plot(labels: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label in labels:
        rows = read_csv(label)
        ax.plot([n for _, n, _ in rows], [kb / 1024 for _, _, kb in rows], label=label)
    ax.set_xlabel("stones decided")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("sorterd RSS over a virtual-clock run")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--driver", choices=("fakes", "sim"), default="fakes")
    ap.add_argument("--stones", type=int, default=100_000)
    ap.add_argument("--every", type=float, default=1.0, help="seconds of wall time between samples")
    ap.add_argument("--label", default="run", help="bench/results/memory_<label>.csv")
    ap.add_argument("--plot", nargs="+", metavar="LABEL", help="table and PNG of these labels' CSVs")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.plot:
        print(table(args.plot))
        plot(args.plot, RESULTS / "memory.png")
        print(f"plot: {RESULTS / 'memory.png'}")
        return
    out = RESULTS / f"memory_{args.label}.csv"
    with tempfile.TemporaryDirectory() as tmp:
        t = time.monotonic()
        rows = (run_sim if args.driver == "sim" else run_fakes)(args.stones, args.every, Path(tmp), out)
    write_csv(out, rows)
    print(f"{args.label}: {args.driver}, {rows[-1][1]} stones in {time.monotonic() - t:.0f} s on "
          f"{platform.machine()}; RSS {rows[0][2] / 1024:.1f} -> {rows[-1][2] / 1024:.1f} MB, "
          f"slope {slope_kb_per_1000(rows):.1f} kB / 1000 stones (2nd half)")


if __name__ == "__main__":
    main()
