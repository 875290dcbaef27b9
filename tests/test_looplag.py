"""The event loop's lateness probe (sorterd/sorting/looplag.py): a callback that holds the loop
shows as lag on the probe's next wake-up, in the summary and in the Prometheus histogram."""

from __future__ import annotations

import asyncio
import time

import pytest

from sorterd.metrics import Metrics
from sorterd.sorting.looplag import LoopLag, format_line


def test_a_callback_that_blocks_the_loop_shows_as_lag() -> None:
    metrics = Metrics()
    probe = LoopLag(metrics.loop_lag, period_s=0.01)

    async def go() -> None:
        task = asyncio.create_task(probe.run())
        await asyncio.sleep(0.1)  # a few quiet wake-ups first
        asyncio.get_running_loop().call_soon(time.sleep, 0.25)  # a blocking call on the loop
        await asyncio.sleep(0.4)
        task.cancel()

    asyncio.run(go())
    s = probe.summary()
    assert s["samples"] >= 5 and s["max_ms"] >= 200  # the blocked 250 ms, less the period at most
    assert s["p50_ms"] < s["max_ms"]
    count = metrics.registry.get_sample_value("sorterd_event_loop_lag_seconds_count")
    over = metrics.registry.get_sample_value("sorterd_event_loop_lag_seconds_bucket", {"le": "0.1"})
    assert count == s["samples"] and over is not None and over < count  # one wake-up past 0.1 s at least
    assert "event loop lag ms p50/p99/max" in format_line(s)


def test_before_any_wake_up_nothing_is_claimed() -> None:
    s = LoopLag().summary()
    assert s["samples"] == 0 and s["p99_ms"] is None and s["max_ms"] is None
    assert "not measured" in format_line(s)
    with pytest.raises(ValueError, match="must be > 0"):
        LoopLag(period_s=0.0)
