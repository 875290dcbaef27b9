"""What crosses the link, and what each side of the transport needs from its neighbours.

A record is keyed by ``(sorter_id, batch, stone_id)`` (`RecordKey`); a session record
uses its session id in the third place, prefixed ``session:``, so both kinds share one
key space, one ack and one idempotency rule: a record stored twice is stored once.

Images are PNG bytes (lossless), named:

* stone:   ``backlit_crop``, ``toplit_crop`` (what the model saw) and ``backlit_full``,
  ``toplit_full`` (the whole frames of the pair);
* session: ``reference_backlit``, ``reference_toplit`` (the empty channel under each light).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

RecordKey = tuple[str, str, str]  # (sorter_id, batch, stone_id | "session:<session_id>")
Reason = Literal["flagged", "drift"]  # why the stone was sent: §5.2 flag, or every Nth confident one

STONE_IMAGES = ("backlit_crop", "toplit_crop", "backlit_full", "toplit_full")
SESSION_IMAGES = ("reference_backlit", "reference_toplit")


@dataclass(frozen=True)
class StoneRecord:
    """One stone sent for review (§5.1): what the sorter saw and what the model said."""

    sorter_id: str
    batch: str
    stone_id: str  # the sorter's id in its batch (§7.2 S000123)
    session_id: str  # the sorter's capture session this stone belongs to (its SessionRecord)
    lot_id: str
    wall_time: str  # ISO 8601 with offset, when it was decided
    model_version: str
    p_color: tuple[float, float, float]  # blue, light, inky
    p_clarity: tuple[float, float, float]  # transparent, translucent, opaque
    decision: str  # the decided bin (CUT/SELECT/FLIP/REJECT)
    route: str  # where the machine sent it
    confidence: float  # §5.2 combined confidence
    size_mm: float
    uncertainty: float  # §5.3 score in [0, 1]
    reason: Reason
    pixels_per_mm: float
    crop_mm: float
    images: dict[str, bytes] = field(default_factory=dict, repr=False)  # STONE_IMAGES -> PNG

    @property
    def key(self) -> RecordKey:
        return (self.sorter_id, self.batch, self.stone_id)


@dataclass(frozen=True)
class SessionRecord:
    """A capture session's metadata (§2.4, with pixels_per_mm) and reference frames, sent once."""

    sorter_id: str
    batch: str
    session_id: str
    meta: dict[str, object]  # session_meta.json as `sorterd.data.session.SessionMeta` writes it
    images: dict[str, bytes] = field(default_factory=dict, repr=False)  # SESSION_IMAGES -> PNG

    @property
    def key(self) -> RecordKey:
        return (self.sorter_id, self.batch, f"session:{self.session_id}")


Record = StoneRecord | SessionRecord


class OutboxSource(Protocol):
    """What the sorter's link client uses of the outbox.  Thread-safe; the client
    calls it through `asyncio.to_thread` or the outbox's own futures, never blocking the loop."""

    def pending(self, limit: int, exclude: frozenset[RecordKey]) -> list[Record]:
        """Up to `limit` records not yet acknowledged, oldest highest-priority first, none in `exclude`."""
        ...

    def acknowledged(self, key: RecordKey) -> None:
        """The trainer has the record on disk: remove it (idempotent)."""
        ...

    def refused(self, key: RecordKey, reason: str) -> None:
        """The trainer refused the record for good (it will never take it): keep it aside, counted."""
        ...

    def depth(self) -> tuple[int, int]:
        """(entries, bytes) waiting, as reported to the trainer in heartbeats."""
        ...


@dataclass(frozen=True)
class Stored:
    """The inbox's answer for one record."""

    status: Literal["stored", "duplicate", "refused", "unavailable"]
    reason: str = ""  # why refused (for good) or unavailable (disk full/unwritable: retry later)


class InboxSink(Protocol):
    """What the trainer's link server uses of the inbox.  Called from one worker thread."""

    def store(self, sorter_id: str, record: Record) -> Stored:
        """Write the record durably (fsync) before returning "stored"; "duplicate" if its key is already kept."""
        ...

    def sorter_seen(self, sorter_id: str, outbox_entries: int, outbox_bytes: int) -> None:
        """A heartbeat or hello from an authenticated sorter (for its shown state)."""
        ...
