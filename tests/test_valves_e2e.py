"""The simulated machine with the controller firmware (host build) on a pty, end to end.

`sorterd run --sim --valves mcu`: the pipeline schedules pulses, the `mcu`
backend sends them over pyserial, the firmware fires them from its timer, and
the simulated world opens its jets from the firmware's pin edges converted
with the true clock relation.  Plus the faults: the daemon SIGKILLed (the
firmware's watchdog must close every valve), and the pty pulled mid-run.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import random
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
from sorterd.controller import proto as P
from sorterd.sim import firmware as simfw
from sorterd.sim.firmware import TRACE_EDGE, TRACE_SESSION, TRACE_WATCHDOG, BlockingClient, HostFirmware, TraceRecord

pytestmark = [pytest.mark.slow, pytest.mark.host_build]

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
    assert _vc_host_children(os.getpid()) == [], "the firmware's process was not reaped"
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


def test_the_killed_daemons_firmware_turns_everything_off_exits_and_is_reaped(tmp_path: Path) -> None:
    """The daemon starts the firmware itself and is SIGKILLed: the orphan waits for its watchdog,
    checks its pins, exits, and its new parent reaps it (here the test, a subreaper; on a machine,
    systemd).  Its status says whether every output was off."""
    with _subreaper():
        for k in range(3):
            _kill_a_daemon_and_reap_its_firmware(tmp_path / str(k))


def _kill_a_daemon_and_reap_its_firmware(tmp_path: Path) -> None:
    tmp_path.mkdir()
    cmd = [sys.executable, "-m", "sorterd", "run", "--sim", "--valves", "mcu", "--stones", "3000", "--rate", "50",
           "--log-dir", str(tmp_path), "--no-progress", "--metrics-port", "0"]
    with open(tmp_path / "stderr", "wb") as err:  # the firmware inherits it
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    child = None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and child is None:
            [child] = _vc_host_children(proc.pid) or [None]
            time.sleep(0.1)
        assert child is not None, "no firmware process started"
        time.sleep(1.5)  # armed, pulses flowing
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        status = _reap(child, timeout_s=5.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 0, (tmp_path / "stderr").read_text()[-2000:]
    assert "every output off" in (tmp_path / "stderr").read_text()


def test_many_host_deaths_and_every_output_is_off_after_each_trip() -> None:
    """30 hosts, each SIGKILLed while it keeps every output busy: after each, the watchdog trips
    once, no edge turns anything on after it, every pin's last edge is off, and the pins read back
    right after the trip (the watchdog record's level) are all inactive."""
    fw = HostFirmware(freq_hz=12e6, drift_ppm=25.0, offset=10**11).start()
    on_at_trip = 0
    try:
        for k in range(30):
            records = _one_host_death(fw, seed=k)
            trips = [r for r in records if r.kind == TRACE_WATCHDOG]
            assert len(trips) == 1, f"kill {k}: {len(trips)} watchdog trips"
            [trip] = trips
            assert trip.level == 0, f"kill {k}: {trip.level} output(s) on after the trip"
            edges = [r for r in records if r.kind == TRACE_EDGE]
            assert not [r for r in edges if r.level == 1 and r.actual > trip.target], f"kill {k}: on after the window"
            last = {r.pin: r.level for r in edges}
            assert set(last) == set(_PINS) and set(last.values()) == {0}, f"kill {k}: {last}"
            on_at_trip += any(r.level == 0 and r.actual >= trip.target for r in edges)
    finally:
        fw.stop()
        fw.cleanup()
    assert on_at_trip >= 20  # the trips did cut open valves: the case in question was exercised


_PINS = (2, 3, 4)


def _one_host_death(fw: HostFirmware, seed: int) -> list[TraceRecord]:
    """A host (a forked child) arms the firmware and keeps its outputs busy, then is SIGKILLed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the host; never returns
        os.close(r)
        try:
            _busy_host(fw.port, seed, w)
        finally:
            os._exit(1)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as armed:
            assert armed.read(1) == b"A", "the host never armed the firmware"
        time.sleep(random.Random(seed).uniform(0.2, 0.6))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    records: list[TraceRecord] = []
    gone = time.monotonic() + 1.0  # the trip is due 200 ms after the last frame
    while time.monotonic() < gone:
        records += fw.read_records()
        time.sleep(0.05)
    return records


def _busy_host(port: str, seed: int, armed_fd: int) -> None:
    c = BlockingClient(port)
    rng = random.Random(seed)
    f = c.connect().freq_hz
    for i, pin in enumerate(_PINS):
        c.request(P.ConfigOutput(i, pin, 0, int(0.5 * f)), P.Configured)
    clock0, t0 = c.request(P.GetClock(1), P.Clock).clock, time.monotonic_ns()
    c.request(P.Arm(int(0.2 * f), int(0.005 * f)), P.Armed)
    os.write(armed_fd, b"A")
    pulse_id, free_at = 1, [clock0] * len(_PINS)
    while True:
        now = clock0 + int((time.monotonic_ns() - t0) * f / 1e9)
        for o in range(len(_PINS)):
            if free_at[o] < now + int(0.3 * f):  # every output busy 300 ms ahead
                start, dur = max(free_at[o], now + int(0.02 * f)), int(rng.uniform(0.02, 0.15) * f)
                c.send(P.Schedule(pulse_id, o, start, dur))
                pulse_id, free_at[o] = pulse_id + 1, start + dur + int(0.002 * f)
        c.pump(0.005)
        c.inbox.clear()


class _subreaper:
    """Orphaned descendants are re-parented to this process while inside (Linux)."""

    def __enter__(self) -> None:
        self._prctl(1)

    def __exit__(self, *exc: object) -> None:
        self._prctl(0)

    @staticmethod
    def _prctl(on: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(36, on, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
            pytest.skip(f"cannot become a subreaper: {os.strerror(ctypes.get_errno())}")


def _reap(pid: int, timeout_s: float) -> int:
    """Wait for a child (or adopted orphan) to exit; its exit status.  Fails if it does not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the firmware (pid {pid}) was still running {timeout_s} s after its host died")


def _vc_host_children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found = []
    for k in kids:
        try:
            if Path(f"/proc/{k}/comm").read_text().strip() == "vc-host":
                found.append(int(k))
        except OSError:
            continue
    return found


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
        # Stones are flowing once the firmware has fired valves (a fixed 4 s could land in a
        # slower start-up -- the clock sync's arming -- with no stone in the gap: CI saw gap 0).
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            trace = started[0].trace
            if trace is not None and len(trace.openings) >= 20:
                break
            time.sleep(0.02)
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
