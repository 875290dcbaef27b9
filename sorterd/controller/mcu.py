"""`mcu` valves: the valve-controller firmware (hw/) over a serial port.

The host never times an edge.  Each pulse is converted to the controller's
clock with a continuously fitted clock sync (`clocksync.py`) and sent ahead
of time; the controller fires it from its hardware timer, stamps the actual
edges, and reports them.  The controller owns the fail-safe: per-output
maximum on-time, late pulses refused (never fired late), every output off
when the host goes silent for `silence_ms` -- so a crashed or killed daemon
cannot leave a valve open.

Session (one at a time; the same state machine serves the blocking startup
and the event loop):

    closed --open port--> hello --IDENTITY--> config --CONFIGURED x n-->
    sync --clock ready--> arming --ARMED--> ready
    ready --WATCHDOG report--> arming       (the controller disarmed itself)
    any --port error / EOF / controller silent--> closed  (retry every reconnect_ms)

While not `ready` (disconnected, unsynchronised, re-arming) `schedule()`
refuses: the stone takes the safe route and the refusal is counted.  Nothing
is queued blind.  Pulses in flight when the link drops resolve as
"unknown": the controller fires or refuses them on its own, and its watchdog
turns everything off if the host does not come back.

Threads: everything here runs on the event loop's thread (the serial fd is
registered with add_reader; writes are non-blocking with a small buffer), or
on the caller's thread during the blocking startup before the loop serves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sorterd.clock import Clock
from sorterd.controller import proto as P
from sorterd.controller.clocksync import ClockSync
from sorterd.controller.outputs import ClockTruth, Pulse, PulseOutcome, ValveStats, close_at_exit, closed
from sorterd.domain import JET_BINS

log = logging.getLogger(__name__)

TICK_S = 0.005  # housekeeping period: retransmits, heartbeats, sync, timeouts
HELLO_TIMEOUT_NS = 250_000_000  # SYN unanswered this long: send it again
BURST_INTERVAL_NS = 3_000_000  # clock queries while the sync is being built
REPORT_GRACE_NS = 500_000_000  # a pulse's report may come this long after its end
SURE_AHEAD_NS = 100_000_000  # the sync is built in bursts until it can convert this far ahead
SETTLE_INTERVAL_NS = 20_000_000  # startup: then queried this often until the rate is known
SETTLED_PPM = 30.0  # startup waits for the rate to this (one standard error): a busy loop must not extrapolate the prior



@dataclass
class _InFlight:
    """A pulse the controller has (or will have) in its queue."""

    pulse: Pulse
    pulse_id: int
    fut: asyncio.Future[PulseOutcome] | None


class McuError(OSError):
    """The controller cannot be used (missing dependency, incompatible firmware); the CLI reports it plainly."""


class McuValves:
    def __init__(self, cfg: Any, clock: Clock, port: str, *, truth: ClockTruth | None = None,
                 on_close: list[Callable[[], None]] | None = None,
                 extra_outputs: dict[str, tuple[int, float, bool]] | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.port = port
        self.truth = truth  # the true clock relation, when the composition root has one (a simulated controller)
        self._on_close = list(on_close or [])
        # Output i of the controller: the valves first, then other timed outputs
        # (strobes, the camera trigger) as name -> (pin, max_on_ms, active_low).
        self._extra = dict(extra_outputs or {})
        self._valves = list(JET_BINS) + list(self._extra)
        self._ser: Any = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._arm_allowed = False
        self._reset_session_state()
        self._next_attempt_ns = 0
        self._ever_ready = False
        self._next_pulse_id = 1
        # In-flight pulses, loop thread only.
        self._by_id: dict[int, _InFlight] = {}
        self._by_pulse: dict[Pulse, _InFlight] = {}
        self._results: dict[Pulse, PulseOutcome] = {}  # resolved before anyone awaited
        self.stats_ = ValveStats("mcu", state="closed")
        self.strobe_stats = ValveStats("mcu strobes")  # the extra outputs' refusals
        self.identity: P.Identity | None = None
        self.controller_stats: P.Stats | None = None
        self._ms = 1_000_000
        close_at_exit(self)

    def _reset_session_state(self) -> None:
        self.state = "closed"
        self.link = P.Link()
        self.decoder = P.FrameDecoder()
        self.sync: ClockSync | None = None
        self._wbuf = bytearray()
        self._state_since_ns = 0
        self._last_delivered_ns = 0  # last payload delivered in order
        self._last_tx_ns = 0
        self._next_sync_ns = 0
        self._clock_tokens: dict[int, tuple[int, int]] = {}  # token -> (t_send, retransmits then)
        self._next_token = 1
        self._configured: set[int] = set()
        self._session_ready = False  # this session has been armed once

    # -- the port -------------------------------------------------------------

    def _open_port(self) -> bool:
        try:
            import serial  # pyserial
        except ImportError as exc:
            raise McuError("valves.type = 'mcu' needs pyserial: pip install 'sorterd[serial]'") from exc
        try:
            ser = serial.Serial(self.port, self.cfg.baudrate, timeout=0, write_timeout=0, exclusive=True)
            ser.reset_input_buffer()  # stale bytes from before are not ours
        except (OSError, serial.SerialException) as exc:
            log.debug("cannot open %s: %s", self.port, exc)
            return False
        self._ser, self._fd = ser, ser.fileno()
        os.set_blocking(self._fd, False)
        self._start_session()
        if self._loop is not None:
            self._loop.add_reader(self._fd, self._on_readable)
        return True

    def _close_port(self) -> None:
        if self._fd is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        if self._ser is not None:
            try:
                self._ser.close()
            except OSError:
                pass
        self._ser = self._fd = None

    def _lost(self, why: str) -> None:
        """The port disappeared or the controller went silent: start over."""
        if self.state == "closed":
            return
        log.warning("valve controller on %s lost (%s): stones take the safe route until it is back", self.port, why)
        self._close_port()
        self._set_state("closed")
        self._next_attempt_ns = self.clock.now_ns() + int(self.cfg.reconnect_ms * self._ms)
        for inf in list(self._by_id.values()):
            self._resolve(inf, PulseOutcome(inf.pulse, False, None, None,
                                            "unknown: link to the controller lost before it reported"))

    def _write(self, data: bytes) -> None:
        if not data or self._fd is None:
            return
        if self._wbuf:
            self._wbuf += data
            return
        try:
            n = os.write(self._fd, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._lost(f"write: {exc}")
            return
        self._last_tx_ns = self.clock.now_ns()
        if n < len(data):
            self._wbuf += data[n:]
            if self._loop is not None:
                self._loop.add_writer(self._fd, self._drain_wbuf)

    def _drain_wbuf(self) -> None:
        if self._fd is None:
            return
        try:
            n = os.write(self._fd, self._wbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"write: {exc}")
            return
        del self._wbuf[:n]
        if not self._wbuf and self._loop is not None:
            self._loop.remove_writer(self._fd)

    def _flush(self) -> None:
        self._write(self.link.output(self.clock.now_ns()))

    def _send(self, msg: P.Message) -> bool:
        ok = self.link.send(msg.encode())
        self._flush()
        return ok

    # -- receiving ------------------------------------------------------------

    def _on_readable(self) -> None:
        t_recv = self.clock.now_ns()  # first: clock-sync samples depend on it
        if self._fd is None:
            return
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"read: {exc}")
            return
        if not data:
            self._lost("end of file (device gone)")
            return
        for frame in self.decoder.feed(data):
            payload = self.link.receive(frame, t_recv)
            if payload is not None:
                self._last_delivered_ns = t_recv
                self._dispatch(payload, t_recv)
        self._flush()

    def _dispatch(self, payload: bytes, t_recv: int) -> None:
        try:
            msg = P.decode(payload)
        except P.ProtocolError as exc:
            log.warning("valve controller sent a malformed report: %s", exc)
            return
        handler = _HANDLERS.get(type(msg))
        if handler is None:
            log.warning("valve controller sent an unexpected %s", type(msg).__name__)
            return
        handler(self, msg, t_recv)

    # -- session --------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        log.debug("valve controller on %s: %s -> %s", self.port, self.state, state)
        self.state = state
        self.stats_.state = state
        self._state_since_ns = self.clock.now_ns()

    def _start_session(self) -> None:
        self._wbuf.clear()  # half a frame from the last session would garble the SYN
        self.link = P.Link()
        self.decoder = P.FrameDecoder()
        self._clock_tokens.clear()
        self._configured.clear()
        self._session_ready = False
        self.link.start(P.Identify().encode())
        self._set_state("hello")
        self._last_delivered_ns = self.clock.now_ns()
        self._flush()

    def _on_identity(self, msg: P.Identity, t: int) -> None:
        if self.state != "hello":
            return
        if msg.version != P.PROTO_VERSION or msg.outputs < len(self._valves):
            self._close_port()
            self._set_state("closed")
            raise McuError(f"valve controller on {self.port}: protocol {msg.version} with {msg.outputs} outputs; "
                           f"need protocol {P.PROTO_VERSION} and {len(self._valves)} outputs")
        self.identity = msg
        if self.sync is None or self.sync.nominal_hz != msg.freq_hz:
            self.sync = ClockSync(msg.freq_hz)
        else:
            self.sync.reset()  # the controller may have restarted: its clock too
        self._set_state("config")
        for i, name in enumerate(self._valves):
            pin, max_on_ms, active_low = self._output(name)
            self._send(P.ConfigOutput(i, pin, 1 if active_low else 0, int(max_on_ms * 1e-3 * msg.freq_hz)))

    def _output(self, name: str) -> tuple[int, float, bool]:
        if name in self._extra:
            return self._extra[name]
        return int(self.cfg.pins[name]), self.cfg.max_on_ms, self.cfg.active_low

    def _on_configured(self, msg: P.Configured, t: int) -> None:
        if msg.status != 0:
            name = self._valves[msg.output] if msg.output < len(self._valves) else None
            log.error("valve controller refused output %s (pin %s): %s", name or msg.output,
                      self._output(name)[0] if name else "?", P.CONFIG_STATUS.get(msg.status, msg.status))
            self._lost("output configuration refused")
            return
        self._configured.add(msg.output)
        if self.state == "config" and len(self._configured) == len(self._valves):
            self._set_state("sync")
            self._next_sync_ns = 0

    def _on_clock(self, msg: P.Clock, t_recv: int) -> None:
        sent = self._clock_tokens.pop(msg.token, None)
        if sent is None or self.sync is None:
            return
        t_send, retransmits = sent
        if self.link.retransmits != retransmits:
            return  # which transmission did it answer?  Karn: don't use it
        self.sync.add(t_send, t_recv, msg.clock)
        self.stats_.clock_rtt_ns = self.sync.last_rtt_ns
        self.stats_.clock_offset_ns = self.sync.last_residual_ns
        self.stats_.clock_drift_ppm = self.sync.drift_ppm
        self._maybe_arm()

    def _maybe_arm(self) -> None:
        if self.state == "sync" and self._arm_allowed and self.sync is not None and self.sync.ready:
            self._arm()

    def _arm(self) -> None:
        assert self.identity is not None
        f = self.identity.freq_hz
        self._set_state("arming")
        self._send(P.Arm(int(self.cfg.silence_ms * 1e-3 * f), int(self.cfg.late_limit_us * 1e-6 * f)))

    def _on_armed(self, msg: P.Armed, t: int) -> None:
        if self.state != "arming":
            return
        self._set_state("ready")
        if not self._session_ready:  # not a re-arm after a watchdog trip
            if self._ever_ready:
                self.stats_.reconnects += 1
                log.warning("valve controller on %s back: synchronised and armed", self.port)
            self._session_ready = self._ever_ready = True

    def _on_watchdog(self, msg: P.Watchdog, t: int) -> None:
        self.stats_.watchdog_trips += 1
        log.error("valve controller watchdog tripped (host silent > %.0f ms): all valves off; re-arming",
                  self.cfg.silence_ms)
        if self.state == "ready":
            self._arm()

    def _on_stats(self, msg: P.Stats, t: int) -> None:
        self.controller_stats = msg

    def _on_error(self, msg: P.Error, t: int) -> None:
        log.error("valve controller: %s (command 0x%02x)", P.ERROR_CODES.get(msg.code, msg.code), msg.command)

    def _on_reset_done(self, msg: P.ResetDone, t: int) -> None:
        pass

    # -- pulse reports --------------------------------------------------------

    def _on_fired(self, msg: P.Fired, t: int) -> None:
        inf = self._by_id.get(msg.pulse_id)
        if inf is None or self.sync is None or not self.sync.ready:
            return
        on_ns, off_ns = self.sync.host_at(msg.on_clock), self.sync.host_at(msg.off_clock)
        if inf.pulse.valve in self._extra:  # a strobe: its owner keeps its own figures
            self._resolve(inf, PulseOutcome(inf.pulse, True, on_ns, off_ns, "fired"))
            return
        self.stats_.fired(inf.pulse.start_ns, on_ns)
        self.stats_.fired(inf.pulse.end_ns, off_ns)
        if self.truth is not None:
            self.stats_.true_fire_error_ns.append(self.truth.mcu_to_host(msg.on_clock) - inf.pulse.start_ns)
            self.stats_.true_fire_error_ns.append(self.truth.mcu_to_host(msg.off_clock) - inf.pulse.end_ns)
        status = "fired"
        if msg.flags & P.FIRED_CUT_WATCHDOG:
            status = "fired: cut short by the controller's watchdog"
        elif msg.flags & P.FIRED_CUT_MAX_ON:
            status = "fired: cut short by the controller's max on-time"
        self._resolve(inf, PulseOutcome(inf.pulse, True, on_ns, off_ns, status))

    def _on_refused(self, msg: P.Refused, t: int) -> None:
        reason = P.REFUSAL_REASONS.get(msg.reason, f"reason {msg.reason}")
        inf = self._by_id.get(msg.pulse_id)
        stats = self.strobe_stats if inf is not None and inf.pulse.valve in self._extra else self.stats_
        stats.refuse(f"controller: {reason}")
        if inf is not None:
            self._resolve(inf, PulseOutcome(inf.pulse, False, None, None, f"refused: controller: {reason}"))

    def _on_cancelled(self, msg: P.Cancelled, t: int) -> None:
        inf = self._by_id.get(msg.pulse_id)
        if inf is None:
            return
        if msg.result == P.CANCEL_OK:
            self._resolve(inf, PulseOutcome(inf.pulse, False, None, None, "cancelled"))
        elif msg.result == P.CANCEL_ALREADY_ON:
            log.warning("%s: cancel came too late, the valve was already open", inf.pulse.stone_id)

    def _resolve(self, inf: _InFlight, outcome: PulseOutcome) -> None:
        self._by_id.pop(inf.pulse_id, None)
        self._by_pulse.pop(inf.pulse, None)
        if inf.fut is not None and not inf.fut.done():
            inf.fut.set_result(outcome)
        elif inf.fut is None:
            self._results[inf.pulse] = outcome

    # -- housekeeping ---------------------------------------------------------

    def _service(self, now: int) -> None:
        """Periodic work: reconnect, hello retry, heartbeat, clock sync, timeouts."""
        if self._closed:
            return
        if self.state == "closed":
            if now >= self._next_attempt_ns and not self._open_port():
                self._next_attempt_ns = now + int(self.cfg.reconnect_ms * self._ms)
            return
        # Nothing delivered in order while we kept talking (a clock query goes
        # out every sync_interval_ms and is always answered): the controller is
        # gone, or the link is out of step.  A pause of our own loop does not
        # count against it.  Start over with a new session.
        if self._last_tx_ns - self._last_delivered_ns > self.cfg.link_timeout_ms * self._ms:
            self._lost(f"nothing from the controller for {(now - self._last_delivered_ns) / 1e6:.0f} ms")
            return
        if self.state == "hello" and now - self._state_since_ns > HELLO_TIMEOUT_NS:
            self._start_session()
            return
        self._maybe_arm()
        self._query_clock_if_due(now)
        if now - self._last_tx_ns > self.cfg.heartbeat_ms * self._ms and self.state in ("arming", "ready", "sync"):
            self._send(P.Heartbeat())
        self._expire_reports(now)
        self._flush()

    def _query_clock_if_due(self, now: int) -> None:
        if self.state not in ("sync", "arming", "ready") or now < self._next_sync_ns:
            return
        burst = self.sync is None or not self._sync_sure(now + SURE_AHEAD_NS)
        self._next_sync_ns = now + self._sync_interval_ns(burst)
        token = self._next_token
        self._next_token = (self._next_token + 1) & 0xFFFFFFFF
        if len(self._clock_tokens) > 16:
            self._clock_tokens.clear()  # answers that never came
        if not self.link.send(P.GetClock(token).encode()):
            return
        self._clock_tokens[token] = (self.clock.now_ns(), self.link.retransmits)
        self._flush()

    def _sync_interval_ns(self, burst: bool) -> int:
        if burst:
            return BURST_INTERVAL_NS
        if not self._arm_allowed and self.sync is not None and self.sync.rate_error_ppm > SETTLED_PPM:
            return SETTLE_INTERVAL_NS  # startup: spread the samples to measure the rate
        return int(self.cfg.sync_interval_ms * self._ms)

    def _expire_reports(self, now: int) -> None:
        for inf in list(self._by_id.values()):
            if now > inf.pulse.end_ns + REPORT_GRACE_NS:
                self._resolve(inf, PulseOutcome(inf.pulse, False, None, None,
                                                "unknown: no report from the controller"))

    def _tick(self) -> None:
        self._timer = None
        try:
            self._service(self.clock.now_ns())
        finally:
            if not self._closed and self._loop is not None:
                self._timer = self._loop.call_later(TICK_S, self._tick)

    # -- startup --------------------------------------------------------------

    def start_blocking(self, timeout_s: float) -> None:
        """Connect and synchronise before the event loop serves (startup only:
        nothing else runs yet), then hand the port to the running loop.

        Blocks at most timeout_s; if the controller does not answer in time the
        backend keeps trying from the loop and refuses pulses meanwhile.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._synced_for_arming():
            self._service(self.clock.now_ns())
            if self._fd is None:
                time.sleep(0.01)
                continue
            ready, _, _ = select.select([self._fd], [], [], 0.002)
            if ready:
                self._on_readable()
        if not self._synced_for_arming():
            log.error("valve controller on %s: no synchronised answer within %.1f s; still trying",
                      self.port, timeout_s)
        self.attach()

    def _sync_sure(self, t_ns: int) -> bool:
        """Can host time t_ns be converted within max_sync_error_us?  A host stall only
        ages the line; it is trusted as long as its error bound, grown by the drift
        that could have happened since the last good sample, stays small."""
        sync = self.sync
        return sync is not None and sync.ready and sync.error_ns(t_ns) <= self.cfg.max_sync_error_us * 1e3

    def _synced_for_arming(self) -> bool:
        return (self.state == "sync" and self.sync is not None and self.sync.ready
                and self.sync.rate_error_ppm <= SETTLED_PPM)

    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Serve from the event loop: reader, housekeeping timer, arming."""
        self._loop = loop or asyncio.get_running_loop()
        self._arm_allowed = True
        # Queries sent before the loop serves are answered after whatever the
        # rest of startup blocks for: their round trips say nothing.
        self._clock_tokens.clear()
        if self.sync is not None:
            self.sync.forget_round_trips()  # startup's quiet exchanges say nothing of the busy loop's
        if self._fd is not None:
            self._loop.add_reader(self._fd, self._on_readable)
        # Arm from the first tick, when the loop serves: armed, the controller
        # wants a heartbeat every silence_ms, and startup may still block.
        self._timer = self._loop.call_soon(self._tick)  # type: ignore[assignment]

    async def wait_ready(self, timeout_s: float) -> bool:
        """Until the controller is armed and synchronised (tests, tools)."""
        deadline = time.monotonic() + timeout_s
        while self.state != "ready" and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return self.state == "ready"

    # -- the Valves interface --------------------------------------------------

    def _not_ready(self, now: int) -> tuple[str, str] | None:
        if self.state != "ready":
            return ("controller disconnected", "") if self.state == "closed" else ("controller not ready", self.state)
        assert self.sync is not None
        if not self.sync.ready or self.sync.last_good_ns is None:
            return "clock sync lost", "no line yet"
        if now - self.sync.last_good_ns > self.cfg.sync_timeout_ms * self._ms:
            return "clock sync lost", f"no good sample for {(now - self.sync.last_good_ns) / 1e6:.0f} ms"
        if self.link.backlog > self.link.window:
            return "link congested", ""
        return None

    def schedule(self, pulse: Pulse) -> str | None:
        now = self.clock.now_ns()
        stats = self.strobe_stats if pulse.valve in self._extra else self.stats_
        why = self._not_ready(now)
        if why:
            return stats.refuse(*why)
        lead = pulse.start_ns - now
        if lead < self.cfg.min_lead_ms * self._ms:
            return stats.refuse("late", f"start {lead / 1e6:.2f} ms ahead, needs {self.cfg.min_lead_ms:.2f} ms")
        assert self.sync is not None
        if not self._sync_sure(pulse.start_ns):
            return stats.refuse("clock sync lost", f"clock uncertain by {self.sync.error_ns(pulse.start_ns) / 1e3:.0f} us "
                                f"at the start, allowed {self.cfg.max_sync_error_us:.0f} us")
        start = self.sync.clock_at(pulse.start_ns)
        pid = self._next_pulse_id
        self._next_pulse_id = (self._next_pulse_id + 1) & 0xFFFFFFFF or 1
        msg = P.Schedule(pid, self._valves.index(pulse.valve), start, max(1, self.sync.ticks(pulse.duration_ns)))
        if not self.link.send(msg.encode()):
            return stats.refuse("link congested")
        inf = _InFlight(pulse, pid, None)
        self._by_id[pid] = inf
        self._by_pulse[pulse] = inf
        if self.truth is not None:
            # When the controller's clock truly reads `start`, vs when the host meant.
            self.stats_.sync_error_ns.append(self.truth.mcu_to_host(start) - pulse.start_ns)
        self._flush()
        return None

    def cancel(self, pulse: Pulse) -> bool:
        inf = self._by_pulse.get(pulse)
        if inf is None or self.state != "ready":
            return False
        # The cancel must reach the controller before the start, surely.
        margin = max(self.cfg.min_lead_ms * self._ms, 4 * (self.sync.min_rtt_ns if self.sync else 0))
        if pulse.start_ns - self.clock.now_ns() < margin:
            return False
        return self._send(P.Cancel(inf.pulse_id))

    async def outcome(self, pulse: Pulse) -> PulseOutcome:
        done = self._results.pop(pulse, None)
        if done is not None:
            return done
        inf = self._by_pulse.get(pulse)
        if inf is None:
            raise KeyError(f"pulse for {pulse.stone_id} was never scheduled")
        if inf.fut is None:
            inf.fut = asyncio.get_running_loop().create_future()
        return await asyncio.shield(inf.fut)

    def stats(self) -> ValveStats:
        return self.stats_

    def request_controller_stats(self) -> None:
        """Ask for the controller's counters (answer lands in controller_stats)."""
        if self.state in ("sync", "arming", "ready"):
            self._send(P.GetStats())

    def close(self) -> None:
        """Everything off: tell the controller (RESET), then let go of the port."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._fd is not None and self.state != "hello":
            self.link.send(P.Reset().encode())
            self._wbuf.clear()
            self._flush()  # best effort; the controller's watchdog is the backstop
        self._close_port()
        self._set_state("closed")
        for inf in list(self._by_id.values()):
            self._resolve(inf, PulseOutcome(inf.pulse, False, None, None, "cancelled: valves closed"))
        for fn in self._on_close:
            try:
                fn()
            except Exception:  # noqa: BLE001 -- closing must go on
                log.exception("closing %s failed", fn)
        closed(self)


_HANDLERS: dict[type, Callable[[McuValves, Any, int], None]] = {
    P.Identity: McuValves._on_identity,
    P.Configured: McuValves._on_configured,
    P.Clock: McuValves._on_clock,
    P.Armed: McuValves._on_armed,
    P.Watchdog: McuValves._on_watchdog,
    P.Fired: McuValves._on_fired,
    P.Refused: McuValves._on_refused,
    P.Cancelled: McuValves._on_cancelled,
    P.Stats: McuValves._on_stats,
    P.Error: McuValves._on_error,
    P.ResetDone: McuValves._on_reset_done,
}
