"""The valve controller in the simulated machine: the firmware's host build on a pty.

`sorterd run --sim --valves mcu` runs the real firmware logic (hw/firmware/core)
as a process (`vc-host`) on a pseudo-terminal; the `mcu` backend talks to it
over the real serial stack, exactly as to a board on USB.  The process has its
own clock (a distinct frequency, offset and drift, so clock sync is real work)
and simulated pins whose every edge it writes to a pipe.

`ValveTrace` is the simulated machine's oscilloscope on the valve drivers: it
reads those edges, converts the firmware's clock stamps to host time with the
TRUE clock relation (the simulator started the firmware, so it knows it), and
opens the world's jets from them -- where a stone lands depends on when the
firmware actually toggled the pin, not on what anyone intended.  It also keeps
the timing truth for the run summary.

The build: `firmware_binary()` runs `make` in hw/firmware/host into a cache
directory keyed by a hash of the sources (a fresh clone builds once, in about
a second); a missing compiler is a clear error.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import select
import shutil
import signal
import struct
import subprocess
import tempfile
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TRACE = struct.Struct("=QQBBB5x")  # see hw/firmware/host/main.c
TRACE_EDGE, TRACE_WATCHDOG, TRACE_SESSION, TRACE_LATE = 1, 2, 3, 4


class FirmwareError(OSError):
    """The host build cannot be built or started (an OSError: the CLI reports it plainly)."""


# -- building -------------------------------------------------------------------


def firmware_source() -> Path:
    """The host build's C sources: $SORTERD_FIRMWARE_SRC, else the checkout's hw/firmware, else the
    copy a wheel carries (sorterd/_bundled/firmware: core/, host/, test/; see setup.py)."""
    env = os.environ.get("SORTERD_FIRMWARE_SRC")
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent / "hw" / "firmware"
    if env:
        src = Path(env)
    elif (checkout / "host" / "Makefile").is_file():
        src = checkout
    else:
        src = package / "_bundled" / "firmware"
    if not (src / "host" / "Makefile").is_file():
        raise FirmwareError(
            f"the valve-controller firmware sources are not at {src} (host/Makefile is missing): "
            "reinstall sorterd from a wheel or a clone, or set SORTERD_FIRMWARE_SRC to a copy of hw/firmware")
    return src


def _cache_dir() -> Path:
    base = os.environ.get("SORTERD_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sorterd" / "firmware"


def _source_hash(src: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(src.rglob("*")):
        if p.is_file() and p.suffix in (".c", ".h") or p.name == "Makefile":
            h.update(str(p.relative_to(src)).encode())
            h.update(p.read_bytes())
    h.update((os.environ.get("CC") or "cc").encode())
    return h.hexdigest()[:16]


def _cached_binary(src: Path) -> Path:
    return _cache_dir() / _source_hash(src) / "vc-host"


def missing_build_tools() -> list[str]:
    """The tools a build needs (`make`, $CC or `cc`) that are not on PATH."""
    cc = os.environ.get("CC") or "cc"
    return [tool for tool in ("make", cc) if shutil.which(tool) is None]


def _missing_tools_message(missing: list[str]) -> str:
    return (f"building the valve-controller firmware's host build needs {' and '.join(missing)}, not found on "
            "PATH (Debian/Ubuntu: apt install build-essential)")


def host_build_unavailable(rebuild: bool = False) -> str | None:
    """Why the host build cannot be had on this machine, or None when it can (already built,
    or the tools are there).  rebuild: the caller runs `make` itself, so a cached binary is not enough."""
    try:
        src = firmware_source()
    except FirmwareError as exc:
        return str(exc)
    if not rebuild and _cached_binary(src).is_file():
        return None
    missing = missing_build_tools()
    return _missing_tools_message(missing) if missing else None


def firmware_binary() -> Path:
    """The host build's binary, built on first use (cached by source hash)."""
    src = firmware_source()
    binary = _cached_binary(src)
    out = binary.parent
    if binary.is_file():
        return binary
    missing = missing_build_tools()
    if missing:
        raise FirmwareError(_missing_tools_message(missing))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test runs build once
        if not binary.is_file():
            _build(src, out)
    return binary


