"""Frames <-> messages for the sorter ↔ trainer link, parsed strictly (wire protocol v1, `PROTOCOL.md`).

Every message is a ZeroMQ multipart message ``[b"SRT1", TYPE, HEADER, BLOB...]``: the protocol
tag, the message type in ASCII, a UTF-8 JSON object (≤ 64 KiB, always ``"schema": 1``) and, for
``STONE`` and ``SESSION``, one frame per PNG image, in the order the header's ``"blobs"`` lists
them with their size and sha256.  What a record carries is §5.1 (a flagged stone, or every Nth
confident one for drift checks), its session's §2.4 metadata and reference frames, ids in the
§7.2 manner (file-name-safe: they become file names in the trainer's §7.1 dataset).

Parsing is strict because the other end is only authenticated, not trusted: exact frame counts,
known types, no field missing or extra, every number finite and in range, probabilities that sum
to 1, image names exactly the expected set, every blob's size and sha256 as announced, every
image a whole PNG (magic and IEND).  Every refusal is a `WireError` whose message is one line
saying what was wrong and what is allowed.  JSON only: no pickle, ever.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from zmq import NOBLOCK, Again

from sorterd.domain import BINS
from sorterd.link.records import SESSION_IMAGES, STONE_IMAGES, Record, RecordKey, SessionRecord, StoneRecord

TAG = b"SRT1"
SCHEMA = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_BLOB_BYTES = 24 * 1024 * 1024  # one PNG: a 5 MP frame compresses well below this
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # all frames of one message together
MAX_FRAME_BYTES = max(MAX_HEADER_BYTES, MAX_BLOB_BYTES)  # the sockets' ZMQ_MAXMSGSIZE (per frame)
MAX_REASON_CHARS = 500
MAX_COUNT = 2**53  # JSON integers both ends read exactly
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last chunk: length 0, type, its CRC

SORTER_TYPES = ("HELLO", "PING", "STONE", "SESSION", "RELEASE_GET", "RELEASE_RESULT")
TRAINER_TYPES = ("WELCOME", "PONG", "ACK", "NACK", "RELEASE_OFFER", "RELEASE_CHUNK")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_ID_ALLOWED = "1-64 characters of A-Z a-z 0-9 . _ -, not starting with . _ -"


class WireError(ValueError):
    """A message that does not follow wire protocol v1; the text is one line: what, and what is allowed."""


@dataclass(frozen=True)
class Hello:
    """Sorter → trainer on every (re)connect: who speaks (its key says who) and how full its outbox is.
    `release`: the signed release it runs (0: its configured bundle); None (the field left out): a
    sorter that takes no releases over the link (no release store, or older software) -- never offered one."""

    software: str
    outbox_entries: int
    outbox_bytes: int
    release: int | None = None


@dataclass(frozen=True)
class Ping:
    """Sorter → trainer heartbeat, with the outbox depth (`OutboxSource.depth`) and `release` as in HELLO."""

    outbox_entries: int
    outbox_bytes: int
    release: int | None = None


@dataclass(frozen=True)
class Welcome:
    """Trainer → sorter answer to HELLO: the id the trainer knows this sorter by (its key's name)."""

    sorter_id: str
    max_message_bytes: int


@dataclass(frozen=True)
class Pong:
    """Trainer → sorter heartbeat answer."""


@dataclass(frozen=True)
class Ack:
    """Trainer → sorter: the record is on the trainer's disk (fsync), "stored" now or "duplicate" before."""

    key: RecordKey
    status: str


@dataclass(frozen=True)
class Nack:
    """Trainer → sorter: not stored.  retry: True = send it again later; False = never (keep it aside).

    key is None when the message was too malformed to name one."""

    key: RecordKey | None
    reason: str
    retry: bool


MAX_CHUNK_BYTES = 256 * 1024  # one RELEASE_CHUNK: small enough never to hold the sorter's link task long
MAX_SORTER_FRAME_BYTES = MAX_CHUNK_BYTES + 1024  # the sorter DEALER's ZMQ_MAXMSGSIZE: a chunk, headers, no more
MAX_RELEASE_FILES = 64
MAX_RELEASE_BYTES = 2**40  # total_bytes' bound on the wire; the sorter's own [models] max_release_mb is tighter
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class ReleaseFile:
    """One file of an offered release: a plain name, its size and sha256 (the signed manifest lists them too)."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ReleaseOffer:
    """Trainer → sorter: signed release `release` is there for the taking.  The byte stream a
    sorter downloads is the files in this order, back to back (`total_bytes` = the sum of sizes);
    `manifest_sha256` is manifest.json's.  Nothing here is trusted: the sorter verifies the signed
    manifest after the download (`sorterd.release.verify`)."""

    release: int
    manifest_sha256: str
    total_bytes: int
    files: tuple[ReleaseFile, ...]


@dataclass(frozen=True)
class ReleaseGet:
    """Sorter → trainer: send `length` bytes (≤ MAX_CHUNK_BYTES) of the release's stream from `offset`."""

    release: int
    offset: int
    length: int


@dataclass(frozen=True)
class ReleaseChunk:
    """Trainer → sorter: bytes [offset, offset + len(data)) of the release's stream (one blob frame)."""

    release: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class ReleaseResult:
    """Sorter → trainer: what became of an offered release (or of the running one, after a health
    rollback: status "rolled-back").  `check` names the failed check ('' when accepted)."""

    release: int
    status: str  # accepted | refused | rolled-back
    check: str
    detail: str


RELEASE_STATUSES = ("accepted", "refused", "rolled-back")
RESULT_BATCH = "release"  # the trainer ACKs a RELEASE_RESULT as [sorter_id, "release", "<release>.<status>"]


def result_key(sorter_id: str, result: ReleaseResult) -> RecordKey:
    """The key of the ACK that says `result` is on the trainer's disk."""
    return (sorter_id, RESULT_BATCH, f"{result.release}.{result.status}")

Message = (Hello | Ping | Welcome | Pong | Ack | Nack | StoneRecord | SessionRecord | ReleaseOffer | ReleaseGet
           | ReleaseChunk | ReleaseResult)

# -- encoding ---------------------------------------------------------------------------------


def _header(obj: dict[str, Any]) -> bytes:
    raw = json.dumps({"schema": SCHEMA, **obj}, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header is {len(raw)} bytes; at most {MAX_HEADER_BYTES} allowed")
    return raw


def _blobs(images: dict[str, bytes], names: Sequence[str]) -> tuple[list[dict[str, Any]], list[bytes]]:
    listed = [{"name": n, "size": len(images[n]), "sha256": hashlib.sha256(images[n]).hexdigest()} for n in names]
    return listed, [images[n] for n in names]


def encode(msg: Message) -> list[bytes]:
    """The frames of one message (the ROUTER's routing id not included).  Raises WireError for a record
    that would be refused at the other end (checked here too, so a bad record never leaves the sorter)."""
    if isinstance(msg, StoneRecord):
        fields = {k: getattr(msg, k) for k in _STONE_FIELDS}
        fields["p_color"], fields["p_clarity"] = list(msg.p_color), list(msg.p_clarity)
        listed, blobs = _blobs(msg.images, STONE_IMAGES) if set(msg.images) == set(STONE_IMAGES) else _bad_images(
            msg.images, STONE_IMAGES)
        frames = [TAG, b"STONE", _header({**fields, "blobs": listed}), *blobs]
    elif isinstance(msg, SessionRecord):
        listed, blobs = _blobs(msg.images, SESSION_IMAGES) if set(msg.images) == set(SESSION_IMAGES) else _bad_images(
            msg.images, SESSION_IMAGES)
        head = {"sorter_id": msg.sorter_id, "batch": msg.batch, "session_id": msg.session_id, "meta": msg.meta}
        frames = [TAG, b"SESSION", _header({**head, "blobs": listed}), *blobs]
    elif isinstance(msg, Hello):
        frames = [TAG, b"HELLO", _header({"software": msg.software, "outbox_entries": msg.outbox_entries,
                                           "outbox_bytes": msg.outbox_bytes, **_release_field(msg.release)})]
    elif isinstance(msg, Ping):
        frames = [TAG, b"PING", _header({"outbox_entries": msg.outbox_entries, "outbox_bytes": msg.outbox_bytes,
                                          **_release_field(msg.release)})]
    elif isinstance(msg, Welcome):
        frames = [TAG, b"WELCOME", _header({"sorter_id": msg.sorter_id, "max_message_bytes": msg.max_message_bytes})]
    elif isinstance(msg, Pong):
        frames = [TAG, b"PONG", _header({})]
    elif isinstance(msg, Ack):
        frames = [TAG, b"ACK", _header({"key": list(msg.key), "status": msg.status})]
    elif isinstance(msg, ReleaseOffer):
        files = [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in msg.files]
        frames = [TAG, b"RELEASE_OFFER", _header({"release": msg.release, "manifest_sha256": msg.manifest_sha256,
                                                   "total_bytes": msg.total_bytes, "files": files})]
    elif isinstance(msg, ReleaseGet):
        frames = [TAG, b"RELEASE_GET", _header({"release": msg.release, "offset": msg.offset, "length": msg.length})]
    elif isinstance(msg, ReleaseChunk):
        frames = [TAG, b"RELEASE_CHUNK", _header({"release": msg.release, "offset": msg.offset}), bytes(msg.data)]
    elif isinstance(msg, ReleaseResult):
        frames = [TAG, b"RELEASE_RESULT", _header({"release": msg.release, "status": msg.status, "check": msg.check,
                                                    "detail": _one_line(msg.detail)})]
    else:
        key = None if msg.key is None else list(msg.key)
        frames = [TAG, b"NACK", _header({"key": key, "reason": _one_line(msg.reason), "retry": msg.retry})]
    decode(frames, TRAINER_TYPES if frames[1].decode() in TRAINER_TYPES else SORTER_TYPES)  # what we send parses
    return frames


def _release_field(release: int | None) -> dict[str, int]:
    return {} if release is None else {"release": release}


def _bad_images(images: dict[str, bytes], expected: Sequence[str]) -> tuple[list[dict[str, Any]], list[bytes]]:
    raise WireError(f"images {sorted(images)}: exactly {list(expected)} required")


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 3] + "..."


# -- decoding ---------------------------------------------------------------------------------


def decode_from_sorter(frames: Sequence[bytes]) -> Hello | Ping | StoneRecord | SessionRecord | ReleaseGet | ReleaseResult:
    """A message the trainer received (routing id already removed)."""
    msg = decode(frames, SORTER_TYPES)
    assert isinstance(msg, Hello | Ping | StoneRecord | SessionRecord | ReleaseGet | ReleaseResult)
    return msg


def decode_from_trainer(frames: Sequence[bytes]) -> Welcome | Pong | Ack | Nack | ReleaseOffer | ReleaseChunk:
    """A message the sorter received."""
    msg = decode(frames, TRAINER_TYPES)
    assert isinstance(msg, Welcome | Pong | Ack | Nack | ReleaseOffer | ReleaseChunk)
    return msg


def decode(frames: Sequence[bytes], allowed: Sequence[str]) -> Message:
    """One message of the types in `allowed`; WireError (one line) for anything else."""
    if len(frames) < 3:
        raise WireError(f"{len(frames)} frames; at least 3 (tag, type, header) required")
    total = sum(len(f) for f in frames)
    if total > MAX_MESSAGE_BYTES:
        raise WireError(f"message is {total} bytes; at most {MAX_MESSAGE_BYTES} allowed")
    if bytes(frames[0]) != TAG:
        raise WireError(f"protocol tag {bytes(frames[0])[:16]!r}: only {TAG!r} (wire protocol v1) is spoken")
    kind = bytes(frames[1]).decode("ascii", "replace")
    if kind not in allowed:
        raise WireError(f"message type {kind[:16]!r}: one of {', '.join(allowed)} expected here")
    head = _parse_header(bytes(frames[2]))
    blobs = [bytes(f) for f in frames[3:]]
    if kind == "RELEASE_CHUNK" and len(blobs) != 1:
        raise WireError(f"{kind}: {len(blobs)} data frames; exactly 1 (4 frames in all) required")
    if kind not in ("STONE", "SESSION", "RELEASE_CHUNK") and blobs:
        raise WireError(f"{kind}: {len(blobs)} extra frames; exactly 3 allowed")
    return _DECODERS[kind](Fields(kind, head), blobs)


def _reject_constant(name: str) -> float:
    raise WireError(f"header: {name} is not JSON; finite numbers only")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise WireError(f"header: key {k[:40]!r} given twice; each key once")
        out[k] = v
    return out


def _parse_header(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header is {len(raw)} bytes; at most {MAX_HEADER_BYTES} allowed")
    try:
        head = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise WireError(f"header is not UTF-8 ({exc.reason} at byte {exc.start}); UTF-8 JSON required") from None
    except RecursionError:
        raise WireError("header nests too deeply; a flat JSON object required") from None
    except json.JSONDecodeError as exc:
        raise WireError(f"header is not JSON ({exc.msg} at char {exc.pos}); a JSON object required") from None
    if not isinstance(head, dict):
        raise WireError(f"header is a JSON {type(head).__name__}; a JSON object required")
    schema = head.get("schema")
    if type(schema) is not int or schema != SCHEMA:
        raise WireError(f"header schema {schema!r}: only {SCHEMA} is understood")
    return head


class Fields:
    """The header of one message, read field by field: each read checks the type and range, and
    `done` refuses fields nobody read (a typo or a newer schema must not pass unnoticed)."""

    def __init__(self, kind: str, head: dict[str, Any]) -> None:
        self.kind, self.head, self.read = kind, head, {"schema"}

    def _get(self, name: str) -> Any:
        if name not in self.head:
            raise WireError(f"{self.kind}: field {name!r} missing")
        self.read.add(name)
        return self.head[name]

    def fail(self, name: str, value: Any, allowed: str) -> WireError:
        shown = repr(value)
        return WireError(f"{self.kind}: {name} = {shown[:60]}{'...' if len(shown) > 60 else ''}: {allowed}")

    def text(self, name: str, max_chars: int = MAX_REASON_CHARS) -> str:
        v = self._get(name)
        if not isinstance(v, str) or len(v) > max_chars:
            raise self.fail(name, v, f"a string of at most {max_chars} characters required")
        return v

    def ident(self, name: str, empty_ok: bool = False) -> str:
        v = self._get(name)
        if not (isinstance(v, str) and (_ID.match(v) or (empty_ok and v == ""))):
            raise self.fail(name, v, _ID_ALLOWED + (" (or empty)" if empty_ok else ""))
        return v

    def choice(self, name: str, allowed: Sequence[str]) -> str:
        v = self._get(name)
        if v not in allowed or not isinstance(v, str):
            raise self.fail(name, v, f"one of {', '.join(allowed)}")
        return v

    def flag(self, name: str) -> bool:
        v = self._get(name)
        if type(v) is not bool:
            raise self.fail(name, v, "true or false")
        return v

    def has(self, name: str) -> bool:
        """Whether optional field `name` is there (read it next, or `done` refuses it)."""
        return name in self.head

    def count(self, name: str, maximum: int = MAX_COUNT) -> int:
        v = self._get(name)
        if type(v) is not int or not 0 <= v <= maximum:
            raise self.fail(name, v, f"an integer in [0, {maximum}]")
        return v

    def number(self, name: str, low: float, high: float, *, low_open: bool = False) -> float:
        v = self._get(name)
        ok = type(v) in (int, float) and math.isfinite(v) and (v > low if low_open else v >= low) and v <= high
        if not ok:
            raise self.fail(name, v, f"a finite number in {'(' if low_open else '['}{low}, {high}]")
        return float(v)

    def probabilities(self, name: str) -> tuple[float, float, float]:
        v = self._get(name)
        ok = (isinstance(v, list) and len(v) == 3 and all(type(p) in (int, float) and math.isfinite(p)
                                                         and 0.0 <= p <= 1.0 for p in v))
        if not ok or abs(sum(v) - 1.0) > 1e-3:
            raise self.fail(name, v, "3 finite probabilities in [0, 1] summing to 1 (± 0.001)")
        return (float(v[0]), float(v[1]), float(v[2]))

    def time(self, name: str) -> str:
        v = self.text(name, 64)
        try:
            t = datetime.fromisoformat(v)
        except ValueError:
            t = None
        if t is None or t.tzinfo is None:
            raise self.fail(name, v, "an ISO 8601 time with its UTC offset, e.g. 2026-02-15T09:30:00+07:00")
        return v

    def key(self, name: str, *, none_ok: bool = False) -> RecordKey | None:
        v = self._get(name)
        if v is None and none_ok:
            return None
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(p, str) for p in v)):
            raise self.fail(name, v, "[sorter_id, batch, stone_id or session:<id>]")
        if not (_ID.match(v[0]) and _ID.match(v[1]) and _ID.match(v[2].removeprefix("session:"))):
            raise self.fail(name, v, f"each part {_ID_ALLOWED}")
        return (v[0], v[1], v[2])

    def obj(self, name: str) -> dict[str, Any]:
        v = self._get(name)
        if not isinstance(v, dict):
            raise self.fail(name, v, "a JSON object required")
        return v

    def done(self) -> None:
        extra = sorted(set(self.head) - self.read)
        if extra:
            raise WireError(f"{self.kind}: unknown fields {', '.join(repr(k[:40]) for k in extra[:5])}; "
                            "schema 1 has none of them")


