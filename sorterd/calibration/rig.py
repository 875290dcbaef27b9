"""The calibration rig of a real machine: the §2.4 checklist's hardware actions
on the machine's own camera, strobes, trigger and valves.

`Checklist` (sorterd/calibration/checklist.py) is synchronous; the parts are not: they live
on an asyncio loop (the mcu valves attach to one, lights return awaitables,
triggers and cameras are awaited).  `MachineRig` therefore runs its own event
loop in a background thread, opens the parts there (the composition root's `open_parts`,
on the wall clock), and each rig action submits one coroutine to it and waits
for the result.  `close()` closes the parts (valves first) and stops the loop.

What a person does, the rig asks for through two callables: `say(text)` (an
instruction: "feed stone 3/10") and `answer(question) -> bool` (a y/n question:
"did the stone land in the CUT bin?").  Without `answer` the valve test cannot
be done; `Checklist` does not ask for it then (`needs_operator`).

Actions:
  warm_up          both strobes at the sorting duty cycle (a pair every 100 ms)
  reference_frames the empty channel, mean of 8 strobed pairs per mode (cached)
  gray_card        mean of 4 toplit frames of the card
  target           one backlit frame of the target + the backlit reference +
                   calibration.target_diameter_mm
  reference_stones the kit's labels (calibration.kit, JSON lines, feeding order);
                   one trigger + pair per stone
  valve_hit        one test stone: trigger, pair, segmentation (exactly one
                   stone), pulse planned for the bin with the probe's offset,
                   fired, and the operator says where the stone landed
  baseline         <calibration.dir>/<machine>/baseline.json, None before one
                   is stored (`sorterd calibrate --set-baseline`)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from sorterd.calibration.checklist import Baseline, load_baseline
from sorterd.clock import Clock, WallClock
from sorterd.config import Config
from sorterd.controller.outputs import Pulse
from sorterd.domain import CLARITIES, COLORS
from sorterd.parts import Parts
from sorterd.parts.camera import FramePair
from sorterd.parts.lights import StrobeError
from sorterd.sorting.capture import capture_pair, lighting_fault, strobe_pair
from sorterd.sorting.eject import plan_pulse
from sorterd.sorting.segment import PairingLimits, segment_pair
from sorterd.sorting.track import Track

log = logging.getLogger(__name__)

T = TypeVar("T")

REFERENCE_PAIRS = 8  # empty-channel pairs averaged per reference frame
GRAY_CARD_FRAMES = 4
WARMUP_PAIR_S = 0.1  # the sorting duty cycle: a pair every ~100 ms
STONE_TIMEOUT_S = 60.0  # wait this long for a fed stone before asking
VALVE_TRIES = 3  # drops per probe before it counts as a miss (wrong object count)
OPEN_GRACE_S = 30.0  # opening the parts may take the controller's connect timeout plus this


class RigError(RuntimeError):
    """A calibration action could not be done on the machine (the session stops)."""


class KitError(ValueError):
    """The reference kit's label file is missing or malformed."""


@dataclass(frozen=True)
class Probe:
    """One valve test drop, for the log and the tests."""

    bin: str
    offset_ms: float
    track: Track | None
    pulse: Pulse | None
    result: str  # "hit", "miss", or why the drop did not count


def configured_kit(cfg: Config) -> Path | None:
    """calibration.kit as a path (None: not set)."""
    return Path(cfg.calibration.kit).expanduser() if cfg.calibration.kit else None


def kit_labels(path: Path | None) -> list[tuple[str, str]]:
    """The kit file's labels; KitError when there is none or it is bad."""
    if path is None:
        raise KitError("calibration.kit is not set: the reference stone kit's labels, one JSON object per "
                       'line in feeding order, e.g. {"color": "blue", "clarity": "transparent"}')
    return load_kit(path)


