"""`Model.close` (issue 12 (g)): a replaced model is closed once no pair uses it, never while one
does, never the live one; a closed onnxruntime model says so instead of running."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from sorterd.data.bundle import ModelError
from sorterd.parts.inference import Model
from sorterd.parts.inference.live import LiveModel
from sorterd.parts.inference.onnxruntime import OnnxModel
from tests.release_fakes import DEFAULT, faithful_kit


class Counted:
    """A model that only counts its closes (what LiveModel needs of it)."""

    def __init__(self, name: str) -> None:
        self.name, self.closed = name, 0

    def close(self) -> None:
        self.closed += 1


def _close(m: Model) -> None:
    m.close()


def test_retire_waits_for_the_last_pair_on_the_old_model() -> None:
    a, b = Counted("a"), Counted("b")
    live = LiveModel(a)  # type: ignore[arg-type]
    entered, leave = threading.Event(), threading.Event()

    def pair() -> None:
        with live.using() as m:
            assert m is a
            entered.set()
            leave.wait(10)

    t = threading.Thread(target=pair)
    t.start()
    assert entered.wait(10)
    assert live.swap(b) is a  # type: ignore[arg-type]
    assert live.in_use(a) == 1  # type: ignore[arg-type]
    assert live.retire(a, _close) is False  # type: ignore[arg-type]
    assert a.closed == 0  # the pair on it is still being classified
    leave.set()
    t.join(10)
    assert a.closed == 1 and live.in_use(a) == 0  # type: ignore[arg-type]
    with live.using() as m:
        assert m is b
    assert b.closed == 0


def test_retire_an_unused_model_closes_at_once_and_never_the_live_one() -> None:
    a, b = Counted("a"), Counted("b")
    live = LiveModel(a)  # type: ignore[arg-type]
    assert live.retire(a, _close) is False and a.closed == 0  # type: ignore[arg-type]
    live.swap(b)  # type: ignore[arg-type]
    assert live.retire(a, _close) is True and a.closed == 1  # type: ignore[arg-type]


def test_a_closed_onnx_model_refuses_to_run() -> None:
    model = OnnxModel(DEFAULT)
    kit = faithful_kit()
    preds, _ = model.predict(kit.crops[:2])
    assert len(preds) == 2
    model.close()
    model.close()  # idempotent
    with pytest.raises(ModelError, match="closed"):
        model.predict(np.ascontiguousarray(kit.crops[:1]))