def _images(f: Fields, blobs: list[bytes], expected: Sequence[str]) -> dict[str, bytes]:
    """The blobs the header lists, checked against it: count, names, sizes, sha256, whole PNGs."""
    listed = f._get("blobs")
    if not isinstance(listed, list) or len(listed) != len(expected):
        raise f.fail("blobs", listed, f"a list of {len(expected)} {{name, size, sha256}} required")
    if len(blobs) != len(listed):
        raise WireError(f"{f.kind}: {len(blobs)} image frames but the header lists {len(listed)}; they must match")
    names = [b.get("name") if isinstance(b, dict) else None for b in listed]
    if sorted(n for n in names if isinstance(n, str)) != sorted(expected):
        raise f.fail("blobs", names, f"names exactly {list(expected)}, each once")
    out: dict[str, bytes] = {}
    for entry, blob in zip(listed, blobs, strict=True):
        name = entry["name"]
        if set(entry) != {"name", "size", "sha256"}:
            raise WireError(f"{f.kind}: blob {name}: fields {sorted(entry)}; exactly name, size, sha256")
        if type(entry["size"]) is not int or entry["size"] != len(blob):
            raise WireError(f"{f.kind}: blob {name}: header says {entry['size']!r} bytes, frame has {len(blob)}")
        if len(blob) > MAX_BLOB_BYTES:
            raise WireError(f"{f.kind}: blob {name}: {len(blob)} bytes; at most {MAX_BLOB_BYTES} allowed")
        if entry["sha256"] != hashlib.sha256(blob).hexdigest():
            raise WireError(f"{f.kind}: blob {name}: sha256 does not match the frame; the image is damaged")
        if not blob.startswith(PNG_MAGIC) or not blob.endswith(PNG_IEND):
            raise WireError(f"{f.kind}: blob {name}: not a whole PNG (magic and final IEND chunk required)")
        out[name] = blob
    return out


