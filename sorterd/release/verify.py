"""Verification of a signed release before anything of it is loaded (DESIGN §4a; issue 12 item 2).

`verify_release` is the ONE code path: the sorter's store runs it on every staged bundle and
`sorterd models verify` runs it from the command line.  Checks, in order; the first that fails
raises `Refused(check, detail)` and nothing is loaded:

==============  ===========================================================================
symlink         the bundle is a directory of plain files: no symlink, no sub-directory
unsigned        there is a manifest.sig beside manifest.json (format `sign.SIG_FORMAT`)
untrusted-key   it names a key among the trusted ones (`[models] trusted_keys`, `--trusted`)
signature       Ed25519 over manifest.json's exact bytes verifies (a tampered manifest fails)
manifest        the verified bytes are a `sorterd-model/1` manifest with `release`, `trainer`,
                `files` (and everything `sorterd.data.bundle` requires)
path            every listed name is a plain file name: not absolute, no `..`, no `/`
downgrade       release > the highest this sorter ever accepted, unless pinned (`ReleaseFloor`)
oversized       listed sizes and the files on disk are each under the size limit
unlisted-file   no file that the manifest does not list
missing-file    every listed file is there
file-size       ... with its listed size
file-hash       ... and its listed sha256 (a tampered ONNX fails here)
onnx            model.onnx is listed, is the manifest's onnx_sha256, onnxruntime loads it and its
                inputs/outputs are the manifest's (names, 6 x H x W float input, one logit per class)
==============  ===========================================================================

Hashing happens only after the cheap checks (stat), so an oversized or padded bundle costs
no reading.  The manifest is parsed from the bytes whose signature was verified, never re-read.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sorterd.data.bundle import Manifest, ModelError, parse_manifest, sha256_file
from sorterd.release import crash
from sorterd.release.keys import key_id
from sorterd.release.sign import MANIFEST, SIG_FORMAT, SIGNATURE

CHECKS = ("symlink", "unsigned", "untrusted-key", "signature", "manifest", "path", "downgrade", "oversized",
          "unlisted-file", "missing-file", "file-size", "file-hash", "onnx")
# After verification, the QA gate's checks (`sorterd.release.qa`) refuse with these.
QA_CHECKS = ("golden", "reference-kit")


class Refused(ModelError):
    """A release refused: `check` is which check failed (a metric label), the text says why."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check, self.detail = check, detail


@dataclass(frozen=True)
class ReleaseFloor:
    """The downgrade rule: accept a release above `highest`, or exactly `pinned` (an operator's
    explicit `sorterd models pin`)."""

    highest: int = 0
    pinned: int | None = None

    def allows(self, release: int) -> bool:
        return release > self.highest or release == self.pinned


@dataclass(frozen=True)
class Verified:
    """A release that passed every check."""

    path: Path
    release: int
    trainer: str
    key: str  # the signing key's id
    onnx_sha256: str
    total_bytes: int
    manifest: Manifest


def verify_release(bundle: Path, trusted: list[Ed25519PublicKey], floor: ReleaseFloor | None,
                   max_bytes: int) -> Verified:
    """Every check of the module docstring, in order; `floor` None skips `downgrade` (a release
    this sorter already accepted, re-checked at start-up).  Raises `Refused`."""
    names = _plain_files(bundle)
    if MANIFEST not in names:
        raise Refused("manifest", f"{bundle}: no manifest.json")
    if SIGNATURE not in names:
        raise Refused("unsigned", f"{bundle}: no {SIGNATURE}; sign it on the trainer (sorterd models sign)")
    manifest_bytes = (bundle / MANIFEST).read_bytes()
    signer = _check_signature(bundle, manifest_bytes, trusted)
    crash.point("verify.signature")
    manifest, raw = _parse(bundle, manifest_bytes)
    files = _listed(bundle, raw["files"])
    release = raw["release"]
    if floor is not None and not floor.allows(release):
        pin = f", pinned {floor.pinned}" if floor.pinned is not None else ""
        raise Refused("downgrade", f"{bundle}: release {release} is not above {floor.highest}, the highest this "
                      f"sorter has accepted{pin}; to go back on purpose: sorterd models pin {release}")
    total = _check_sizes(bundle, names, files, max_bytes)
    _check_hashes(bundle, files)
    crash.point("verify.hashes")
    onnx_sha = _check_onnx(bundle, manifest, files)
    return Verified(bundle, release, raw["trainer"], signer, onnx_sha, total, manifest)


