"""The release messages of wire protocol v1 (sorterd/link/wire.py, PROTOCOL.md): round trips in the
right direction only, strict parsing and the chunk size limit."""

from __future__ import annotations

import hashlib
import json

import pytest

from sorterd.link import wire

SHA = hashlib.sha256(b"x").hexdigest()
OFFER = wire.ReleaseOffer(8, SHA, 30, (wire.ReleaseFile("manifest.json", 10, SHA), wire.ReleaseFile("model.onnx", 20, SHA)))


def test_round_trips_each_in_its_direction() -> None:
    for msg in (OFFER, wire.ReleaseChunk(8, 262144, b"\x00" * wire.MAX_CHUNK_BYTES)):
        assert wire.decode_from_trainer(wire.encode(msg)) == msg
        with pytest.raises(wire.WireError, match="expected here"):
            wire.decode_from_sorter(wire.encode(msg))
    for smsg in (wire.ReleaseGet(8, 0, 4096), wire.ReleaseResult(8, "accepted", "", "release 8 staged"),
                 wire.ReleaseResult(8, "refused", "file-hash", "model.onnx: sha256 differs"),
                 wire.ReleaseResult(7, "rolled-back", "health", "flagged rate 40% vs 5%")):
        assert wire.decode_from_sorter(wire.encode(smsg)) == smsg
        with pytest.raises(wire.WireError, match="expected here"):
            wire.decode_from_trainer(wire.encode(smsg))


def _offer_with(**change: object) -> list[bytes]:
    frames = wire.encode(OFFER)
    head = json.loads(frames[2])
    head.update(change)
    return [frames[0], frames[1], json.dumps(head).encode()]


@pytest.mark.parametrize(("change", "says"), [
    ({"release": 0}, "release = 0: a whole number >= 1"),
    ({"manifest_sha256": "ABC"}, "64 lowercase hex"),
    ({"total_bytes": 31}, "the sum of the files' sizes (30)"),
    ({"files": [{"name": "../model.onnx", "size": 30, "sha256": SHA}]}, "a plain file name"),
    ({"files": [{"name": "model.onnx", "size": 30, "sha256": SHA}]}, "includes manifest.json"),
    ({"files": [{"name": "manifest.json", "size": 15, "sha256": SHA}] * 2}, "each file name once"),
    ({"files": [{"name": "manifest.json", "size": 30, "sha256": SHA, "mode": 511}]}, "entries {name"),
    ({"files": []}, "a list of 1 to 64"),
    ({"extra": 1}, "unknown fields 'extra'"),
])
def test_a_bad_offer_is_refused_in_one_line(change: dict[str, object], says: str) -> None:
    with pytest.raises(wire.WireError, match="RELEASE_OFFER") as e:
        wire.decode_from_trainer(_offer_with(**change))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_chunk_and_get_limits() -> None:
    big = wire.encode(wire.ReleaseChunk(8, 0, b"x"))[:3] + [b"x" * (wire.MAX_CHUNK_BYTES + 1)]
    with pytest.raises(wire.WireError, match="at most|1 to 262144"):
        wire.decode_from_trainer(big)
    with pytest.raises(wire.WireError, match="exactly 1"):
        wire.decode_from_trainer(wire.encode(wire.ReleaseChunk(8, 0, b"x"))[:3])
    with pytest.raises(wire.WireError, match="extra frames"):
        wire.decode_from_sorter(wire.encode(wire.ReleaseGet(8, 0, 1)) + [b"x"])
    get = wire.encode(wire.ReleaseGet(8, 0, 1))
    for field, value in (("length", wire.MAX_CHUNK_BYTES + 1), ("length", 0), ("offset", -1)):
        head = json.loads(get[2])
        head[field] = value
        with pytest.raises(wire.WireError, match=field):
            wire.decode_from_sorter([get[0], get[1], json.dumps(head).encode()])


def test_a_result_names_its_check_exactly_when_refused() -> None:
    for bad in (wire.ReleaseResult(8, "accepted", "golden", ""), wire.ReleaseResult(8, "refused", "", "why")):
        with pytest.raises(wire.WireError, match="empty exactly when status is accepted"):
            wire.encode(bad)