_STONE_FIELDS = ("sorter_id", "batch", "stone_id", "session_id", "lot_id", "wall_time", "model_version",
                 "p_color", "p_clarity", "decision", "route", "confidence", "size_mm", "uncertainty", "reason",
                 "pixels_per_mm", "crop_mm")


def _stone(f: Fields, blobs: list[bytes]) -> StoneRecord:
    rec = StoneRecord(
        sorter_id=f.ident("sorter_id"), batch=f.ident("batch"), stone_id=f.ident("stone_id"),
        session_id=f.ident("session_id"), lot_id=f.ident("lot_id", empty_ok=True), wall_time=f.time("wall_time"),
        model_version=f.ident("model_version"), p_color=f.probabilities("p_color"),
        p_clarity=f.probabilities("p_clarity"), decision=f.choice("decision", BINS), route=f.choice("route", BINS),
        confidence=f.number("confidence", 0.0, 1.0), size_mm=f.number("size_mm", 0.0, 100.0, low_open=True),
        uncertainty=f.number("uncertainty", 0.0, 1.0), reason=_reason(f),
        pixels_per_mm=f.number("pixels_per_mm", 0.0, 10000.0, low_open=True),
        crop_mm=f.number("crop_mm", 0.0, 1000.0, low_open=True), images=_images(f, blobs, STONE_IMAGES))
    f.done()
    return rec


