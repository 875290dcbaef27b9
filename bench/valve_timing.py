"""Valve edge timing on this machine: controller firmware (host build) vs the GPIO RT thread vs asyncio.

    python bench/valve_timing.py --pulses 1000 --interval-ms 10 [--busy] [--markdown]

Each method gets the same job: pulses scheduled 20-40 ms ahead, one every
--interval-ms (10 ms = two edges per 10 ms, as at 50 stones/s), from an
asyncio event loop that is also busy the way the daemon is (--busy: a worker
thread doing numpy work and the loop running Python between pulses).

* mcu firmware: the `mcu` backend (clock sync over a pty) driving the firmware's
  host build; the edge times are the firmware's own stamps converted with the
  TRUE clock relation.  Reported: sync error (host estimate of the controller
  clock at each start vs the truth), wake error (stamped edge vs the clock it
  was scheduled for: the host build's process wake-up; ~0 on a real board's
  hardware timer), fire error (edge vs the instant the host intended).
* gpio RT thread: `GpioValves` with a no-op line driver (the library call
  itself is not timed here; libgpiod's ioctl adds a few us); fire error =
  stamp after the line write vs intended.
* asyncio: loop.call_at for the same instants (what not to do).

All errors are |error| in us: p50 / p99 / p99.9 / max, plus refused (late) pulses.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sorterd.clock import WallClock  # noqa: E402
from sorterd.controller.gpio import GpioValves  # noqa: E402
from sorterd.controller.mcu import McuValves  # noqa: E402
from sorterd.parts.valves.gpio import GpioValvesConfig  # noqa: E402
from sorterd.parts.valves.mcu import McuValvesConfig  # noqa: E402
from sorterd.sim.firmware import HostFirmware  # noqa: E402
from sorterd.sorting.eject import Pulse  # noqa: E402

VALVES = ("CUT", "SELECT", "FLIP")


def stats_us(errors_ns: list[int]) -> dict[str, float]:
    if not errors_ns:
        return {"p50": float("nan"), "p99": float("nan"), "p999": float("nan"), "max": float("nan"), "n": 0}
    a = np.abs(np.asarray(errors_ns, dtype=float)) / 1e3
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "p999": float(np.percentile(a, 99.9)), "max": float(a.max()), "n": int(a.size)}


class Busy:
    """The daemon's background: a numpy worker thread and Python work on the loop."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.stop = False
        self.thread = threading.Thread(target=self._worker, daemon=True)
        if on:
            self.thread.start()

    def _worker(self) -> None:
        a = np.random.default_rng(0).random((240, 640, 3))
        while not self.stop:
            (a * 1.0001).sum()  # releases the GIL, like OpenCV and onnxruntime

    def loop_work(self) -> None:
        if self.on:
            sum(i * i for i in range(3000))  # ~0.2 ms of Python on the loop

    def close(self) -> None:
        self.stop = True


def pulse_times(n: int, interval_ms: float, t0: int, rng: random.Random) -> list[Pulse]:
    out = []
    for i in range(n):
        start = t0 + int(i * interval_ms * 1e6) + int(rng.uniform(20e6, 40e6))
        out.append(Pulse(VALVES[i % 3], start, start + int(rng.uniform(4e6, 9e6)), f"B{i}"))
    return out


async def drive(valves: Any, pulses: list[Pulse], interval_ms: float, busy: Busy) -> list[Any]:
    """Schedule each pulse ~20-40 ms ahead of its start, as the pipeline does."""
    results = []
    for p in pulses:
        while time.monotonic_ns() < p.start_ns - 30_000_000:
            busy.loop_work()
            await asyncio.sleep(interval_ms / 4e3)
        refused = valves.schedule(p)
        results.append((p, refused))
    outcomes = []
    for p, refused in results:
        outcomes.append(None if refused else await valves.outcome(p))
    return outcomes


async def bench_mcu(args: argparse.Namespace, busy: Busy) -> dict[str, Any]:
    fw = HostFirmware(freq_hz=12e6, drift_ppm=37.0, offset=123_456_789_000, realtime=not args.no_rt,
                      spin_us=args.spin_us).start()
    cfg = McuValvesConfig(port=fw.port)
    valves = McuValves(cfg, WallClock(), fw.port, truth=fw.truth)
    valves.attach(asyncio.get_running_loop())
    try:
        if not await valves.wait_ready(5.0):
            raise RuntimeError("controller not ready")
        await asyncio.sleep(2.0)  # let the clock sync collect a few seconds of samples
        pulses = pulse_times(args.pulses, args.interval_ms, time.monotonic_ns(), random.Random(1))
        outcomes = await drive(valves, pulses, args.interval_ms, busy)
    finally:
        valves.close()
        fw.stop()
    truth = fw.truth
    assert truth is not None
    wake = []
    for rec in fw.read_records():
        if rec.kind == 1:
            wake.append(round((rec.actual - rec.target) * 1e9 / truth.freq_hz))
    fw.cleanup()
    st = valves.stats()
    refused = sum(1 for o in outcomes if o is None or o.status.startswith("refused"))
    return {"sync": stats_us(list(st.sync_error_ns)), "wake": stats_us(wake),
            "fire": stats_us(list(st.true_fire_errors())), "refused": refused, "late": st.late_at_fire}


class NoopDriver:
    def set(self, valve: str, on: bool) -> None:
        pass

    def all_off(self) -> None:
        pass

    def close(self) -> None:
        pass


