"""Row building: a decided object's stone-log row, field by field (sorting/record.stone_row)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from sorterd.controller.outputs import Pulse
from sorterd.parts.camera import Frame, FramePair
from sorterd.parts.inference import Prediction
from sorterd.sorting.decide import Decision
from sorterd.sorting.record import COLUMNS, stone_row
from sorterd.sorting.segment import Blob, Observation, Shape

IMG = np.zeros((4, 4, 3), np.uint8)
PAIR = FramePair(seq=17, trigger_ns=1_000, backlit=Frame(IMG, 1_500, "backlit"), toplit=Frame(IMG, 11_500, "toplit"))
EDGES: dict[str, int | None] = {"backlit_on_ns": 1_490, "backlit_off_ns": 11_400, "toplit_on_ns": 11_495,
                                "toplit_off_ns": None}


def observation(cluster: bool = False) -> Observation:
    blob = Blob(cx=10.0, cy=5.0, area=40.0, bbox=(7, 2, 6, 6), touches_border=False, contour=np.zeros((0, 1, 2)))
    shape = Shape(size_px=48.0, length_px=60.0, solidity=0.95, notch=0.02)
    return Observation(blob, blob, (shape, shape), x_mm=21.25, y_mm=4.5, t_ns=11_500, speed_mm_s=512.5,
                       size_mm=2.4, length_mm=3.0, cluster=cluster)


def test_a_classified_stone_with_a_pulse() -> None:
    pred = Prediction(np.array([0.9, 0.07, 0.03], np.float32), np.array([0.8, 0.15, 0.05], np.float32))
    dec = Decision("CUT", "blue", "transparent", 0.8, False, "sorted")
    row = stone_row("S000042", PAIR, observation(), pred, dec, Pulse("CUT", 90_000, 97_000, "S000042"), EDGES,
                    t_decided_ns=20_000, model_version="v009", wall_time="2026-12-02T10:00:00.000+00:00")
    got = asdict(row)
    assert list(got) == COLUMNS  # every column of the stones table, in its order
    probs = {k: got.pop(k) for k in ("p_blue", "p_light", "p_inky", "p_transparent", "p_translucent", "p_opaque")}
    assert probs == {"p_blue": float(np.float32(0.9)), "p_light": float(np.float32(0.07)),
                     "p_inky": float(np.float32(0.03)), "p_transparent": float(np.float32(0.8)),
                     "p_translucent": float(np.float32(0.15)), "p_opaque": float(np.float32(0.05))}
    assert all(type(v) is float for v in probs.values())  # plain floats for SQLite, not numpy scalars
    assert got == {
        "stone_id": "S000042", "capture_seq": 17, "t_trigger_ns": 1_000, "t_backlit_ns": 1_500,
        "t_toplit_ns": 11_500, "t_decided_ns": 20_000, "x_mm": 21.25, "y_mm": 4.5, "speed_mm_s": 512.5,
        "size_mm": 2.4, "length_mm": 3.0, "cluster": 0, "color": "blue", "clarity": "transparent",
        "confidence": 0.8, "bin": "CUT", "route": "CUT", "reason": "sorted", "flagged": 0, "deadline_miss": 0,
        "planned_on_ns": 90_000, "planned_off_ns": 97_000, "actual_on_ns": None, "actual_off_ns": None,
        "valve_status": "scheduled", "model_version": "v009", "wall_time": "2026-12-02T10:00:00.000+00:00",
        "backlit_on_ns": 1_490, "backlit_off_ns": 11_400, "toplit_on_ns": 11_495, "toplit_off_ns": None,
    }


def test_an_unclassified_cluster_has_no_probabilities_and_no_pulse() -> None:
    dec = Decision("REJECT", None, None, 0.0, True, "cluster: two lobes")
    no_edges: dict[str, int | None] = dict.fromkeys(EDGES)
    row = stone_row("S000043", PAIR, observation(cluster=True), None, dec, None, no_edges,
                    t_decided_ns=21_000, model_version="v009", wall_time="w")
    assert (row.p_blue, row.p_light, row.p_inky) == (None, None, None)
    assert (row.p_transparent, row.p_translucent, row.p_opaque) == (None, None, None)
    assert (row.color, row.clarity, row.confidence) == (None, None, 0.0)
    assert (row.cluster, row.flagged, row.bin, row.route, row.reason) == (1, 1, "REJECT", "REJECT", "cluster: two lobes")
    assert (row.planned_on_ns, row.planned_off_ns, row.valve_status) == (None, None, "no pulse")
    assert (row.backlit_on_ns, row.backlit_off_ns, row.toplit_on_ns, row.toplit_off_ns) == (None, None, None, None)


def test_the_same_inputs_give_the_same_row() -> None:
    """The caller passes the instants: a row is a function of its inputs (replay, determinism)."""
    dec = Decision("FLIP", "light", "opaque", 0.91, False, "sorted")
    pred = Prediction(np.array([0.05, 0.91, 0.04]), np.array([0.01, 0.04, 0.95]))

    def make() -> object:
        return stone_row("S1", PAIR, observation(), pred, dec, Pulse("FLIP", 5, 9, "S1"), EDGES,
                         t_decided_ns=3, model_version="m", wall_time="w")

    assert make() == make()  # it reads no clock of its own