def _reason(f: Fields) -> Any:
    return f.choice("reason", ("flagged", "drift"))


def _session(f: Fields, blobs: list[bytes]) -> SessionRecord:
    rec = SessionRecord(sorter_id=f.ident("sorter_id"), batch=f.ident("batch"), session_id=f.ident("session_id"),
                        meta=f.obj("meta"), images=_images(f, blobs, SESSION_IMAGES))
    f.done()
    return rec


def _hello(f: Fields, blobs: list[bytes]) -> Hello:
    m = Hello(f.text("software", 100), f.count("outbox_entries"), f.count("outbox_bytes"), _running(f))
    f.done()
    return m


def _ping(f: Fields, blobs: list[bytes]) -> Ping:
    m = Ping(f.count("outbox_entries"), f.count("outbox_bytes"), _running(f))
    f.done()
    return m


def _running(f: Fields) -> int | None:
    """HELLO/PING's optional `release` (0: the configured bundle runs); None when left out."""
    return f.count("release") if f.has("release") else None


def _welcome(f: Fields, blobs: list[bytes]) -> Welcome:
    m = Welcome(f.ident("sorter_id"), f.count("max_message_bytes"))
    f.done()
    return m


def _pong(f: Fields, blobs: list[bytes]) -> Pong:
    f.done()
    return Pong()


