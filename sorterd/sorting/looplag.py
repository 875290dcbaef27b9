"""How late the event loop runs what is due: the daemon's own check of "the event loop never blocks".

`LoopLag.run` sleeps `period_s` on the loop, again and again, and each time measures how far past
its due time it woke: a callback that holds the loop (a blocking call, a long computation, a GIL
held by a thread) shows as lag on the next wake-up, whatever clock the loop runs on (a virtual
loop only skips time while nothing is due).  Each lag goes to the Prometheus histogram
`sorterd_event_loop_lag_seconds` and to a bounded `Samples` series for the run summary
(p50 / p99 / max; the worst wake-up is the one to read: a stone's pulse waits on the same loop).
A probe of this kind is what Node's `monitorEventLoopDelay` and asyncio's debug mode
(`slow_callback_duration`) report; this one is cheap enough to run always (one timer per period).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Protocol

from sorterd.quantiles import Samples

PERIOD_S = 0.05


class LagSink(Protocol):
    """Where each lag goes besides the summary (the metrics' histogram)."""

    def observe(self, amount: float) -> None: ...


class LoopLag:
    """The probe: `run()` on the loop to be watched, `summary()` afterwards (or any time)."""

    def __init__(self, sink: LagSink | None = None, period_s: float = PERIOD_S) -> None:
        if not period_s > 0:
            raise ValueError(f"LoopLag(period_s={period_s!r}): must be > 0")
        self.sink, self.period_s = sink, period_s
        self.lags_s = Samples(floor=1e-6)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.period_s
            await asyncio.sleep(self.period_s)
            self.record(max(0.0, loop.time() - due))

    def record(self, lag_s: float) -> None:
        self.lags_s.append(lag_s)
        if self.sink is not None:
            self.sink.observe(lag_s)

    def summary(self) -> dict[str, Any]:
        """{"samples", "p50_ms", "p99_ms", "max_ms", "period_ms"}; the figures None before any sample."""
        def ms(v: float) -> float | None:
            return None if math.isnan(v) else round(v * 1e3, 2)
        s = self.lags_s
        return {"samples": s.count, "p50_ms": ms(s.quantile(0.5)), "p99_ms": ms(s.quantile(0.99)),
                "max_ms": ms(s.max_abs) if s.count else None, "period_ms": round(self.period_s * 1e3, 1)}


def format_line(summary: dict[str, Any]) -> str:
    """The run summary's line for it."""
    if not summary.get("samples"):
        return "event loop lag: not measured (the run ended before the first probe)"
    return (f"event loop lag ms p50/p99/max: {summary['p50_ms']}/{summary['p99_ms']}/{summary['max_ms']} "
            f"({summary['samples']} wake-ups, every {summary['period_ms']} ms)")
