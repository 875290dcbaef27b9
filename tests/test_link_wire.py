"""Wire protocol v1 (sorterd/link/wire.py, PROTOCOL.md) and the key files (sorterd/link/keys.py)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import stat
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
import zmq.auth
from linkfakes import FakeInbox, KeySet, png, session, stone

from sorterd.cli import main
from sorterd.link import keys, wire

DOC = Path(__file__).resolve().parent.parent / "sorterd" / "link" / "PROTOCOL.md"


def _frames_with(header_changes: dict[str, Any], drop: tuple[str, ...] = (), rec: Any = None) -> list[bytes]:
    frames = wire.encode(rec or stone(1))
    head = json.loads(frames[2])
    head.update(header_changes)
    for k in drop:
        head.pop(k)
    return [frames[0], frames[1], json.dumps(head).encode(), *frames[3:]]


def test_every_message_round_trips() -> None:
    for msg in (stone(1), session(), wire.Hello("sorterd 0.1.0", 3, 4096), wire.Ping(0, 0)):
        assert wire.decode_from_sorter(wire.encode(msg)) == msg
    for reply in (wire.Welcome("sorter-a", wire.MAX_MESSAGE_BYTES), wire.Pong(), wire.Ack(stone(1).key, "stored"),
                  wire.Nack(None, "bad", retry=False), wire.Nack(session().key, "disk full", retry=True)):
        assert wire.decode_from_trainer(wire.encode(reply)) == reply


@pytest.mark.parametrize("changes, drop, why", [
    ({"schema": 2}, (), "schema 2: only 1"),
    ({"p_color": [0.5, 0.5, 0.5]}, (), "summing to 1"),
    ({"p_color": [0.5, 0.5]}, (), "p_color"),
    ({"confidence": 1.5}, (), r"confidence = 1.5: a finite number in \[0.0, 1.0\]"),
    ({"confidence": True}, (), "confidence = True"),
    ({"size_mm": 0}, (), "size_mm"),
    ({"decision": "GOLD"}, (), "decision = 'GOLD': one of CUT, SELECT, FLIP, REJECT"),
    ({"reason": "bored"}, (), "reason"),
    ({"stone_id": "../../etc/passwd"}, (), "stone_id = '../../etc/passwd': 1-64 characters"),
    ({"batch": ""}, (), "batch"),
    ({"wall_time": "2026-03-01T09:30:00"}, (), "UTC offset"),
    ({"extra": 1}, (), "unknown fields 'extra'"),
    ({}, ("crop_mm",), "field 'crop_mm' missing"),
])
def test_bad_fields_are_refused_with_the_reason(changes: dict[str, Any], drop: tuple[str, ...], why: str) -> None:
    with pytest.raises(wire.WireError, match=why) as err:
        wire.decode_from_sorter(_frames_with(changes, drop))
    assert "\n" not in str(err.value)


def test_nan_and_duplicate_keys_and_non_objects_are_refused() -> None:
    frames = wire.encode(stone(1))
    raw = frames[2].decode()
    for bad, why in ((raw.replace('"confidence":0.5', '"confidence":NaN'), "NaN is not JSON"),
                     (raw[:-1] + ',"batch":"x"}', "given twice"), ("[1]", "JSON list"), ("{", "not JSON"),
                     ("\xff", "not UTF-8")):
        payload = bad.encode("latin-1") if bad == "\xff" else bad.encode()
        with pytest.raises(wire.WireError, match=why):
            wire.decode_from_sorter([frames[0], frames[1], payload, *frames[3:]])


def test_blobs_must_match_the_header_and_be_whole_pngs() -> None:
    frames = wire.encode(stone(1))
    cases = [
        (frames[:-1], "3 image frames but the header lists 4"),
        ([*frames, png(5)], "5 image frames"),
        ([*frames[:3], frames[3][:-12], *frames[4:]], "header says"),  # truncated image
        ([*frames[:3], frames[4], frames[3], *frames[5:]], "header says|sha256"),  # swapped
    ]
    for bad, why in cases:
        with pytest.raises(wire.WireError, match=why):
            wire.decode_from_sorter(bad)
    # a truncated PNG whose header agrees (a sender that hashed the damaged bytes) is still refused
    rec = stone(1)
    cut = dict(rec.images, backlit_full=rec.images["backlit_full"][:-12])
    head = json.loads(frames[2])
    import hashlib
    for entry in head["blobs"]:
        entry["size"], entry["sha256"] = len(cut[entry["name"]]), hashlib.sha256(cut[entry["name"]]).hexdigest()
    blobs = [cut[e["name"]] for e in head["blobs"]]
    with pytest.raises(wire.WireError, match="not a whole PNG"):
        wire.decode_from_sorter([frames[0], frames[1], json.dumps(head).encode(), *blobs])
    with pytest.raises(wire.WireError, match="exactly"):
        wire.encode(stone(1, images={"backlit_crop": png(1)}))


def test_sizes_are_bounded() -> None:
    frames = wire.encode(wire.Ping(0, 0))
    with pytest.raises(wire.WireError, match="at most 65536"):
        wire.decode_from_sorter([frames[0], frames[1], b" " * (wire.MAX_HEADER_BYTES + 1)])
    with pytest.raises(wire.WireError, match="at most"):
        wire.decode_from_sorter([*frames[:2], frames[2], b"x" * (wire.MAX_MESSAGE_BYTES)])
    with pytest.raises(wire.WireError, match="extra frames"):
        wire.decode_from_sorter([*frames, b"x"])
    with pytest.raises(wire.WireError, match="one of WELCOME"):
        wire.decode_from_trainer(wire.encode(stone(1)))  # a sorter's message is not a reply


def test_random_frames_never_crash_the_parser() -> None:
    rng = random.Random(10)
    good = wire.encode(stone(1))
    for _ in range(3000):
        frames = [bytearray(f) for f in good[: rng.randrange(0, len(good) + 2)]]
        for f in frames:
            for _ in range(rng.randrange(3)):
                if f:
                    f[rng.randrange(len(f))] = rng.randrange(256)
        if rng.random() < 0.3:
            frames.append(bytearray(rng.randbytes(rng.randrange(40))))
        try:
            wire.decode_from_sorter([bytes(f) for f in frames])
        except wire.WireError as exc:
            assert str(exc) and "\n" not in str(exc)


def test_fuzzed_messages_from_an_authenticated_peer(tmp_path: Path) -> None:
    """Garbage from an allowed sorter: the server survives, stores nothing bad, NACKs each with a reason."""
    from sorterd.link.server import LinkServer

    ks = KeySet(tmp_path)
    rng = random.Random(3)
    good = wire.encode(stone(1))
    bad: list[list[bytes]] = [[rng.randbytes(rng.randrange(1, 50)) for _ in range(rng.randrange(1, 8))]
                              for _ in range(30)]
    bad += [_frames_with({"confidence": "high"}), _frames_with({"p_clarity": [1, 1, 1]}),
            [*good[:3], good[3][:-20], *good[4:]], [good[0], b"STONE", b"{" * 5000],
            _frames_with({"sorter_id": "sorter-a", "stone_id": "S0/1"})]

    async def go() -> None:
        inbox = FakeInbox()
        srv = LinkServer("tcp://127.0.0.1:*", ks.trainer_public, ks.trainer_secret, ks.allowed, inbox)
        await srv.start()
        serving = asyncio.ensure_future(srv.run())
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (ks.trainer_public, ks.sorter_public,
                                                                            ks.sorter_secret)
        sock.connect(srv.endpoint)
        replies = []
        for frames in [*bad, good, good]:  # the good one twice: a replayed id is stored once
            await sock.send_multipart(frames)
            assert await sock.poll(10_000), "no answer"
            replies.append(wire.decode_from_trainer(await sock.recv_multipart()))
        sock.close(0)
        ctx.destroy(0)
        srv.close()
        await serving
        nacks, acks = replies[: len(bad)], replies[len(bad):]
        assert all(isinstance(n, wire.Nack) and not n.retry and n.reason for n in nacks)
        assert acks == [wire.Ack(stone(1).key, "stored"), wire.Ack(stone(1).key, "duplicate")]
        assert list(inbox.kept) == [stone(1).key] and srv.stats.malformed == len(bad)

    asyncio.run(asyncio.wait_for(go(), 60))


# -- the document -----------------------------------------------------------------------------


def test_the_examples_in_the_protocol_document_parse() -> None:
    """Every ```frames block in PROTOCOL.md is a message: one frame per line, JSON headers as text."""
    blocks = re.findall(r"```frames\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 6
    kinds = set()
    for block in blocks:
        lines = block.strip().splitlines()
        frames = [line.split(" ", 1)[1].encode() for line in lines if not line.startswith("blob")]
        frames = [f.strip() for f in frames]
        n_blobs = sum(line.startswith("blob") for line in lines)
        kind = frames[1].decode()
        kinds.add(kind)
        if n_blobs:  # blobs are shown by name; rebuild them as real PNGs matching the header
            head = json.loads(frames[2])
            images = {b["name"]: png(i) for i, b in enumerate(head["blobs"])}
            for b in head["blobs"]:
                assert set(b) == {"name", "size", "sha256"}
            rec = wire.decode_from_sorter(wire.encode(_record_from(kind, head, images)))
            assert rec.key[0] == head["sorter_id"]
            continue
        wire.decode(frames, wire.SORTER_TYPES + wire.TRAINER_TYPES)
    assert kinds == set(wire.SORTER_TYPES + wire.TRAINER_TYPES)