def _plain_files(bundle: Path) -> set[str]:
    try:
        st = os.lstat(bundle)
    except OSError as exc:
        raise Refused("symlink", f"{bundle}: cannot read it ({exc.strerror})") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise Refused("symlink", f"{bundle}: not a plain directory (a release is a directory of plain files)")
    names = set()
    with os.scandir(bundle) as it:
        for entry in it:
            if entry.is_symlink():
                raise Refused("symlink", f"{bundle / entry.name}: a symlink; a release holds plain files only")
            if not entry.is_file(follow_symlinks=False):
                raise Refused("unlisted-file", f"{bundle / entry.name}: not a plain file (a release is flat)")
            names.add(entry.name)
    return names


def _check_signature(bundle: Path, manifest_bytes: bytes, trusted: list[Ed25519PublicKey]) -> str:
    path = bundle / SIGNATURE
    try:
        doc = json.loads(path.read_bytes())
        ok = isinstance(doc, dict) and doc.get("format") == SIG_FORMAT and doc.get("alg") == "ed25519"
        signer, sig = str(doc["key"]), base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        ok = False
    if not ok:
        raise Refused("signature", f"{path}: not a {SIG_FORMAT} Ed25519 signature file")
    by_id = {key_id(k): k for k in trusted}
    if signer not in by_id:
        raise Refused("untrusted-key", f"{path}: signed by key {signer}, which is not among the "
                      f"{len(by_id)} trusted key(s) ([models] trusted_keys / --trusted)")
    try:
        by_id[signer].verify(sig, manifest_bytes)
    except InvalidSignature:
        raise Refused("signature", f"{path}: the signature does not match manifest.json's bytes "
                      "(the manifest was altered after signing)") from None
    return signer


def _parse(bundle: Path, manifest_bytes: bytes) -> tuple[Manifest, dict[str, Any]]:
    path = bundle / MANIFEST
    try:
        raw = json.loads(manifest_bytes)
        manifest = parse_manifest(raw, path)
    except (ValueError, TypeError) as exc:  # ModelError and JSONDecodeError are ValueErrors
        raise Refused("manifest", str(exc)) from None
    release, trainer, files = raw.get("release"), raw.get("trainer"), raw.get("files")
    if not isinstance(release, int) or isinstance(release, bool) or release < 1:
        raise Refused("manifest", f"{path}: release {release!r}: a signed release has a whole number >= 1")
    if not isinstance(trainer, str) or not trainer:
        raise Refused("manifest", f"{path}: trainer {trainer!r}: a signed release names the trainer that made it")
    if not isinstance(files, dict) or not files:
        raise Refused("manifest", f"{path}: files must list every file with its size and sha256")
    return manifest, raw


def _listed(bundle: Path, files: dict[str, Any]) -> dict[str, tuple[int, str]]:
    out = {}
    for name, spec in files.items():
        if (not name or name.startswith("/") or "/" in name or "\\" in name or "\0" in name
                or name in (".", "..") or ".." in name.split("/") or name in (MANIFEST, SIGNATURE)):
            raise Refused("path", f"{bundle / MANIFEST}: files lists {name!r}: only plain file names are allowed "
                          "(no absolute path, no '..', no '/', not the manifest or its signature)")
        ok = isinstance(spec, dict) and isinstance(spec.get("size"), int) and isinstance(spec.get("sha256"), str)
        if not ok or spec["size"] < 0 or len(spec["sha256"]) != 64:
            raise Refused("manifest", f"{bundle / MANIFEST}: files[{name!r}] must be {{size: bytes, sha256: 64 hex}}")
        out[name] = (int(spec["size"]), str(spec["sha256"]).lower())
    return out