def _build(src: Path, out: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=out.parent))
    res = subprocess.run(["make", "-s", "-C", str(src / "host"), f"O={tmp}", "all", "test"],
                         capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FirmwareError(f"building the firmware host build failed:\n{res.stdout}{res.stderr}")
    tmp.rename(out)
    log.info("built the valve-controller host build in %s", out)


# -- the process ----------------------------------------------------------------


@dataclass(frozen=True)
class TrueClock:
    """The firmware's clock as a function of host monotonic time (the truth)."""

    t0_ns: int
    offset: int
    freq_hz: float  # true rate, drift included

    def host_to_mcu(self, t_ns: int) -> int:
        return self.offset + round((t_ns - self.t0_ns) * self.freq_hz * 1e-9)

    def mcu_to_host(self, clock: int) -> int:
        return self.t0_ns + round((clock - self.offset) * 1e9 / self.freq_hz)


@dataclass(frozen=True)
class TraceRecord:
    actual: int  # controller clock read right after the pin changed
    target: int  # the clock the edge was scheduled for
    kind: int
    pin: int
    level: int  # an edge: the new level; a watchdog trip: outputs still on right after it (pins read back)


class HostFirmware:
    """One running `vc-host`: its pty (behind a stable link path), its truth, its trace pipe."""

    def __init__(self, *, freq_hz: float = 12_000_000.0, drift_ppm: float = 0.0, offset: int = 0,
                 realtime: bool = False, replug_ms: int = 500, spin_us: int = 200,
                 link_dir: Path | None = None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="sorterd-vc-", dir=link_dir))
        self.port = str(self._dir / "ttyVC0")
        self.args = ["--link", self.port, "--freq-hz", str(freq_hz), "--drift-ppm", str(drift_ppm),
                     "--offset", str(offset), "--replug-ms", str(replug_ms), "--spin-us", str(spin_us)]
        if realtime:
            self.args.append("--realtime")
        self.proc: subprocess.Popen[bytes] | None = None
        self.truth: TrueClock | None = None
        self.trace_fd = -1
        self.slave = ""
        self._partial = b""  # a trace record split across reads

    def start(self, timeout_s: float = 10.0) -> HostFirmware:
        binary = firmware_binary()
        r, w = os.pipe()
        try:
            self.proc = subprocess.Popen([str(binary), *self.args, "--trace-fd", str(w)], pass_fds=(w,),
                                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        finally:
            os.close(w)
        self.trace_fd = r
        os.set_blocking(r, False)
        self._read_ready(timeout_s)
        return self

    def _read_ready(self, timeout_s: float) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("READY "):
            self.stop()
            raise FirmwareError(f"the firmware host build did not start (got {line!r})")
        kv = dict(item.split("=", 1) for item in line.split()[1:])
        self.slave = kv["slave"]
        self.truth = TrueClock(int(kv["t0_ns"]), int(kv["offset"]), float(kv["freq_hz"]))

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def read_records(self) -> list[TraceRecord]:
        """Everything the firmware traced since the last call (non-blocking)."""
        data = bytearray()
        while self.trace_fd >= 0:
            try:
                chunk = os.read(self.trace_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        self._partial += bytes(data)
        n = len(self._partial) // TRACE.size * TRACE.size
        recs = [TraceRecord(*TRACE.unpack_from(self._partial, i)) for i in range(0, n, TRACE.size)]
        self._partial = self._partial[n:]
        return recs

    def unplug(self) -> None:
        """Pull the cable: the pty disappears for replug_ms, then comes back."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGUSR1)

    def stop(self, timeout_s: float = 3.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the firmware turns every output off
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def cleanup(self) -> None:
        if self.trace_fd >= 0:
            os.close(self.trace_fd)
            self.trace_fd = -1
        shutil.rmtree(self._dir, ignore_errors=True)


# -- the oscilloscope ---------------------------------------------------------------


@dataclass
class ValveEdgePair:
    """One valve opening as the pins showed it, in true host time."""

    valve: str
    on_ns: int
    off_ns: int
    target_on_ns: int  # when the controller's clock truly read the commanded start
    target_off_ns: int


@dataclass
class ValveTrace:
    """Watches a simulated controller's pins; opens the world's jets from them.

    Reads the trace pipe on the event loop (loop thread owns everything here)."""

    fw: HostFirmware
    world: Any  # sorterd.sim.world.World
    pins: dict[int, str]  # controller pin -> valve (bin)
    openings: list[ValveEdgePair] = field(default_factory=list)
    watchdog_trips: list[int] = field(default_factory=list)  # true host ns of each trip
    sessions: int = 0
    late_at_fire: int = 0
    _high: dict[int, tuple[int, int]] = field(default_factory=dict)  # pin -> (on_ns, target_on_ns)
    _loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.fw.trace_fd, self.poll)

    def poll(self) -> None:
        truth = self.fw.truth
        assert truth is not None
        for rec in self.fw.read_records():
            self._record(rec, truth)

    def _record(self, rec: TraceRecord, truth: TrueClock) -> None:
        actual, target = truth.mcu_to_host(rec.actual), truth.mcu_to_host(rec.target)
        if rec.kind == TRACE_SESSION:
            self.sessions += 1
        elif rec.kind == TRACE_WATCHDOG:
            self.watchdog_trips.append(actual)
            if rec.level:  # outputs whose pin the firmware left active through the trip
                log.error("valve controller watchdog tripped but %d output(s) stayed on", rec.level)
        elif rec.kind == TRACE_LATE:
            self.late_at_fire += 1
        elif rec.kind == TRACE_EDGE and rec.pin in self.pins:
            if rec.level:
                self._high[rec.pin] = (actual, target)
            elif rec.pin in self._high:
                self._opened(rec.pin, self._high.pop(rec.pin), actual, target)

    def _opened(self, pin: int, on: tuple[int, int], off_ns: int, target_off_ns: int) -> None:
        valve = self.pins[pin]
        self.world.open_jet(valve, on[0], off_ns)  # the jet follows the electrical edges
        self.openings.append(ValveEdgePair(valve, on[0], off_ns, on[1], target_off_ns))

    def close(self, now_ns: int) -> None:
        """Read what is left; a pin still high kept its valve open until now."""
        if self._loop is not None and not self._loop.is_closed() and self.fw.trace_fd >= 0:
            self._loop.remove_reader(self.fw.trace_fd)
        if self.fw.trace_fd >= 0:
            self.poll()
        for pin, on in list(self._high.items()):
            log.error("valve %s was still open when the controller stopped", self.pins[pin])
            self._opened(pin, on, now_ns, now_ns)
        self._high.clear()

    # -- the truth for the run summary --------------------------------------------

    def summary(self, planned: Sequence[tuple[str, int, int]]) -> dict[str, Any]:
        """Timing truth vs the host's intentions: planned = (valve, on_ns, off_ns) of every pulse sent."""
        starts: dict[str, list[tuple[int, int]]] = {}
        for valve, on, off in planned:
            starts.setdefault(valve, []).append((on, off))
        for lst in starts.values():
            lst.sort()
        sync, fire = [], []
        for op in self.openings:
            match = _nearest(starts.get(op.valve, []), op.target_on_ns, 2_000_000)
            if match is None:
                continue
            sync.append(op.target_on_ns - match[0])
            fire += [op.on_ns - match[0], op.off_ns - match[1]]
        return {
            "sync_error_us": _percentiles_us(sync),
            "fire_error_us": _percentiles_us(fire),
            "valve_controller": {"openings": len(self.openings), "matched": len(sync),
                                 "watchdog_trips": len(self.watchdog_trips),
                                 "reconnects": max(0, self.sessions - 1),
                                 "late_at_fire": self.late_at_fire},
        }


def _nearest(starts: list[tuple[int, int]], t: int, within_ns: int) -> tuple[int, int] | None:
    i = bisect_left(starts, (t, -1))
    best = min((starts[j] for j in (i - 1, i) if 0 <= j < len(starts)), key=lambda s: abs(s[0] - t), default=None)
    return best if best is not None and abs(best[0] - t) <= within_ns else None


def _percentiles_us(errors_ns: Sequence[int]) -> dict[str, float | int | None]:
    """|error| p50 / p99 / max in us, the signed median (bias) and the count."""
    if not errors_ns:
        return {"p50": None, "p99": None, "max": None, "bias": None, "n": 0}
    a = np.asarray(errors_ns, dtype=float) / 1e3
    ab = np.abs(a)
    return {"p50": round(float(np.percentile(ab, 50)), 2), "p99": round(float(np.percentile(ab, 99)), 2),
            "max": round(float(ab.max()), 2), "bias": round(float(np.median(a)), 2), "n": int(a.size)}


# -- wiring it into the simulated machine ---------------------------------------------


@dataclass
class SimulatedController:
    fw: HostFirmware
    trace: ValveTrace | None
    clock: Any

    @property
    def port(self) -> str:
        return self.fw.port

    @property
    def truth(self) -> TrueClock:
        assert self.fw.truth is not None
        return self.fw.truth

    def close(self) -> None:
        """After the backend has reset the controller: stop it, read the last edges."""
        self.fw.stop()
        if self.trace is not None:
            self.trace.close(self.clock.now_ns())
        self.fw.cleanup()


def start_simulated_controller(cfg: Any, sim: Any, machine: Any, clock: Any) -> SimulatedController:
    """Launch the host build for `[valves] type = "mcu"` on the simulated machine (its clock
    from `sim.controller_*`) and, when the simulated machine is there, let its world see the pins."""
    fw = HostFirmware(freq_hz=sim.controller_freq_hz, drift_ppm=sim.controller_drift_ppm,
                      offset=sim.controller_offset, realtime=sim.controller_realtime).start()
    trace = None
    try:
        if machine is not None:
            pins = {int(p): valve for valve, p in cfg.pins.items()}
            trace = ValveTrace(fw, machine.world, pins)
            trace.attach(asyncio.get_running_loop())
            machine.world.valve_trace = trace
    except BaseException:
        fw.stop()  # reaped: no zombie when startup fails
        fw.cleanup()
        raise
    return SimulatedController(fw, trace, clock)


# -- a blocking protocol client (tests, benchmarks, bring-up) -----------------------------


class BlockingClient:
    """Talks the controller protocol over a port with plain blocking I/O.

    For tests, benchmarks and bring-up of a new board; the daemon uses
    `sorterd.controller.mcu.McuValves`.  One thread only.
    """

    def __init__(self, port: str) -> None:
        import serial

        from sorterd.controller import proto

        self.P = proto
        self.ser = serial.Serial(port, 250000, timeout=0)
        self.link = proto.Link()
        self.decoder = proto.FrameDecoder()
        self.inbox: list[Any] = []
        self.last_written = b""  # for replay tests

    def _now(self) -> int:
        import time

        return time.monotonic_ns()

    def pump(self, timeout_s: float = 0.0) -> None:
        """Write what the link owes; read what arrived (waiting up to timeout_s)."""
        out = self.link.output(self._now())
        if out:
            self.ser.write(out)
            self.last_written = out
        ready, _, _ = select.select([self.ser.fileno()], [], [], timeout_s)
        if not ready:
            return
        data = self.ser.read(4096)
        for frame in self.decoder.feed(data):
            payload = self.link.receive(frame, self._now())
            if payload is not None:
                self.inbox.append(self.P.decode(payload))
        out = self.link.output(self._now())  # acks
        if out:
            self.ser.write(out)

    def connect(self, timeout_s: float = 2.0) -> Any:
        self.link.start(self.P.Identify().encode())
        return self.wait_for(self.P.Identity, timeout_s)

    def send(self, msg: Any) -> None:
        self.link.send(msg.encode())
        self.pump()

    def wait_for(self, cls: type, timeout_s: float = 2.0) -> Any:
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for i, m in enumerate(self.inbox):
                if isinstance(m, cls):
                    return self.inbox.pop(i)
            self.pump(0.002)
        raise TimeoutError(f"no {cls.__name__} from the controller within {timeout_s} s")

    def request(self, msg: Any, reply: type, timeout_s: float = 2.0) -> Any:
        self.send(msg)
        return self.wait_for(reply, timeout_s)

    def write_raw(self, data: bytes) -> None:
        self.ser.write(data)

    def close(self) -> None:
        self.ser.close()