async def bench_gpio(args: argparse.Namespace, busy: Busy) -> dict[str, Any]:
    cfg = GpioValvesConfig(library="gpiod", rt_priority=0 if args.no_rt else 50, spin_us=args.spin_us).lines()
    valves = GpioValves(cfg, NoopDriver(), WallClock(), "gpiod")
    try:
        pulses = pulse_times(args.pulses, args.interval_ms, time.monotonic_ns(), random.Random(1))
        outcomes = await drive(valves, pulses, args.interval_ms, busy)
    finally:
        valves.close()
    st = valves.stats()
    refused = sum(1 for o in outcomes if o is None or o.status.startswith("refused"))
    rt = valves.realtime
    return {"fire": stats_us(list(st.true_fire_errors())), "refused": refused,
            "rt": "SCHED_FIFO" if rt and rt.fifo else "normal"}


async def bench_asyncio(args: argparse.Namespace, busy: Busy) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    errors: list[int] = []
    pulses = pulse_times(args.pulses, args.interval_ms, time.monotonic_ns(), random.Random(1))
    done = asyncio.Event()
    left = [2 * len(pulses)]

    def fire(t_ns: int) -> None:
        errors.append(time.monotonic_ns() - t_ns)
        left[0] -= 1
        if not left[0]:
            done.set()

    for p in pulses:
        while time.monotonic_ns() < p.start_ns - 30_000_000:
            busy.loop_work()
            await asyncio.sleep(args.interval_ms / 4e3)
        for t in (p.start_ns, p.end_ns):
            loop.call_at(loop.time() + (t - time.monotonic_ns()) / 1e9, fire, t)
    await done.wait()
    return {"fire": stats_us(errors), "refused": 0}


def sigkill_trials(n: int) -> list[float]:
    """Kill a running daemon n times; ms from SIGKILL to the firmware's watchdog trip."""
    import os
    import signal
    import subprocess
    import tempfile

    from sorterd import config
    from sorterd.sim.firmware import TRACE_EDGE, TRACE_WATCHDOG

    out = []
    for i in range(n):
        fw = HostFirmware(freq_hz=12e6, drift_ppm=25.0, offset=10**11, realtime=True).start()
        tmp = Path(tempfile.mkdtemp(prefix="sorterd-kill-"))
        text = config.sim_config_path().read_text().replace('[valves]\ntype = "sim"',
                                                             f'[valves]\ntype = "mcu"\nport = "{fw.port}"')
        text = text.replace("[sim]\n", '[sim]\ncontroller = "port"\n')  # the firmware started above
        (tmp / "c.toml").write_text(text)
        proc = subprocess.Popen([sys.executable, "-m", "sorterd", "run", "--config", str(tmp / "c.toml"),
                                 "--stones", "3000", "--rate", "50", "--log-dir", str(tmp), "--no-progress",
                                 "--metrics-port", "0", "--seed", str(i + 1)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
        recs: list[Any] = []
        while sum(1 for r in recs if r.kind == TRACE_EDGE) < 20 + 10 * i:
            recs += fw.read_records()
            time.sleep(0.05)
        t_kill = time.monotonic_ns()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.4)
        recs += fw.read_records()
        fw.stop()
        fw.cleanup()
        assert fw.truth is not None
        trips = [fw.truth.mcu_to_host(r.actual) for r in recs if r.kind == TRACE_WATCHDOG]
        out.append((trips[0] - t_kill) / 1e6 if trips else float("nan"))
    return out


def row(name: str, s: dict[str, float], extra: str = "") -> str:
    return (f"| {name} | {s['p50']:.1f} | {s['p99']:.1f} | {s['p999']:.1f} | {s['max']:.1f} | {s['n']} | {extra} |")


async def main_async(args: argparse.Namespace) -> None:
    busy = Busy(args.busy)
    try:
        mcu = await bench_mcu(args, busy)
        gpio = await bench_gpio(args, busy)
        aio = await bench_asyncio(args, busy)
    finally:
        busy.close()
    lines = [
        "| method | p50 us | p99 us | p99.9 us | max us | edges | notes |",
        "|---|---|---|---|---|---|---|",
        row("mcu firmware, fire error (host build)", mcu["fire"],
            f"{mcu['refused']} of {args.pulses} pulses refused ({mcu['late']} late at fire)"),
        row("mcu firmware, sync error", mcu["sync"], "host estimate of the controller clock at each start vs truth"),
        row("mcu firmware, wake error (host build only)", mcu["wake"], "stamped edge vs its scheduled clock"),
        row("gpio RT thread, fire error", gpio["fire"], f"{gpio['refused']} refused; {gpio['rt']}"),
        row("asyncio call_at, fire error", aio["fire"], "for comparison"),
    ]
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pulses", type=int, default=1000)
    ap.add_argument("--interval-ms", type=float, default=10.0)
    ap.add_argument("--spin-us", type=int, default=200)
    ap.add_argument("--busy", action="store_true", help="load the loop and a worker thread like the daemon does")
    ap.add_argument("--no-rt", action="store_true", help="no SCHED_FIFO for the firmware process or the thread")
    ap.add_argument("--sigkill", type=int, default=0, metavar="N",
                    help="also SIGKILL a running daemon N times: ms until the firmware switched everything off")
    args = ap.parse_args()
    asyncio.run(main_async(args))
    if args.sigkill:
        ms = sigkill_trials(args.sigkill)
        print(f"\nSIGKILL -> watchdog trip (silence window 200 ms), {len(ms)} kills: "
              + ", ".join(f"{v:.1f}" for v in ms) + f" ms (max {max(ms):.1f})")


if __name__ == "__main__":
    main()
