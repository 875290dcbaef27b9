"""Ed25519 release-signing key pairs on disk (DESIGN §4a: each sorter trusts one or more release keys).

A pair named NAME is two PEM files in one directory:

* ``NAME.release.pub`` -- the public key (SubjectPublicKeyInfo PEM, 0644): goes in the sorters'
  ``[models] trusted_keys``;
* ``NAME.release.key`` -- the private key (PKCS#8 PEM, unencrypted, 0600): stays on the trainer.

Written and mode-checked exactly like the link's CurveZMQ keys (`sorterd.link.keys`): created
0600 from its first byte, never overwritten, and a private key its group or others may read is
refused when loaded.  A key's id (`key_id`) is the base64 of its 32 raw public bytes: the
signature file names it, so a refusal can say which key signed.
"""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sorterd.link.keys import KeyFileError, check_name, check_secret_mode, write_pair

PUBLIC_SUFFIX, SECRET_SUFFIX = ".release.pub", ".release.key"


def key_id(public: Ed25519PublicKey) -> str:
    """The key's id: base64 of its raw 32 bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def generate(directory: Path, name: str) -> tuple[Path, Path]:
    """A new pair NAME.release.pub (0644) and NAME.release.key (0600) in `directory`; their paths."""
    check_name(name)
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / (name + PUBLIC_SUFFIX), directory / (name + SECRET_SUFFIX)
    for p in (public_path, secret_path):
        if p.exists():
            raise KeyFileError(f"{p}: already exists; a key is never overwritten (remove it first, or use another --name)")
    private = Ed25519PrivateKey.generate()
    secret_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    write_pair(secret_path, secret_pem, public_path, public_pem)
    return public_path, secret_path


def load_public(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key of a ``.release.pub`` PEM file; KeyFileError says what is wrong."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the release public key: {exc.strerror or exc}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not a PEM public key (sorterd keys generate --kind release writes one)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}, not an Ed25519 key; release keys are Ed25519")
    return key


def load_private(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key of a ``.release.key`` file; refused if its group or others may read it."""
    check_secret_mode(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the release private key: {exc.strerror or exc}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not an unencrypted PEM private key (sorterd keys generate --kind release)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}, not an Ed25519 key; release keys are Ed25519")
    return key
