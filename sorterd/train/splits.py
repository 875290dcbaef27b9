"""Train / validation / test splits (§7.3, §7.4), snapshotted per model version.

Rules:

* duplicates (same pixels, §3.5) are removed first -- the kept copy is the
  first in labels.jsonl -- so one capture cannot sit in two splits;
* the test set is **whole lots** (§7.4: stones of one lot look alike).
  Given explicitly (``test_lots``), or chosen: the fewest lots, smallest
  first, that give at least `test_fraction` of the stones without going over
  `max_test_fraction`, leaving at least one lot to train on.  Only when no
  lot can be held out that way (a single lot, or lots too big) is the test
  set a stratified random sample instead, and ``lot_holdout`` says so;
* validation is a stratified sample of the remaining stones: every
  (lot, class) group gives the same share (largest-remainder rounding, so the
  sizes add up), about 10 % of the whole (80/10/10 of §7.3);
* stones without a class (skipped, reject) go where their lot goes: they
  count in the test set's reject/cost figures and are never trained on.

A snapshot is ``DIR/splits/<version>/{train,val,test}.txt`` (one stone_id per
line) plus ``split_info.json`` (how it was made) and ``duplicates.txt``.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from sorterd.data.dataset import Dataset, DatasetError, Duplicate, StoneLabel

SPLIT_NAMES = ("train", "val", "test")
INFO_FILE = "split_info.json"


@dataclass
class Splits:
    version: str
    train: list[str]
    val: list[str]
    test: list[str]
    test_lots: list[str]
    lot_holdout: bool
    seed: int
    duplicates: list[Duplicate] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def ids(self, name: str) -> list[str]:
        if name not in SPLIT_NAMES:
            raise ValueError(f"Bad split {name!r}: valid splits are {', '.join(SPLIT_NAMES)}")
        return list(getattr(self, name))


def make_splits(
    labels: Sequence[StoneLabel],
    *,
    version: str,
    seed: int = 0,
    test_lots: Sequence[str] | None = None,
    test_fraction: float = 0.10,
    max_test_fraction: float = 0.35,
    val_fraction: float = 0.10,
    duplicates: Sequence[Duplicate] = (),
) -> Splits:
    """Split already de-duplicated labels (see module docstring)."""
    if not labels:
        raise DatasetError("no stones to split")
    lots = sorted({lab.lot_id for lab in labels})
    rng = np.random.default_rng(seed)
    if test_lots is not None:
        unknown = sorted(set(test_lots) - set(lots))
        if unknown:
            raise DatasetError(f"test lots {unknown} are not in the dataset; its lots are {', '.join(lots)}")
        chosen = sorted(test_lots)
    else:
        chosen = choose_test_lots(labels, test_fraction, max_test_fraction)
    if chosen:
        test = [lab for lab in labels if lab.lot_id in chosen]
        rest = [lab for lab in labels if lab.lot_id not in chosen]
    else:
        test_ids = set(stratified_sample(labels, test_fraction, rng))
        test = [lab for lab in labels if lab.stone_id in test_ids]
        rest = [lab for lab in labels if lab.stone_id not in test_ids]
    if not any(lab.classified for lab in rest):
        raise DatasetError(f"nothing left to train on after holding out test lots {', '.join(chosen)}")
    share = val_fraction / max(1e-9, len(rest) / len(labels))
    val_ids = set(stratified_sample(rest, min(share, 0.5), rng))
    _ensure_validation(rest, val_ids)
    return Splits(
        version=version,
        train=[lab.stone_id for lab in rest if lab.stone_id not in val_ids],
        val=[lab.stone_id for lab in rest if lab.stone_id in val_ids],
        test=[lab.stone_id for lab in test],
        test_lots=chosen, lot_holdout=bool(chosen), seed=seed, duplicates=list(duplicates),
    )


def choose_test_lots(labels: Sequence[StoneLabel], fraction: float, max_fraction: float) -> list[str]:
    """Fewest whole lots, smallest first, with >= fraction and <= max_fraction of the stones."""
    counts: dict[str, int] = defaultdict(int)
    for lab in labels:
        counts[lab.lot_id] += 1
    total = len(labels)
    if len(counts) < 2:
        return []
    order = sorted(counts, key=lambda lot: (counts[lot], lot))
    chosen: list[str] = []
    held = 0
    for lot in order[:-1]:  # always leave at least one lot to train on
        if (held + counts[lot]) / total > max_fraction:
            break
        chosen.append(lot)
        held += counts[lot]
        if held / total >= fraction:
            return sorted(chosen)
    # No lot small enough: try the single lot closest to the target share.
    fits = [lot for lot in order[:-1] if counts[lot] / total <= max_fraction]
    return [min(fits, key=lambda lot: abs(counts[lot] / total - fraction))] if fits else []


def stratified_sample(labels: Sequence[StoneLabel], fraction: float, rng: np.random.Generator) -> list[str]:
    """About fraction of the stones, the same share of every (lot, class) group.

    Each group gets floor(share); the leftover stones go to the groups with
    the largest remainders, so the total is round(fraction x N) and small
    groups are still represented across the sample.
    """
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for lab in labels:
        groups[(lab.lot_id, lab.class_name or "unclassified")].append(lab.stone_id)
    keys = sorted(groups)
    exact = np.array([fraction * len(groups[k]) for k in keys])
    take = np.floor(exact).astype(int)
    leftover = int(round(fraction * len(labels))) - int(take.sum())
    if leftover > 0:
        # Ties broken at random (seeded), not by key order.
        order = np.lexsort((rng.random(len(keys)), -(exact - take)))
        take[order[:leftover]] += 1
    picked: list[str] = []
    for key, k in zip(keys, take, strict=True):
        members = list(groups[key])
        rng.shuffle(members)
        picked += members[:k]
    return picked


def _ensure_validation(rest: Sequence[StoneLabel], val_ids: set[str]) -> None:
    """A tiny dataset still needs >= 1 classified stone to validate and >= 2 to train."""
    classified = [lab.stone_id for lab in rest if lab.classified]
    if len(classified) < 3:
        raise DatasetError(f"only {len(classified)} classified stones to train and validate on; need at least 3")
    if not any(s in val_ids for s in classified):
        val_ids.add(classified[-1])
    while sum(1 for s in classified if s not in val_ids) < 2:
        val_ids.discard(next(s for s in classified if s in val_ids))


# -- snapshots ---------------------------------------------------------------------------


def snapshot_ids(folder: Path) -> set[str]:
    """Every stone id in a snapshot folder's train/val/test lists (missing lists count as empty)."""
    ids: set[str] = set()
    for name in ("train", "val", "test"):
        path = folder / f"{name}.txt"
        if path.is_file():
            ids |= set(path.read_text().split())
    return ids


