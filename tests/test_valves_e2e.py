"""The simulated machine with the controller firmware (host build) on a pty, end to end.

`sorterd run --sim --valves mcu`: the pipeline schedules pulses, the `mcu`
backend sends them over pyserial, the firmware fires them from its timer, and
the simulated world opens its jets from the firmware's pin edges converted
with the true clock relation.  Plus the faults: the daemon SIGKILLed (the
firmware's watchdog must close every valve), and the pty pulled mid-run.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sorterd import config
from sorterd.cli import main
from sorterd.cli.compose import load_config
from sorterd.cli.run import RunOptions, run
from sorterd.sim import firmware as simfw
from sorterd.sim.firmware import TRACE_EDGE, TRACE_SESSION, TRACE_WATCHDOG, HostFirmware

pytestmark = pytest.mark.slow

pytest.importorskip("serial", reason="the mcu backend talks through pyserial (pip install pyserial)")


def test_cli_run_sim_with_the_firmware(tmp_path: Path) -> None:
    code = main(["run", "--sim", "--valves", "mcu", "--stones", "150", "--rate", "50", "--seed", "4",
                 "--log-dir", str(tmp_path), "--json", str(tmp_path / "s.json"), "--no-progress",
                 "--metrics-port", "0"])
    assert code == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["stones_fed"] == 150 and sum(s["bins"].values()) == 150
    # The firmware's host build is a process on a shared VM: when its timer thread wakes late
    # (a loaded box, a stolen vCPU; 0-16 of 150 on CI, up to 68 with the timer thread denied
    # SCHED_FIFO beside two busy loops) it refuses the edge rather than fire late.  What must
    # hold on any box: each refusal is a counted deadline miss, every stone lands where the
    # machine routed it (its bin, or REJECT after a refusal), and most pulses fire.
    refused = s["valve_refusals"]
    assert s["deadline_misses"] == refused
    # (With the timer thread starved, the clock sync's exchanges may also go stale for a moment:
    # pulses are refused until it is back, never sent on a stale clock.)
    assert set(s["valve_refusal_reasons"]) <= {"refused: controller: late at fire", "refused: clock sync lost",
                                               "refused: controller not ready"}
    assert_landed_as_routed(s)
    assert s["passed_unseen"] == s["unseen_beam_events"]
    # A neighbour conflict keeps its decided bin and falls to REJECT: recorded, not landed as decided.
    assert s["landed_as_decided_rate"] >= 1 - (refused + s["unseen_stones"] + s["late_off_edges"]
                                              + s["neighbour_conflicts"] + 4) / 150
    assert s["valve_controller"]["matched"] == s["valve_controller"]["openings"] >= 30  # each opening was a pulse sent
    for key in ("sync_error_us", "fire_error_us"):
        assert {"p50", "p99"} <= set(s[key]) and s[key]["n"] > 0
    assert s["sync_error_us"]["p99"] < 200  # tens of us on this pty; a real board's USB: similar
    assert s["reconnects"] == 0
    # At most one trip, at shutdown: app.py closes the metrics server (which blocks
    # the loop ~0.5 s) before the valves, so the controller hears nothing for longer
    # than silence_ms and switches off on its own.  Harmless, and counted.
    assert s["watchdog_trips"] <= 1


def assert_landed_as_routed(s: dict[str, Any]) -> None:
    """Every stone landed where the machine sent it, but for the ones a jet that closed late
    may have carried (the host build on a loaded VM; each such jet is counted)."""
    misrouted = round((1 - s["landed_as_routed_rate"]) * s["stones_fed"])
    assert misrouted <= s["late_off_edges"], s["misrouted"]


def _sim_toml(tmp_path: Path, port: str) -> Path:
    text = config.sim_config_path().read_text()
    text = text.replace('[valves]\ntype = "sim"', f'[valves]\ntype = "mcu"\nport = "{port}"')
    assert f'port = "{port}"' in text
    text = text.replace('[sim]\n', '[sim]\ncontroller = "port"  # the firmware this test started\n')
    assert 'controller = "port"' in text
    p = tmp_path / "sorter.toml"
    p.write_text(text)
    return p


def test_sigkill_of_the_daemon_closes_every_valve_within_the_silence_window(tmp_path: Path) -> None:
    """The firmware outlives the daemon (as a board does) and watches it die."""
    fw = HostFirmware(freq_hz=12e6, drift_ppm=25.0, offset=10**11).start()
    truth = fw.truth
    assert truth is not None
    cmd = [sys.executable, "-m", "sorterd", "run", "--config", str(_sim_toml(tmp_path, fw.port)), "--stones", "3000",
           "--rate", "50", "--log-dir", str(tmp_path), "--no-progress", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records: list[Any] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # wait until pulses flow
            records += fw.read_records()
            if sum(1 for r in records if r.kind == TRACE_EDGE) >= 20:
                break
            time.sleep(0.05)
        assert any(r.kind == TRACE_SESSION for r in records), "the daemon never connected"
        t_kill = time.monotonic_ns()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        time.sleep(0.5)
        records += fw.read_records()
    finally:
        if proc.poll() is None:
            proc.kill()
        fw.stop()
        fw.cleanup()
    [trip] = [r for r in records if r.kind == TRACE_WATCHDOG]
    trip_ns = truth.mcu_to_host(trip.actual)
    after_kill_ms = (trip_ns - t_kill) / 1e6
    print(f"\nwatchdog tripped {after_kill_ms:.1f} ms after SIGKILL (silence window 200 ms)")
    assert 0 < after_kill_ms <= 200 + 50  # the window; plus a late wake-up on a busy box
    # Every valve ends closed: each pin's last edge is low, and none opens after the trip.
    last: dict[int, int] = {}
    for r in records:
        if r.kind == TRACE_EDGE:
            last[r.pin] = r.level
            assert not (r.level == 1 and r.actual > trip.actual)
    assert set(last.values()) <= {0}


def test_the_firmware_child_does_not_outlive_a_killed_daemon_for_long(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "sorterd", "run", "--sim", "--valves", "mcu", "--stones", "3000", "--rate", "50",
           "--log-dir", str(tmp_path), "--no-progress", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and child is None:
            child = _vc_host_child(proc.pid)
            time.sleep(0.1)
        assert child is not None, "no firmware process started"
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        gone = time.monotonic() + 3.0
        while time.monotonic() < gone and Path(f"/proc/{child}").exists() and not _zombie(child):
            time.sleep(0.05)
        assert not Path(f"/proc/{child}").exists() or _zombie(child), "the firmware process was left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
        if child is not None and Path(f"/proc/{child}").exists() and not _zombie(child):
            os.kill(child, signal.SIGKILL)


def _vc_host_child(pid: int) -> int | None:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    for k in kids:
        try:
            if Path(f"/proc/{k}/comm").read_text().strip() == "vc-host":
                return int(k)
        except OSError:
            continue
    return None


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_pulling_the_pty_mid_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cable is pulled for 500 ms: stones in the gap take the safe route and are
    counted, the backend reconnects and resynchronises, nothing fires late."""
    started: list[simfw.SimulatedController] = []
    real_start = simfw.start_simulated_controller

    def start(cfg: Any, sim: Any, machine: Any, clock: Any) -> simfw.SimulatedController:
        ctl = real_start(cfg, sim, machine, clock)  # the firmware stays unplugged for 500 ms
        started.append(ctl)
        return ctl

    monkeypatch.setattr(simfw, "start_simulated_controller", start)

    def pull_the_cable() -> None:
        while not started:
            time.sleep(0.05)
        time.sleep(4.0)  # stones are flowing by now
        started[0].fw.unplug()

    threading.Thread(target=pull_the_cable, daemon=True).start()
    cfg = load_config(config.sim_config_path(), {
        "valves": {"type": "mcu"}, "record": {"log_dir": str(tmp_path)}, "metrics": {"enabled": False},
        "sim": {"rate_per_s": 50.0, "seed": 6}})
    s = run(cfg, RunOptions(stones=400, progress=False), io.StringIO()).summary
    reasons = s["valve_refusal_reasons"]
    assert s["reconnects"] == 1
    gap = sum(n for why, n in reasons.items() if "disconnected" in why or "not ready" in why or "sync" in why)
    assert gap >= 3, reasons  # ~0.5 s of stones at 50/s, each one counted
    assert s["deadline_misses"] >= gap
    # Nothing late: every valve opening started within the firmware's late limit of its scheduled clock.
    trace = started[0].trace
    assert trace is not None and trace.openings
    late_us = max((op.on_ns - op.target_on_ns) / 1e3 for op in trace.openings)
    assert late_us <= cfg.valves.late_limit_us + 1
    # Every stone landed where the machine sent it: its bin, or REJECT when its pulse was refused
    # (or, on a loaded box, when no pair caught it in view: counted by the daemon itself).
    assert_landed_as_routed(s)
    assert s["passed_unseen"] == s["unseen_beam_events"]
    assert s["valve_unknown"] >= 0  # pulses in flight when the cable went: in their bin or REJECT
    lost = (s["deadline_misses"] + s["unseen_stones"] + s["valve_unknown"] + s["late_off_edges"]
            + s["neighbour_conflicts"])
    assert s["landed_as_decided_rate"] >= 1 - lost / 400