def _record_from(kind: str, head: dict[str, Any], images: dict[str, bytes]) -> Any:
    from sorterd.link.records import SessionRecord, StoneRecord

    fields = {k: v for k, v in head.items() if k not in ("schema", "blobs")}
    if kind == "SESSION":
        return SessionRecord(**fields, images=images)
    fields["p_color"], fields["p_clarity"] = tuple(fields["p_color"]), tuple(fields["p_clarity"])
    return StoneRecord(**fields, images=images)


def test_the_documented_limits_are_the_code_limits() -> None:
    text = DOC.read_text()
    for value in (wire.MAX_HEADER_BYTES, wire.MAX_BLOB_BYTES, wire.MAX_MESSAGE_BYTES):
        assert f"{value:,}".replace(",", " ") in text or str(value) in text


# -- keys -------------------------------------------------------------------------------------


def test_generated_keys_are_pyzmq_certificates_with_safe_modes(tmp_path: Path) -> None:
    pub, sec = keys.generate(tmp_path / "k", "sorter-1")
    assert stat.S_IMODE(os.stat(sec).st_mode) == 0o600 and stat.S_IMODE(os.stat(pub).st_mode) == 0o644
    public, secret = zmq.auth.load_certificate(sec)
    assert zmq.auth.load_certificate(pub) == (public, None) and secret is not None
    assert keys.load_secret(sec) == (public, secret) and keys.load_public(pub) == public
    assert zmq.curve_public(secret) == public
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["sorter-1.key", "sorter-1.key_secret"]
    with pytest.raises(keys.KeyFileError, match="already exists"):
        keys.generate(tmp_path / "k", "sorter-1")
    assert zmq.auth.load_certificate(sec) == (public, secret)  # untouched