def split_dir(root: Path, version: str) -> Path:
    return root / "splits" / version


def write_splits(ds: Dataset, splits: Splits) -> Path:
    """DIR/splits/<version>/: the three id lists, duplicates.txt and split_info.json."""
    out = split_dir(ds.root, splits.version)
    if out.exists():
        raise DatasetError(f"{out}: a split snapshot for {splits.version} exists already; "
                           f"reuse it with --splits {splits.version} or pick another --version")
    out.mkdir(parents=True)
    for name in SPLIT_NAMES:
        (out / f"{name}.txt").write_text("".join(f"{s}\n" for s in splits.ids(name)))
    (out / "duplicates.txt").write_text("".join(
        f"{d.stone_id} same_as {d.same_as}{'' if d.labels_agree else ' labels_differ'}\n"
        for d in splits.duplicates))
    splits.info = split_info(ds, splits)
    (out / INFO_FILE).write_text(json.dumps(splits.info, indent=2) + "\n")
    return out


def split_info(ds: Dataset, splits: Splits) -> dict[str, Any]:
    by_id = ds.by_id()
    return {
        "version": splits.version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": splits.seed,
        "lot_holdout": splits.lot_holdout,
        "test_lots": splits.test_lots,
        "counts": {name: len(splits.ids(name)) for name in SPLIT_NAMES},
        "classified": {name: sum(1 for s in splits.ids(name) if by_id[s].classified) for name in SPLIT_NAMES},
        "lots": {name: sorted({by_id[s].lot_id for s in splits.ids(name)}) for name in SPLIT_NAMES},
        "duplicates_removed": len(splits.duplicates),
        "labels_sha256": hashlib.sha256(ds.labels_path.read_bytes()).hexdigest(),
        "duplicates": [asdict(d) for d in splits.duplicates[:1000]],
    }


def read_splits(ds: Dataset, version: str) -> Splits:
    """A snapshot written by write_splits; every id must be in the dataset's labels."""
    folder = split_dir(ds.root, version)
    if not folder.is_dir():
        have = sorted(p.name for p in (ds.root / "splits").glob("*")) if (ds.root / "splits").is_dir() else []
        raise DatasetError(f"{folder}: no split snapshot {version!r}"
                           + (f"; this dataset has {', '.join(have)}" if have else ""))
    known = ds.by_id()
    where: dict[str, str] = {}
    lists = {name: _read_ids(folder / f"{name}.txt", known, where) for name in SPLIT_NAMES}
    info: dict[str, Any] = {}
    if (folder / INFO_FILE).exists():
        try:
            info = json.loads((folder / INFO_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{folder / INFO_FILE}: not valid JSON ({exc})") from None
    _check_lot_holdout(lists, known, info, where, folder / INFO_FILE)
    return Splits(version=version, train=lists["train"], val=lists["val"], test=lists["test"],
                  test_lots=list(info.get("test_lots", [])), lot_holdout=bool(info.get("lot_holdout", False)),
                  seed=int(info.get("seed", 0)), info=info)


def _check_lot_holdout(lists: dict[str, list[str]], known: dict[str, StoneLabel], info: dict[str, Any],
                       where: dict[str, str], info_path: Path) -> None:
    """A snapshot that holds out whole lots has no stone of a test lot in train or val (§7.4)."""
    test_lots = set(info.get("test_lots") or []) if info.get("lot_holdout") else set()
    for name in ("train", "val"):
        for sid in lists[name]:
            if known[sid].lot_id in test_lots:
                raise DatasetError(f"{where[sid]}: stone {sid!r} is of lot {known[sid].lot_id}, which {info_path} "
                                   "holds out whole for test (§7.4)")


def _read_ids(path: Path, known: dict[str, StoneLabel], where: dict[str, str]) -> list[str]:
    """One split file's ids; `where` (stone -> 'FILE:LINE', shared by the three files) refuses a
    stone listed twice, in one split or in two."""
    if not path.exists():
        raise DatasetError(f"{path}: missing")
    ids = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        sid = line.strip()
        if not sid:
            continue
        if sid not in known:
            raise DatasetError(f"{path}:{lineno}: stone {sid!r} is not in labels.jsonl")
        if sid in where:
            raise DatasetError(f"{path}:{lineno}: stone {sid!r} is also listed at {where[sid]}; "
                               "a stone belongs to one split, once")
        where[sid] = f"{path}:{lineno}"
        ids.append(sid)
    return ids
