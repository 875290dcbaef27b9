"""The trainer's side of pushing signed releases to its sorters (issue 12 item 3; §5.4 step 6;
the wire side: `sorterd/link/PROTOCOL.md`).

    DIR/releases/signed/<N>/     release N as offered: a signed bundle, verified when it was put
                                 there (`offer_bundle`, `sorterd models offer BUNDLE --data DIR`)
    DIR/releases/results.json    per sorter: the release it runs, the last one offered to it, and
                                 what it answered for each (`ReleaseBook`, `sorterd trainer status`)

`OfferShelf` is the link server's `ReleaseShelf`: the newest release in signed/ as a
RELEASE_OFFER and bounded reads of its byte stream -- the offer's files back to back, in the
order manifest.json, manifest.sig, then the manifest's files by name (the sorter splits the stream
by that list and verifies the whole with `verify_release`; it never trusts the offer).  Each
read opens the files it spans and reads at most the asked length (≤ 256 KiB): never a whole
release in memory.  The shelf is rescanned by `refresh` (a thread), the offer is held in memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sorterd.data.bundle import sha256_file
from sorterd.data.files import copy_synced, fsync_dir, write_json_atomic
from sorterd.link.wire import MAX_CHUNK_BYTES, ReleaseFile, ReleaseOffer, ReleaseResult
from sorterd.release.sign import MANIFEST, SIGNATURE
from sorterd.release.verify import Verified, verify_release

log = logging.getLogger(__name__)

RELEASES_DIR = "releases"
SIGNED_DIR = "signed"
RESULTS_FILE = "results.json"
OFFER_MAX_BYTES = 10**12  # what `offer_bundle` lets through: each sorter applies its own [models] max_release_mb


class OfferError(ValueError):
    """A bundle that cannot be offered (one line: which, why)."""


def signed_dir(data: Path) -> Path:
    return Path(data) / RELEASES_DIR / SIGNED_DIR


@dataclass(frozen=True)
class Offered:
    """One release on the shelf: its offer and where each file of the stream is."""

    offer: ReleaseOffer
    path: Path


def offer_of(bundle: Path, release: int) -> ReleaseOffer:
    """The RELEASE_OFFER of a signed bundle directory: manifest.json, manifest.sig, then the
    manifest's files by name, each with its size on disk and sha256 (hashed here, once)."""
    manifest = json.loads((bundle / MANIFEST).read_bytes())
    names = [MANIFEST, SIGNATURE, *sorted(manifest["files"])]
    files = tuple(ReleaseFile(n, (bundle / n).stat().st_size, sha256_file(bundle / n)) for n in names)
    return ReleaseOffer(release, files[0].sha256, sum(f.size for f in files), files)


class OfferShelf:
    """DIR/releases/signed/: the newest release offered, and chunk reads of any on the shelf.
    `refresh` runs in a thread; `newest`/`get` read a dict replaced whole (the loop thread)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._shelf: dict[int, Offered] = {}
        self._seen: dict[int, int] = {}  # release -> manifest's mtime_ns when it was hashed

    def refresh(self) -> None:
        """Rescan signed/ (blocking: a new release is hashed once)."""
        shelf: dict[int, Offered] = {}
        if self.root.is_dir():
            for p in sorted(self.root.iterdir()):
                if not p.name.isdigit() or not (p / MANIFEST).is_file():
                    continue
                n, mtime = int(p.name), (p / MANIFEST).stat().st_mtime_ns
                old = self._shelf.get(n)
                if old is not None and self._seen.get(n) == mtime:
                    shelf[n] = old
                    continue
                try:
                    shelf[n] = Offered(offer_of(p, n), p)
                    self._seen[n] = mtime
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.error("release shelf: %s cannot be offered (%s)", p, exc)
        self._shelf = shelf

    def newest(self) -> ReleaseOffer | None:
        shelf = self._shelf
        return shelf[max(shelf)].offer if shelf else None

    def read(self, release: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of release `release`'s stream, cut at its end (blocking;
        at most MAX_CHUNK_BYTES).  ValueError (one line) for a release not offered or an offset
        outside the stream."""
        item = self._shelf.get(release)
        if item is None:
            raise ValueError(f"release {release} is not offered here (offered: {sorted(self._shelf) or 'none'})")
        total = item.offer.total_bytes
        if not 0 <= offset < total or not 1 <= length <= MAX_CHUNK_BYTES:
            raise ValueError(f"offset {offset}, length {length}: the stream is {total} bytes, offsets in [0, {total}) "
                             f"and lengths in [1, {MAX_CHUNK_BYTES}]")
        out, start = bytearray(), 0
        end = min(total, offset + length)
        for f in item.offer.files:
            lo, hi = max(offset, start), min(end, start + f.size)
            if lo < hi:
                with open(item.path / f.name, "rb") as src:
                    src.seek(lo - start)
                    out += src.read(hi - lo)
            start += f.size
        if len(out) != end - offset:
            raise ValueError(f"release {release}: its files changed on disk since they were offered")
        return bytes(out)


