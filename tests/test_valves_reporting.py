"""Valve timing in the run summary (from the simulator's view of the pins) and in Prometheus."""

from __future__ import annotations

import urllib.request
from dataclasses import fields
from types import SimpleNamespace
from typing import Any

from sorterd.controller.outputs import ValveStats
from sorterd.metrics import Metrics
from sorterd.sim.firmware import TRACE_EDGE, TRACE_SESSION, TRACE_WATCHDOG, TraceRecord, TrueClock, ValveTrace
from sorterd.sim.truth import planned_pulses
from sorterd.sorting.record import StoneRow
from sorterd.sorting.stats import RunCounter
from sorterd.sorting.summary import valve_summary

TRUTH = TrueClock(t0_ns=1_000_000_000, offset=5_000_000, freq_hz=12_000_000.0)


def row(sid: str, valve: str, on: int | None, off: int | None, status: str) -> StoneRow:
    values: dict[str, Any] = {f.name: 0 for f in fields(StoneRow)}
    values.update(stone_id=sid, bin=valve, route=valve, reason="", planned_on_ns=on, planned_off_ns=off,
                  valve_status=status, color=None, clarity=None, model_version="v", wall_time="")
    return StoneRow(**values)


class FakeWorld:
    def __init__(self) -> None:
        self.jets: list[tuple[str, int, int]] = []
        self.valve_trace: Any = None

    def open_jet(self, valve: str, on: int, off: int) -> tuple[int, int]:
        self.jets.append((valve, on, off))
        return on, off


def trace_with(records: list[TraceRecord], world: FakeWorld) -> ValveTrace:
    fw = SimpleNamespace(truth=TRUTH, trace_fd=-1, read_records=lambda: records)
    t = ValveTrace(fw, world, {2: "CUT", 3: "SELECT"})  # type: ignore[arg-type]
    t.poll()
    return t


def test_edges_open_jets_at_their_true_times_and_give_sync_and_fire_errors() -> None:
    world = FakeWorld()
    c = TRUTH.host_to_mcu
    planned_on, planned_off = 2_000_000_000, 2_005_000_000
    # The host's clock estimate was 12 ticks (1 us) late; the edges came 3 us and 5 us after their targets.
    target_on, target_off = c(planned_on) + 12, c(planned_off) + 12
    recs = [TraceRecord(c(0), 0, TRACE_SESSION, 0, 0),
            TraceRecord(target_on + 36, target_on, TRACE_EDGE, 2, 1),
            TraceRecord(target_off + 60, target_off, TRACE_EDGE, 2, 0),
            TraceRecord(c(3_000_000_000), c(3_000_000_000), TRACE_WATCHDOG, 0, 0)]
    world.valve_trace = trace_with(recs, world)
    rows = [row("S1", "CUT", planned_on, planned_off, "fired"),
            row("S2", "SELECT", 2_100_000_000, 2_105_000_000, "refused: controller disconnected"),
            row("S3", "SELECT", 2_200_000_000, 2_205_000_000, "refused: controller not ready (sync)")]
    count = RunCounter(Metrics())  # the daemon counts each finished row's refusal, and keeps no rows
    for r in rows:
        count.finished(r.bin, r.route, r.valve_status)
    s = valve_summary(count.stats.refusal_kinds, world.valve_trace, planned_pulses(rows))
    assert world.jets == [("CUT", planned_on + 4000, planned_off + 6000)]
    assert s["sync_error_us"]["p50"] == 1.0 and s["sync_error_us"]["n"] == 1
    assert s["fire_error_us"]["n"] == 2 and s["fire_error_us"]["max"] == 6.0
    assert s["valve_refusals"] == 2
    assert s["valve_refusal_reasons"] == {"refused: controller disconnected": 1, "refused: controller not ready": 1}
    assert (s["watchdog_trips"], s["reconnects"]) == (1, 0)


def test_a_valve_left_open_when_the_controller_stops_is_seen() -> None:
    world = FakeWorld()
    t = trace_with([TraceRecord(TRUTH.host_to_mcu(2_000_000_000), 0, TRACE_EDGE, 3, 1)], world)
    t.close(now_ns=2_500_000_000)
    assert world.jets == [("SELECT", 2_000_000_000, 2_500_000_000)]


def test_without_a_controller_there_is_no_valve_section() -> None:
    assert valve_summary({}, None) == {}


def test_prometheus_exposes_the_backends_figures() -> None:
    st = ValveStats("mcu")
    st.fired(1_000_000, 1_000_020)
    st.refuse("controller disconnected")
    st.watchdog_trips, st.reconnects, st.clock_rtt_ns, st.clock_drift_ppm = 1, 2, 150_000, 37.0
    m = Metrics()
    m.watch_valves(SimpleNamespace(stats=lambda: st))
    port = m.serve("127.0.0.1", 0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.close()
    assert 'sorterd_valve_fire_error_seconds_bucket{le="2.5e-05"} 1.0' in body
    assert 'sorterd_valve_refusals_total{reason="controller disconnected"} 1.0' in body
    assert "sorterd_valve_watchdog_trips_total 1.0" in body
    assert "sorterd_valve_reconnects_total 2.0" in body
    assert "sorterd_valve_clock_rtt_seconds 0.00015" in body
    assert "sorterd_valve_clock_drift_ratio 3.7e-05" in body  # base unit: 37 ppm