def _check_sizes(bundle: Path, names: set[str], files: dict[str, tuple[int, str]], max_bytes: int) -> int:
    listed = sum(size for size, _ in files.values())
    on_disk = sum((bundle / n).stat().st_size for n in names)
    if max(listed, on_disk) > max_bytes:
        raise Refused("oversized", f"{bundle}: {max(listed, on_disk)} bytes (listed {listed}, on disk {on_disk}); "
                      f"the limit is {max_bytes} ([models] max_release_mb)")
    extra = sorted(names - set(files) - {MANIFEST, SIGNATURE})
    if extra:
        raise Refused("unlisted-file", f"{bundle / extra[0]}: not listed in the manifest "
                      f"({len(extra)} unlisted file(s)); a release holds exactly its listed files")
    missing = sorted(set(files) - names)
    if missing:
        raise Refused("missing-file", f"{bundle / missing[0]}: listed in the manifest but not there "
                      f"({len(missing)} missing)")
    for name, (size, _) in sorted(files.items()):
        actual = (bundle / name).stat().st_size
        if actual != size:
            raise Refused("file-size", f"{bundle / name}: {actual} bytes, the manifest lists {size}")
    return on_disk


def _check_hashes(bundle: Path, files: dict[str, tuple[int, str]]) -> None:
    for name, (_, want) in sorted(files.items()):
        got = sha256_file(bundle / name)
        if got != want:
            raise Refused("file-hash", f"{bundle / name}: sha256 {got[:12]}… is not the manifest's {want[:12]}… "
                          "(altered or damaged)")


def _check_onnx(bundle: Path, manifest: Manifest, files: dict[str, tuple[int, str]]) -> str:
    if "model.onnx" not in files:
        raise Refused("onnx", f"{bundle}: the manifest does not list model.onnx")
    sha = files["model.onnx"][1]
    if sha != manifest.onnx_sha256.lower():
        raise Refused("onnx", f"{bundle / MANIFEST}: onnx_sha256 {manifest.onnx_sha256[:12]}… is not files"
                      f"['model.onnx'].sha256 {sha[:12]}…")
    problems = onnx_io_problems(bundle / "model.onnx", manifest)
    if problems:
        raise Refused("onnx", f"{bundle / 'model.onnx'}: " + "; ".join(problems))
    return sha


def onnx_io_problems(onnx_path: Path, manifest: Manifest) -> list[str]:
    """What differs between the graph's inputs/outputs and the manifest's (empty: they match)."""
    import onnxruntime as ort

    from sorterd.parts.inference.onnxruntime import _load_errors

    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except _load_errors(ort) as exc:  # onnxruntime's own load errors, as the backend catches them
        return [f"onnxruntime cannot load it ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"]
    problems = []
    inputs = {i.name: i for i in session.get_inputs()}
    h, w = manifest.size
    inp = inputs.get(manifest.input_name)
    if inp is None or len(inputs) != 1:
        problems.append(f"inputs {sorted(inputs)}, the manifest's input.name is {manifest.input_name!r} (one input)")
    elif inp.type != "tensor(float)" or len(inp.shape) != 4 or list(inp.shape[1:]) != [6, h, w]:
        problems.append(f"input {inp.name!r} is {inp.type} {inp.shape}, the manifest says float32 [N, 6, {h}, {w}]")
    outputs = {o.name: o for o in session.get_outputs()}
    for head, name, classes in (("color", manifest.color_output, manifest.color_classes),
                                ("clarity", manifest.clarity_output, manifest.clarity_classes)):
        out = outputs.get(name)
        if out is None:
            problems.append(f"no output {name!r} (the manifest's outputs.{head}); its outputs are {sorted(outputs)}")
        elif len(out.shape) != 2 or out.shape[1] != len(classes):
            problems.append(f"output {name!r} has shape {out.shape}, the manifest's {head} head has "
                            f"{len(classes)} classes: [N, {len(classes)}]")
    return problems
