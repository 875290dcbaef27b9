"""Stones for review (§5.1): which decided stones go to the trainer, and what is sent of each.

Sent: every stone the model classified and §5.2 flagged (reason "flagged"), and, when
`link.drift_every` = N > 0, every Nth stone it classified confidently (reason "drift",
counted in decision order), for the trainer's drift checks.  Not sent: objects that were
never classified (clusters, debris, oversize, a pair with a lighting fault: they have no
probabilities to review), and a stone flagged only afterwards because its valve outcome is
unknown (a question of where it landed, not of the model).

A stone is held from its decision until its fate is sealed (`finished`: its row goes to
the recorder), so its record says where the machine really sent it (a deadline miss sends
it to REJECT after the decision).  The images are the arrays the pipeline already has
(the model's crops and the pair's frames); the queue encodes them in its own thread.
The pipeline depends on the `ReviewQueue` Protocol only (the link's outbox implements it).
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from sorterd.domain import uncertainty_score
from sorterd.link.records import SessionRecord, StoneRecord
from sorterd.parts.camera import FramePair
from sorterd.parts.inference import Prediction
from sorterd.sorting.decide import Decision


class ReviewQueue(Protocol):
    """Where records for the trainer go; called on the event loop, so it never waits."""

    def submit_stone(self, record: StoneRecord, arrays: Mapping[str, np.ndarray]) -> Future[bool] | None:
        """Queue a stone (images as arrays, STONE_IMAGES names); None: refused (full, counted by the queue)."""
        ...

    def submit_session(self, record: SessionRecord, arrays: Mapping[str, np.ndarray]) -> Future[bool] | None:
        """Queue a session record (SESSION_IMAGES names), before any stone of its session."""
        ...


@dataclass(frozen=True)
class ReviewSource:
    """Who and what the records are about: the same for every stone of a run."""

    sorter_id: str
    batch: str
    session_id: str
    lot_id: str
    model_version: str
    pixels_per_mm: float
    crop_mm: float
    drift_every: int  # 0 = no drift stones


@dataclass
class _Held:
    record: StoneRecord  # route filled in when the stone is finished
    arrays: dict[str, np.ndarray]


class Reviewer:
    """Chooses the stones to send and hands them to the queue.  Event loop only."""

    def __init__(self, queue: ReviewQueue, source: ReviewSource) -> None:
        self.queue = queue
        self.source = source
        self.held: dict[str, _Held] = {}  # stone id -> its record, until its row is final
        self.confident = 0  # classified stones not flagged, so far (for drift_every)
        self.chosen = {"flagged": 0, "drift": 0}  # handed to the queue (or refused by it)

    def decided(self, sid: str, pred: Prediction | None, dec: Decision, size_mm: float, pair: FramePair,
                crop: tuple[np.ndarray, np.ndarray], wall_time: str, model_version: str | None = None) -> None:
        """A stone's decision: hold it if it is to be sent.  `model_version`: the release that
        classified its pair (a release swapped in mid-run); None = the source's."""
        if pred is None:
            return  # never classified: nothing to review
        if dec.flagged:
            reason = "flagged"
        else:
            self.confident += 1
            every = self.source.drift_every
            if not every or self.confident % every:
                return
            reason = "drift"
        s = self.source
        pc = (float(pred.p_color[0]), float(pred.p_color[1]), float(pred.p_color[2]))
        pk = (float(pred.p_clarity[0]), float(pred.p_clarity[1]), float(pred.p_clarity[2]))
        record = StoneRecord(
            sorter_id=s.sorter_id, batch=s.batch, stone_id=sid, session_id=s.session_id, lot_id=s.lot_id,
            wall_time=wall_time, model_version=model_version or s.model_version, p_color=pc, p_clarity=pk, decision=dec.bin,
            route=dec.bin, confidence=float(dec.confidence), size_mm=float(size_mm),
            uncertainty=uncertainty_score(pc, pk), reason="flagged" if reason == "flagged" else "drift",
            pixels_per_mm=s.pixels_per_mm, crop_mm=s.crop_mm)
        arrays = {"backlit_crop": crop[0], "toplit_crop": crop[1],
                  "backlit_full": pair.backlit.image, "toplit_full": pair.toplit.image}
        self.held[sid] = _Held(record, arrays)

    def finished(self, sid: str, route: str) -> None:
        """The stone's row is final: send it with the route it really took."""
        held = self.held.pop(sid, None)
        if held is None:
            return
        record = held.record if held.record.route == route else replace(held.record, route=route)
        self.chosen[record.reason] += 1
        self.queue.submit_stone(record, held.arrays)

