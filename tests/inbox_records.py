"""Link records as a sorter sends them, for the trainer inbox's tests: real PNGs of the typical
sizes (two 128x128 crops, two 640x240 frames), distinct per stone."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from sorterd.domain import uncertainty_score
from sorterd.link.records import SessionRecord, StoneRecord

CROP, FRAME = (128, 128), (240, 640)  # (h, w)


def png(shape: tuple[int, int], seed: int, shade: int) -> bytes:
    """A smooth panel with one stone-like blob and a little noise: compresses like a real frame."""
    h, w = shape
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), (200, 205, 210), dtype=np.uint8)
    image += rng.integers(0, 6, size=(h, w, 3), dtype=np.uint8)
    centre = (int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4)))
    cv2.circle(image, centre, max(4, min(h, w) // 6), (shade, shade // 2 + 40, 60), -1)
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def stone(n: int, sorter: str = "press1", batch: str = "2026-03-01_morning", stone_id: str | None = None,
          session: str = "2026-03-01_001", p_color: tuple[float, float, float] = (0.55, 0.35, 0.10),
          p_clarity: tuple[float, float, float] = (0.60, 0.30, 0.10), confidence: float = 0.55) -> StoneRecord:
    """Stone number n of a batch (its images depend on n and the sorter)."""
    seed = n * 7919 + sum(map(ord, sorter))
    images = {"backlit_crop": png(CROP, seed, 90), "toplit_crop": png(CROP, seed + 1, 140),
              "backlit_full": png(FRAME, seed + 2, 90), "toplit_full": png(FRAME, seed + 3, 140)}
    return StoneRecord(
        sorter_id=sorter, batch=batch, stone_id=stone_id or f"S{n:06d}", session_id=session, lot_id="LOT-2026-007",
        wall_time="2026-03-01T09:30:00+07:00", model_version="v003", p_color=p_color, p_clarity=p_clarity,
        decision="CUT", route="CUT", confidence=confidence, size_mm=2.4,
        uncertainty=uncertainty_score(p_color, p_clarity), reason="flagged", pixels_per_mm=20.0, crop_mm=6.4,
        images=images)


def session(sorter: str = "press1", session_id: str = "2026-03-01_001", batch: str = "2026-03-01_morning",
            **meta: object) -> SessionRecord:
    fields: dict[str, object] = {"session_id": session_id, "timestamp_start": "2026-03-01T09:00:00+07:00",
                                 "lot_id": "LOT-2026-007", "pixels_per_mm": 20.0, "reference_check_passed": True}
    fields.update(meta)
    images = {"reference_backlit": png(FRAME, 1, 200), "reference_toplit": png(FRAME, 2, 200)}
    return SessionRecord(sorter_id=sorter, batch=batch, session_id=session_id, meta=fields, images=images)


def with_image(rec: StoneRecord, name: str, data: bytes | None) -> StoneRecord:
    """rec with one image replaced (None: removed)."""
    images = dict(rec.images)
    if data is None:
        del images[name]
    else:
        images[name] = data
    return replace(rec, images=images)