def load_kit(path: Path) -> list[tuple[str, str]]:
    """(color, clarity) per stone, in feeding order, from a JSON-lines file.

    One object per line with at least "color" and "clarity" (other keys, e.g.
    "stone_id" or "notes", are allowed); blank lines and lines starting with
    '#' are skipped.  KitError names file:line of the first bad line.
    """
    allowed = f"allowed colors: {', '.join(COLORS)}; clarities: {', '.join(CLARITIES)}"
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise KitError(f"calibration.kit = {str(path)!r}: cannot read it ({exc.strerror or exc})") from exc
    kit = []
    for no, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KitError(f"{path}:{no}: not JSON ({exc.msg}); each line is one stone, e.g. "
                           '{"color": "blue", "clarity": "transparent"}') from exc
        if not isinstance(rec, dict):
            raise KitError(f"{path}:{no}: expected an object with color and clarity, got {text!r}")
        color, clarity = rec.get("color"), rec.get("clarity")
        if color not in COLORS or clarity not in CLARITIES:
            raise KitError(f"{path}:{no}: color = {color!r}, clarity = {clarity!r}: {allowed}")
        kit.append((color, clarity))
    if not kit:
        raise KitError(f"{path}: no stones in the kit file (one JSON object per line, in feeding order)")
    return kit


def terminal_answer(question: str) -> bool:
    """A y/n question on the terminal."""
    while True:
        reply = input(f"  > {question} ").strip().lower()
        if reply in ("y", "yes"):
            return True
        if reply in ("n", "no"):
            return False
        print("  please answer y or n", flush=True)


def _print_say(text: str) -> None:
    print(f"  > {text}", file=sys.stdout, flush=True)


def mean_u8(frames: list[np.ndarray]) -> np.ndarray:
    """The per-pixel mean of frames, rounded back to uint8."""
    acc = np.zeros(frames[0].shape, np.float64)
    for f in frames:
        acc += f
    return np.clip(np.round(acc / len(frames)), 0, 255).astype(np.uint8)