def offer_bundle(bundle: Path, data: Path, trusted: list[Ed25519PublicKey]) -> tuple[Verified, Path]:
    """`sorterd models offer`: verify `bundle` with the sorter's own checks (`verify_release`, no
    floor: each sorter applies its own), then copy it to DIR/releases/signed/<N>/ atomically
    (files fsynced, one rename).  Raises `Refused` (the failed check) or OfferError."""
    v = verify_release(bundle, trusted, None, OFFER_MAX_BYTES)
    shelf = signed_dir(data)
    final = shelf / str(v.release)
    if final.exists():
        raise OfferError(f"{final}: release {v.release} is already offered; a release number is offered once "
                         "(sign the bundle again with a higher --release)")
    shelf.mkdir(parents=True, exist_ok=True)
    tmp = shelf / f".{v.release}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for p in sorted(bundle.iterdir()):
            copy_synced(p, tmp / p.name)
        fsync_dir(tmp)
        os.replace(tmp, final)
        fsync_dir(shelf)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return v, final


# -- what each sorter said --------------------------------------------------------------------


def _now() -> float:
    return time.time()


class ReleaseBook:
    """DIR/releases/results.json, per sorter: `release` (what it runs, from its HELLO/PING),
    `offered` (the last release offered to it), `results` (release -> its last word).  The link
    server calls the writers from its release thread; `answered` reads memory (the loop)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._sorters: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise OfferError(f"{self.path}: not readable JSON ({exc}); restore it or remove it") from None
        sorters = raw.get("sorters") if isinstance(raw, dict) else None
        if not isinstance(sorters, dict):
            raise OfferError(f"{self.path}: must hold {{\"sorters\": {{<sorter>: {{...}}}}}}")
        return sorters

    def answered(self, sorter: str, release: int) -> bool:
        """Whether `sorter` has given its word on `release` (accepted, refused, rolled back): never re-offered."""
        with self._lock:
            return str(release) in self._sorters.get(sorter, {}).get("results", {})

    def running(self, sorter: str, release: int) -> None:
        self._update(sorter, "release", release)

    def offered(self, sorter: str, release: int) -> None:
        self._update(sorter, "offered", release)

    def result(self, sorter: str, result: ReleaseResult) -> None:
        with self._lock:
            entry = self._sorters.setdefault(sorter, {})
            entry.setdefault("results", {})[str(result.release)] = {**asdict(result), "at": _now()}
            entry["last_result"] = str(result.release)
            self._save()

    def _update(self, sorter: str, field: str, value: int) -> None:
        with self._lock:
            entry = self._sorters.setdefault(sorter, {})
            if entry.get(field) == value:
                return
            entry[field] = value
            entry[f"{field}_at"] = _now()
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"sorters": self._sorters})


def book_path(data: Path) -> Path:
    return Path(data) / RELEASES_DIR / RESULTS_FILE


def read_book(data: Path) -> dict[str, dict[str, Any]]:
    """The saved per-sorter release state ({} when no release was ever offered); OfferError."""
    return ReleaseBook(book_path(data))._sorters


def describe(entry: dict[str, Any]) -> tuple[str, str, str]:
    """(running, last offered, last result) of one sorter's book entry, as `trainer status` shows them."""
    running = entry.get("release")
    shown = "-" if running is None else ("bundle" if running == 0 else f"r{running}")
    offered = f"r{entry['offered']}" if "offered" in entry else "-"
    last = entry.get("results", {}).get(entry.get("last_result", ""))
    if not last:
        return shown, offered, "-"
    word = f"r{last['release']} {last['status']}"
    if last["status"] != "accepted":
        detail = last["detail"] if len(last["detail"]) <= 80 else last["detail"][:77] + "..."
        word += f" ({last['check']}: {detail})"
    return shown, offered, word