def test_a_readable_secret_key_is_refused(tmp_path: Path) -> None:
    _, sec = keys.generate(tmp_path, "t")
    os.chmod(sec, 0o644)
    with pytest.raises(keys.KeyFileError) as err:
        keys.load_secret(sec)
    assert str(err.value) == f"{sec}: mode 0644 lets others read a secret key; it must be 0600: chmod 600 {sec}"


def test_allow_list_maps_keys_to_ids_and_reports_bad_files(tmp_path: Path) -> None:
    a, _ = keys.generate(tmp_path / "gen", "sorter-a")
    b, bsec = keys.generate(tmp_path / "gen", "sorter-b")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    for p in (a, b, bsec):
        (allowed / p.name).write_bytes(p.read_bytes())
    (allowed / "copy.key").write_bytes(a.read_bytes())
    (allowed / "broken.key").write_text("curve\n    public-key = \"short\"\n")
    (allowed / "README").write_text("not a key")
    ids, problems = keys.load_allowed(allowed)
    assert ids == {keys.load_public(b): "sorter-b"}  # sorter-a's key is also copy.key: neither is trusted
    assert len(problems) == 3 and all("\n" not in p for p in problems)
    assert any("broken.key" in p and "Z85" in p for p in problems)
    assert any("copy.key, sorter-a.key hold the same key" in p for p in problems)
    assert any("sorter-b.key_secret" in p for p in problems)


def test_keys_generate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "generate", "--name", "sorter-7", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "sorter-7.key").is_file() and "sorter-7.key" in capsys.readouterr().out
    assert main(["keys", "generate", "--name", "sorter-7", "--dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["keys", "generate", "--name", "../x", "--dir", str(tmp_path)]) == 2
    assert "key name '../x'" in capsys.readouterr().err


def test_trainer_cli_refuses_a_readable_key_and_a_missing_allow_list(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _, sec = keys.generate(tmp_path, "trainer")
    (tmp_path / "allowed").mkdir()
    os.chmod(sec, 0o640)
    base = ["trainer", "--data", str(tmp_path / "data"), "--key", str(sec)]
    assert main([*base, "--allowed", str(tmp_path / "allowed")]) == 2
    assert f"chmod 600 {sec}" in capsys.readouterr().err
    os.chmod(sec, 0o600)
    assert main([*base, "--allowed", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