def _ack(f: Fields, blobs: list[bytes]) -> Ack:
    key = f.key("key")
    assert key is not None
    m = Ack(key, f.choice("status", ("stored", "duplicate")))
    f.done()
    return m


def _nack(f: Fields, blobs: list[bytes]) -> Nack:
    m = Nack(f.key("key", none_ok=True), f.text("reason"), f.flag("retry"))
    f.done()
    return m


def _release_number(f: Fields) -> int:
    v = f.count("release")
    if v < 1:
        raise f.fail("release", v, "a whole number >= 1")
    return v


def _release_offer(f: Fields, blobs: list[bytes]) -> ReleaseOffer:
    release = _release_number(f)
    manifest_sha = f.text("manifest_sha256", 64)
    if not _SHA256.match(manifest_sha):
        raise f.fail("manifest_sha256", manifest_sha, "64 lowercase hex digits")
    total = f.count("total_bytes", MAX_RELEASE_BYTES)
    listed = f._get("files")
    if not isinstance(listed, list) or not 1 <= len(listed) <= MAX_RELEASE_FILES:
        raise f.fail("files", listed, f"a list of 1 to {MAX_RELEASE_FILES} {{name, size, sha256}}")
    files = []
    for entry in listed:
        ok = (isinstance(entry, dict) and set(entry) == {"name", "size", "sha256"} and isinstance(entry["name"], str)
              and _FILE_NAME.match(entry["name"]) is not None and type(entry["size"]) is int
              and 0 <= entry["size"] <= MAX_RELEASE_BYTES and isinstance(entry["sha256"], str)
              and _SHA256.match(entry["sha256"]) is not None)
        if not ok:
            raise f.fail("files", entry, "entries {name: a plain file name (1-128 of A-Z a-z 0-9 . _ -), "
                         "size: bytes, sha256: 64 lowercase hex}")
        files.append(ReleaseFile(entry["name"], entry["size"], entry["sha256"]))
    if len({x.name for x in files}) != len(files):
        raise f.fail("files", [x.name for x in files], "each file name once")
    if "manifest.json" not in {x.name for x in files}:
        raise f.fail("files", [x.name for x in files], "a list that includes manifest.json")
    if sum(x.size for x in files) != total:
        raise f.fail("total_bytes", total, f"the sum of the files' sizes ({sum(x.size for x in files)})")
    f.done()
    return ReleaseOffer(release, manifest_sha, total, tuple(files))