class MachineRig:
    """The `Rig` of a real machine (see the module docstring).  Use as a context manager."""

    needs_operator = True  # gray card, target, kit and test stones are placed by a person
    instant_warmup = False

    def __init__(self, cfg: Config, *, answer: Callable[[str], bool] | None = None,
                 say: Callable[[str], None] | None = None, clock: Clock | None = None,
                 parts: Parts | Callable[[Config, Clock], Parts], kit: Path | None = None,
                 stone_timeout_s: float = STONE_TIMEOUT_S) -> None:
        """parts: already-made parts, or how to open them (called with the config and the
        rig's clock on the rig's loop: the composition root's `open_parts`); the rig closes them."""
        self.cfg = cfg
        self.clock = clock or WallClock()
        self.answer = answer
        self.say = say or _print_say
        self.stone_timeout_s = stone_timeout_s
        self._kit_path = kit if kit is not None else configured_kit(cfg)
        self._refs: dict[str, np.ndarray] | None = None
        self._seq = 0
        self.probes: list[Probe] = []
        self._closed = False
        self._loop = self.clock.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="sorterd-calibrate-rig", daemon=True)
        self._thread.start()
        try:
            timeout = cfg.valves.connect_timeout_s + OPEN_GRACE_S
            self.parts: Parts = self._call(self._open(parts), timeout, "opening the machine's parts")
        except BaseException:
            self._stop_loop()
            raise

    # -- the loop thread ----------------------------------------------------------

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
                self._loop.run_until_complete(self._loop.shutdown_default_executor())
            finally:
                self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None, what: str) -> T:
        """Run coro on the rig's loop and wait for it (this thread blocks, the loop does not)."""
        if self._closed:
            coro.close()
            raise RigError(f"{what}: the rig is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except BaseException as exc:
            if fut.done():
                raise  # the action's own error
            fut.cancel()  # we stopped waiting (timeout, Ctrl-C): stop the action on the loop too
            if isinstance(exc, concurrent.futures.TimeoutError):
                raise RigError(f"{what}: no result within {timeout:.0f} s") from None
            raise

    async def _open(self, parts: Parts | Callable[[Config, Clock], Parts]) -> Parts:
        return parts if isinstance(parts, Parts) else parts(self.cfg, self.clock)

    def _stop_loop(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._loop.stop)
        except RuntimeError:
            pass  # the loop is closed already
        self._thread.join(timeout=10.0)

    def close(self) -> None:
        """Close the parts (valves first: the jets must end up off) and stop the loop."""
        if self._closed:
            return

        async def close_parts() -> None:
            self.parts.close()

        try:
            self._call(close_parts(), 15.0, "closing the machine's parts")
        except Exception:  # noqa: BLE001 -- the loop must stop whatever happened
            log.exception("closing the machine's parts failed")
        finally:
            self._closed = True
            self._stop_loop()

    def __enter__(self) -> MachineRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pairs and stones (on the loop) ---------------------------------------------

    @property
    def limits(self) -> PairingLimits:
        """Frame pairing as the pipeline and the Checklist build it."""
        cfg = self.cfg
        ppm = float(self.parts.camera.pixels_per_mm)
        return PairingLimits.from_config(cfg, ppm, cfg.lights.pair_interval_ms)

    async def _pair(self, trigger_ns: int | None = None) -> tuple[FramePair, str | None]:
        """One strobed pair and what was wrong with its lighting (None: both lit as asked)."""
        lights = self.cfg.lights
        seq, self._seq = self._seq, self._seq + 1
        try:
            pair = await capture_pair(self.parts.camera, self.parts.lights, self.clock, seq,
                                      self.clock.now_ns() if trigger_ns is None else trigger_ns,
                                      int(lights.pair_interval_ms * 1e6), int(lights.lights_off_ms * 1e6))
        except StrobeError as exc:
            raise RigError(f"the strobes refused a pair: {exc}") from exc
        fault, _ = await lighting_fault(pair, self.clock, self.parts.camera, self.parts.lights)
        return pair, fault

    async def _lit_pairs(self, n: int, what: str) -> list[FramePair]:
        pairs = []
        for _ in range(n):
            pair, fault = await self._pair()
            if fault:
                raise RigError(f"{what}: lighting fault ({fault}): check the strobe wiring and drivers")
            pairs.append(pair)
        return pairs

    async def _stone(self, armed_ns: int) -> tuple[FramePair | None, str]:
        """The next stone's pair: a trigger after armed_ns (older, queued edges are stale:
        the gray card or the target broke the beam), then one pair.  (None, why) when no
        trigger came within stone_timeout_s ("timeout") or the pair was not lit right."""

        async def fresh() -> int:
            while True:
                ev = await self.parts.trigger.next()
                if ev is None:
                    raise RigError("the trigger stopped (closed or out of events)")
                if ev.t_ns >= armed_ns:
                    return ev.t_ns

        try:
            t_ns = await asyncio.wait_for(fresh(), self.stone_timeout_s)
        except asyncio.TimeoutError:
            return None, "timeout"
        pair, fault = await self._pair(t_ns)
        if fault:
            return None, f"lighting fault ({fault})"
        return pair, ""

    async def _strobe_for(self, seconds: float) -> None:
        """Both strobes as when sorting (a pair every WARMUP_PAIR_S) for `seconds`."""
        lights = self.parts.lights
        iv, off = int(self.cfg.lights.pair_interval_ms * 1e6), int(self.cfg.lights.lights_off_ms * 1e6)
        end = self.clock.now_ns() + int(seconds * 1e9)
        lit = 0
        while (now := self.clock.now_ns()) < end:
            t0 = now + int(lights.lead_ns)
            try:
                reports = strobe_pair(lights, t0, iv, off)
            except StrobeError as exc:
                raise RigError(f"warm-up: the strobes refused: {exc}") from exc
            try:
                results = await asyncio.wait_for(asyncio.gather(*reports), timeout=1.0)
            except asyncio.TimeoutError:
                results = []
            ok = sum(bool(r.lit) for r in results)
            lit += ok
            if ok < 2:
                log.warning("warm-up strobe not confirmed: %s", [r.status for r in results] or "no report")
            await self.clock.sleep_until(t0 + int(WARMUP_PAIR_S * 1e9))
        if seconds > 0.5 and lit == 0:
            raise RigError("warm-up: no strobe was confirmed lit: check the lights and their controller")

    async def _valve_probe(self, bin_name: str, latency_ms: float, offset_ms: float, armed_ns: int,
                           refs: dict[str, np.ndarray]) -> tuple[str, Track | None, Pulse | None]:
        """("fired" | "timeout" | "retry: why" | "refused: why", track, pulse)."""
        pair, why = await self._stone(armed_ns)
        if pair is None:
            return ("timeout" if why == "timeout" else f"retry: {why}"), None, None
        seg = await asyncio.get_running_loop().run_in_executor(
            None, segment_pair, pair.backlit.image, pair.toplit.image, refs["backlit"], refs["toplit"],
            pair.toplit.t_ns, self.limits)
        obs = seg.observations
        if len(obs) != 1:
            return f"retry: saw {len(obs)} stones in view, not one", None, None
        o = obs[0]
        if o.cluster:
            return f"retry: {o.reason}", None, None
        track = Track(f"valve-test-{pair.seq}", o.t_ns, o.x_mm, o.speed_mm_s, o.length_mm)
        # The plan for a valve of latency_ms, fired offset_ms later (SimRig.valve_hit's convention:
        # the hit window's centre is then the latency error).  Equivalent to planning with a
        # latency of latency_ms - offset_ms, which the config would refuse when negative.
        ej = self.cfg.ejection
        ej = dataclasses.replace(ej, opening_latency_ms={**ej.opening_latency_ms, bin_name: latency_ms})
        plan = plan_pulse(track, bin_name, self.cfg.geometry, ej)
        shift = int(round(offset_ms * 1e6))
        pulse = Pulse(plan.valve, plan.start_ns + shift, plan.end_ns + shift, plan.stone_id)
        lead = pulse.start_ns - self.clock.now_ns()
        if lead < self.cfg.ejection.min_lead_ms * 1e6:
            return f"refused: late ({lead / 1e6:.2f} ms lead, needs {self.cfg.ejection.min_lead_ms} ms)", track, pulse
        refusal = self.parts.valves.schedule(pulse)
        if refusal:
            return (refusal if refusal.startswith("refused") else f"refused: {refusal}"), track, pulse
        wait_s = max(0.0, (pulse.end_ns - self.clock.now_ns()) / 1e9) + 2.0
        try:
            outcome = await asyncio.wait_for(self.parts.valves.outcome(pulse), wait_s)
        except asyncio.TimeoutError:
            return "refused: no report of the pulse from the valves", track, pulse
        if not outcome.fired:
            return f"refused: {outcome.status}", track, pulse
        return "fired", track, pulse

    # -- the Rig interface (caller's thread) ---------------------------------------------

    def warm_up(self, seconds: float, tick: Callable[[float], None]) -> None:
        t0 = time.monotonic()
        tick(0.0)
        while (left := seconds - (time.monotonic() - t0)) > 0:
            chunk = min(1.0, left)
            self._call(self._strobe_for(chunk), chunk + 10.0, "warm-up")
            tick(min(1.0, (time.monotonic() - t0) / seconds))
        tick(1.0)

    def reference_frames(self) -> dict[str, np.ndarray]:
        if self._refs is None:
            pairs = self._call(self._lit_pairs(REFERENCE_PAIRS, "reference frames"), 30.0, "reference frames")
            refs = {"backlit": mean_u8([p.backlit.image for p in pairs]),
                    "toplit": mean_u8([p.toplit.image for p in pairs])}
            self._refs = refs
            self._call(self._set_trigger_reference(refs), 10.0, "giving the vision trigger today's reference")
        return self._refs

    async def _set_trigger_reference(self, refs: dict[str, np.ndarray]) -> None:
        """The vision trigger compares with today's empty channel from now on (on the loop: it runs there)."""
        self.parts.trigger.set_reference(refs["backlit"])

    def gray_card(self) -> np.ndarray:
        pairs = self._call(self._lit_pairs(GRAY_CARD_FRAMES, "gray card"), 30.0, "gray card")
        return mean_u8([p.toplit.image for p in pairs])

    def target(self) -> tuple[np.ndarray, np.ndarray, float]:
        refs = self.reference_frames()
        [pair] = self._call(self._lit_pairs(1, "target"), 30.0, "target")
        return pair.backlit.image.copy(), refs["backlit"], float(self.cfg.calibration.target_diameter_mm)

    def kit(self) -> list[tuple[str, str]]:
        """The reference kit's labels (KitError when calibration.kit is unset or bad)."""
        return kit_labels(self._kit_path)

    def reference_stones(self) -> list[tuple[np.ndarray, np.ndarray, str, str]]:
        labels = self.kit()
        self.reference_frames()  # (the vision trigger watches for stones against them)
        out = []
        for i, (color, clarity) in enumerate(labels, 1):
            self.say(f"Feed reference stone {i}/{len(labels)} ({color} / {clarity}).")
            pair = self._wait_for_stone(f"reference stone {i}/{len(labels)}")
            out.append((pair.backlit.image.copy(), pair.toplit.image.copy(), color, clarity))
        return out

    def _wait_for_stone(self, what: str) -> FramePair:
        while True:
            pair, why = self._call(self._stone(self.clock.now_ns()), None, what)
            if pair is not None:
                return pair
            if why == "timeout":
                self._keep_waiting(what)
            else:
                self.say(f"{what}: {why}; pick it up and feed it again.")

    def _keep_waiting(self, what: str) -> None:
        question = f"No stone seen for {self.stone_timeout_s:.0f} s ({what}). Keep waiting? [y/n]"
        if self.answer is None or not self.answer(question):
            raise RigError(f"no stone seen within {self.stone_timeout_s:.0f} s ({what}): is the feeder on, "
                           f"and does the trigger ({self.cfg.trigger.type}) see stones?")

    def valve_hit(self, bin_name: str, latency_ms: float, offset_ms: float) -> bool:
        """Drop one test stone, fire its pulse `offset_ms` later than planned; did it land in the bin?"""
        if self.answer is None:
            raise RigError("the valve test needs an operator to say where each test stone landed")
        refs = self.reference_frames()
        tries = 0
        self.say(f"Valve {bin_name}: drop one test stone (probe {offset_ms:+.2f} ms).")
        while tries < VALVE_TRIES:
            armed = self.clock.now_ns()
            result, track, pulse = self._call(self._valve_probe(bin_name, latency_ms, offset_ms, armed, refs),
                                              None, f"valve {bin_name} test")
            if result == "timeout":
                self._keep_waiting(f"valve {bin_name} test stone")
                continue
            if result.startswith("retry: "):
                tries += 1
                why = result[len("retry: "):]
                self.probes.append(Probe(bin_name, offset_ms, None, None, why))
                log.warning("valve %s probe %+.2f ms: %s", bin_name, offset_ms, why)
                if tries < VALVE_TRIES:
                    self.say(f"{why}: pick the stone(s) up and drop one test stone again.")
                continue
            if result != "fired":
                log.warning("valve %s probe %+.2f ms: pulse %s -- counted as a miss", bin_name, offset_ms, result)
                self.say(f"the pulse was not fired ({result}): counted as a miss.")
                self.probes.append(Probe(bin_name, offset_ms, track, pulse, result))
                return False
            hit = bool(self.answer(f"Did the stone land in the {bin_name} bin? [y/n]"))
            self.probes.append(Probe(bin_name, offset_ms, track, pulse, "hit" if hit else "miss"))
            return hit
        log.warning("valve %s probe %+.2f ms: no usable drop in %d tries -- counted as a miss",
                    bin_name, offset_ms, VALVE_TRIES)
        return False

    def baseline(self) -> Baseline | None:
        return load_baseline(Path(self.cfg.calibration.dir), self.cfg.machine.name)

