"""The trainer side: a model bundle becomes signed release N (DESIGN §4a "sign release").

`sign_release(src, out, key, release, trainer)` copies the files the sorter needs (everything in
the bundle but pickles -- ``*.pt`` -- and any old manifest signature) into `out`, adds to the
manifest the release fields, writes it, and signs its exact bytes::

    "release": 7,                      # strictly increasing; the sorter refuses <= its highest
    "trainer": "workshop-pc",          # who made it (the signing key is named in manifest.sig)
    "files": {"model.onnx": {"size": 4334517, "sha256": "<hex>"}, ...}   # every file but the
                                       # manifest and its signature; nothing else may be there

``manifest.sig`` (JSON, beside the manifest)::

    {"format": "sorterd-sig/1", "alg": "ed25519", "key": "<base64 raw public key>",
     "signature": "<base64 of Ed25519(manifest.json's bytes)>"}

The input spec (`input`) and the outputs are the bundle manifest's own (`sorterd.data.bundle`).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sorterd.data.bundle import ModelError, sha256_file
from sorterd.data.files import write_bytes_atomic, write_json_atomic
from sorterd.release.keys import key_id

MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
SIG_FORMAT = "sorterd-sig/1"
NOT_SHIPPED = (".pt", ".pth", ".pkl")  # pickles: the sorter never reads them, so they are not sent


def release_files(bundle: Path) -> dict[str, dict[str, Any]]:
    """{name: {size, sha256}} of every file of a flat bundle but the manifest and its signature."""
    files = {}
    for p in sorted(bundle.iterdir()):
        if p.name in (MANIFEST, SIGNATURE):
            continue
        files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return files


def sign_bytes(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """The manifest.sig file's bytes for these manifest bytes."""
    sig = key.sign(manifest_bytes)
    doc = {"format": SIG_FORMAT, "alg": "ed25519", "key": key_id(key.public_key()),
           "signature": base64.b64encode(sig).decode()}
    return (json.dumps(doc, indent=2) + "\n").encode()


def sign_in_place(bundle: Path, key: Ed25519PrivateKey) -> None:
    """(Re-)sign a release directory whose manifest.json is already final."""
    write_bytes_atomic(bundle / SIGNATURE, sign_bytes((bundle / MANIFEST).read_bytes(), key))


def sign_release(src: Path, out: Path, key: Ed25519PrivateKey, release: int, trainer: str) -> Path:
    """Write signed release `release` of bundle `src` into the new directory `out`; returns `out`."""
    if release < 1:
        raise ModelError(f"release {release}: must be a whole number >= 1 (each new release one higher)")
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{src}: no readable manifest.json ({exc})") from None
    if out.exists():
        raise ModelError(f"{out}: already exists; a release directory is written once (choose another --out)")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for p in sorted(src.iterdir()):
            if p.name in (MANIFEST, SIGNATURE) or p.suffix in NOT_SHIPPED:
                continue
            if p.is_symlink() or not p.is_file():
                raise ModelError(f"{p}: not a plain file; a release holds plain files only")
            shutil.copyfile(p, tmp / p.name)
        manifest.update({"release": int(release), "trainer": str(trainer), "files": release_files(tmp)})
        write_json_atomic(tmp / MANIFEST, manifest)
        sign_in_place(tmp, key)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