def _release_get(f: Fields, blobs: list[bytes]) -> ReleaseGet:
    m = ReleaseGet(_release_number(f), f.count("offset", MAX_RELEASE_BYTES), f.count("length", MAX_CHUNK_BYTES))
    if m.length < 1:
        raise f.fail("length", m.length, f"an integer in [1, {MAX_CHUNK_BYTES}]")
    f.done()
    return m


def _release_chunk(f: Fields, blobs: list[bytes]) -> ReleaseChunk:
    m = ReleaseChunk(_release_number(f), f.count("offset", MAX_RELEASE_BYTES), blobs[0])
    if not 1 <= len(m.data) <= MAX_CHUNK_BYTES:
        raise WireError(f"RELEASE_CHUNK: {len(m.data)} data bytes; 1 to {MAX_CHUNK_BYTES} allowed")
    f.done()
    return m


def _release_result(f: Fields, blobs: list[bytes]) -> ReleaseResult:
    release, status = _release_number(f), f.choice("status", RELEASE_STATUSES)
    check = f.text("check", 64)
    if (status == "accepted") != (check == ""):
        raise f.fail("check", check, "empty exactly when status is accepted (else the check that failed)")
    m = ReleaseResult(release, status, check, f.text("detail"))
    f.done()
    return m


_DECODERS: dict[str, Callable[[Fields, list[bytes]], Message]] = {
    "STONE": _stone, "SESSION": _session, "HELLO": _hello, "PING": _ping, "WELCOME": _welcome, "PONG": _pong,
    "ACK": _ack, "NACK": _nack, "RELEASE_OFFER": _release_offer, "RELEASE_GET": _release_get,
    "RELEASE_CHUNK": _release_chunk, "RELEASE_RESULT": _release_result}


