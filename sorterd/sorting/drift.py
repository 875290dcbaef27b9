"""Batch drift: is this machine or lot outside what the model knows?

Each stone's out-of-distribution score (the bundle's gate, `sorterd.train.ood`;
the manifest's ``ood`` section, `sorterd.data.bundle.OodSpec`) is over or under
the stone limit.  On the machine and lots the model was trained on about 1 % of
stones are over (the limit is the validation stones' 99.5 % quantile on each of
two signals); a batch whose share over the limit, among its last `window` stones
and at least ``batch_min_stones`` of them, exceeds ``batch_share_limit`` has
drifted: a new lot unlike the training ones, or a machine whose light, scale or
focus moved.  Its stones already go to SELECT one by one (`decide`); the alarm
says why so many do, and what to do about it (§5.4: label a few hundred stones
of the lot and fine-tune).

Pure bookkeeping (no I/O): the pipeline logs the message, counts the metric and
puts `summary()` in the run summary; calibration's reference-kit step uses
`alarm_text`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from sorterd.data.bundle import OodSpec

WINDOW = 200  # stones: the "batch" the share is judged over (~10 s of sorting at 20 stones/s)
LABEL_HINT = 300  # §5.4: "200+ from new lot, retrain"; a few hundred labelled stones


def alarm_text(share: float, n: int, spec: OodSpec, label: int = LABEL_HINT) -> str:
    """The one line an operator reads when a batch has drifted."""
    return (f"the model does not know this machine/lot: collect and label {label} stones "
            f"({share:.0%} of the last {n} stones are out of its training distribution, "
            f"limit {spec.batch_share_limit:.0%}); then `sorterd train --from` (§5.4)")


@dataclass
class DriftState:
    scored: int = 0  # stones with a score
    over: int = 0  # ... over the stone limit
    alarms: int = 0  # times the batch went over the share limit
    worst_share: float = 0.0  # highest windowed share seen (once the window is judged)


class DriftWatch:
    """Windowed share of out-of-distribution stones against the bundle's limits."""

    def __init__(self, spec: OodSpec | None, window: int = WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window = {window}: must be >= 1 stones")
        self.spec = spec
        self.window = window
        self.state = DriftState()
        self._recent: deque[bool] = deque(maxlen=window)
        self._over_recent = 0  # how many of _recent are True: the share in O(1) per stone
        self._alarmed = False

    @property
    def gate(self) -> bool:
        """The bundle has an OOD gate (an older one has none: nothing is watched)."""
        return self.spec is not None

    @property
    def alarmed(self) -> bool:
        """The batch is over the share limit now."""
        return self._alarmed

    def share(self) -> float:
        return self._over_recent / len(self._recent) if self._recent else 0.0

    def stone(self, score: float | None) -> str | None:
        """Count one stone's score; the alarm line when the batch has just drifted, else None.

        An alarm is raised once per episode and re-armed when the share falls back under
        half the limit (no line per stone while a bad lot runs)."""
        if self.spec is None or score is None:
            return None
        over = not score <= self.spec.stone_limit  # NaN counts as out, as decide() does
        self.state.scored += 1
        self.state.over += over
        if len(self._recent) == self.window:
            self._over_recent -= self._recent[0]  # the one append() pushes out
        self._recent.append(over)
        self._over_recent += over
        n = len(self._recent)
        if n < min(self.spec.batch_min_stones, self.window):
            return None
        share = self.share()
        self.state.worst_share = max(self.state.worst_share, share)
        if not self._alarmed and share > self.spec.batch_share_limit:
            self._alarmed = True
            self.state.alarms += 1
            return alarm_text(share, n, self.spec)
        if self._alarmed and share <= self.spec.batch_share_limit / 2:
            self._alarmed = False
        return None

    def summary(self) -> dict[str, Any]:
        """The run summary's ``ood`` section."""
        if self.spec is None:
            return {"gate": False, "note": "the model bundle has no out-of-distribution gate (older than v003)"}
        s = self.state
        out: dict[str, Any] = {
            "gate": True, "stones_scored": s.scored, "over_limit": s.over,
            "over_limit_rate": round(s.over / s.scored, 4) if s.scored else 0.0,
            "worst_window_share": round(s.worst_share, 4), "alarms": s.alarms,
            "batch_share_limit": self.spec.batch_share_limit, "window": self.window,
        }
        if s.alarms:
            out["alarm"] = alarm_text(s.worst_share, min(self.window, s.scored), self.spec)
        return out