def send_now(sock: Any, frames: Sequence[bytes]) -> bool:
    """Send without waiting (a zmq.asyncio socket's NOBLOCK send is resolved at once); whether it went.
    False: no connection ready or its queue full -- the caller sends again on its own schedule."""
    fut = sock.send_multipart(list(frames), flags=NOBLOCK)
    exc = fut.exception() if fut.done() else None
    if exc is not None and not isinstance(exc, Again):
        raise exc
    return exc is None


def record_key(frames: Sequence[bytes]) -> RecordKey | None:
    """The key a (possibly malformed) STONE/SESSION message names, if its header gives one: for a NACK."""
    if len(frames) < 3 or bytes(frames[1]) not in (b"STONE", b"SESSION") or len(frames[2]) > MAX_HEADER_BYTES:
        return None
    try:
        head: Any = json.loads(bytes(frames[2]))
        third = head.get("stone_id") if bytes(frames[1]) == b"STONE" else f"session:{head.get('session_id')}"
        key = (head.get("sorter_id"), head.get("batch"), third)
        ok = all(isinstance(p, str) and _ID.match(p.removeprefix("session:")) for p in key)
        return (str(key[0]), str(key[1]), str(key[2])) if ok else None
    except (ValueError, AttributeError, TypeError, RecursionError):
        return None


__all__ = ["Ack", "Hello", "MAX_CHUNK_BYTES", "MAX_FRAME_BYTES", "MAX_SORTER_FRAME_BYTES", "Message", "Nack", "Ping", "Pong", "Record",
           "ReleaseChunk", "ReleaseFile", "ReleaseGet", "ReleaseOffer", "ReleaseResult", "WireError", "Welcome",
           "decode_from_sorter", "decode_from_trainer", "encode", "record_key", "send_now"]
