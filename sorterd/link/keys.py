"""CurveZMQ key pairs on disk, in pyzmq's certificate format (`zmq.auth.load_certificate` reads them).

A key pair named NAME is two files in one directory:

* ``NAME.key``        -- the public key (mode 0644): give it to the other side;
* ``NAME.key_secret`` -- the public and the secret key (mode 0600): never leaves this machine.

The secret file is created 0600 from its first byte (``os.open(..., 0o600)``, then linked into
place, so it is never world-readable, never half-written and never overwrites a key), and a secret
file that its group or others may read is refused when loaded.  The trainer's allow-list is a
directory of sorters' public key files; each file's stem is that sorter's id (file-name-safe,
§7.2 manner), which the trainer uses in its dataset: the id comes from the key, not from a field
the sorter sends.
"""

from __future__ import annotations

import os
import re
import stat
from datetime import datetime
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from sorterd.data.files import fsync_dir

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
NAME_ALLOWED = "1-64 characters of A-Z a-z 0-9 . _ -, not starting with . _ -"
PUBLIC_SUFFIX, SECRET_SUFFIX = ".key", ".key_secret"


class KeyFileError(ValueError):
    """A key file that cannot be used; the text is one line naming the file and what to do."""


def _text(public: bytes, secret: bytes | None) -> bytes:
    """The certificate text pyzmq writes (`zmq.auth.create_certificates`)."""
    kind = "Secret" if secret else "Public"
    lines = [f"#   ****  Generated on {datetime.now()} by sorterd keys generate  ****",
             f"#   ZeroMQ CURVE {kind} Certificate",
             "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions." if secret else
             "#   Exchange securely, or use a secure mechanism to verify the contents of this file after exchange.",
             "", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return ("\n".join(lines) + "\n").encode()


def write_new(path: Path, payload: bytes, mode: int) -> None:
    """Create `path` with `mode` from its first byte, whole (fsync) and only if it does not exist."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; 0644 is meant for public keys
        os.write(fd, payload)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.link(tmp, path)  # fails if path exists: a key is never overwritten
    except FileExistsError:
        raise KeyFileError(f"{path}: already exists; a key is never overwritten (remove it first, or use "
                           "another --name)") from None
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def write_pair(secret_path: Path, secret: bytes, public_path: Path, public: bytes) -> None:
    """A key pair on disk, never half of one: the secret (0600) first, then the public (0644),
    then their directory made durable (link and release keys)."""
    write_new(secret_path, secret, 0o600)
    try:
        write_new(public_path, public, 0o644)
    except BaseException:
        secret_path.unlink(missing_ok=True)  # never half a pair
        raise
    fsync_dir(secret_path.parent)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise KeyFileError(f"key name {name!r}: {NAME_ALLOWED} (it becomes the sorter id and a file name)")
    return name


def generate(directory: Path, name: str) -> tuple[Path, Path]:
    """A new key pair NAME.key (0644) and NAME.key_secret (0600) in `directory`; their paths.
    Refuses (KeyFileError) to overwrite either file."""
    check_name(name)
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / (name + PUBLIC_SUFFIX), directory / (name + SECRET_SUFFIX)
    for p in (public_path, secret_path):
        if p.exists():
            raise KeyFileError(f"{p}: already exists; a key is never overwritten (remove it first, or use another --name)")
    public, secret = zmq.curve_keypair()
    write_pair(secret_path, _text(public, secret), public_path, _text(public, None))
    return public_path, secret_path


def _z85_key(value: bytes | None, path: Path, which: str) -> bytes:
    if value is None:
        raise KeyFileError(f"{path}: no {which}-key line; a pyzmq certificate (sorterd keys generate) required")
    try:
        ok = len(value) == 40 and len(z85.decode(value)) == 32
    except (ValueError, KeyError, IndexError, TypeError):
        ok = False
    if not ok:
        raise KeyFileError(f"{path}: {which}-key is not a 40-character Z85 CurveZMQ key")
    return value


def _load(path: Path) -> tuple[bytes | None, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: cannot read the key file: {exc}") from None


def check_secret_mode(path: Path) -> None:
    """Refuse (KeyFileError) a secret key file that its group or others may read (link and release keys)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the secret key file: {exc.strerror}") from None
    if mode & 0o077:
        raise KeyFileError(f"{path}: mode {mode:04o} lets others read a secret key; it must be 0600: "
                           f"chmod 600 {path}")


def load_public(path: Path) -> bytes:
    """The Z85 public key of a `.key` (or `.key_secret`) file."""
    public, _ = _load(path)
    return _z85_key(public, path, "public")


def load_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a `.key_secret` file; refused if its group or others may read it."""
    check_secret_mode(path)
    public, secret = _load(path)
    return _z85_key(public, path, "public"), _z85_key(secret, path, "secret")


def load_allowed(directory: Path) -> tuple[dict[bytes, str], list[str]]:
    """The allow-list: ({Z85 public key: sorter id (the file's stem)}, problems found, one line each).

    Only ``*.key`` files count; a bad one is reported and left out, never half-trusted; a key
    found under two names is left out under both."""
    if not directory.is_dir():
        raise KeyFileError(f"{directory}: not a directory; the allow-list is a directory of sorters' .key files")
    allowed: dict[bytes, str] = {}
    names: dict[bytes, list[str]] = {}
    problems: list[str] = []
    for path in sorted(directory.iterdir()):
        if path.name.endswith(SECRET_SUFFIX):
            problems.append(f"{path}: a secret key does not belong in the allow-list (left out; move it away)")
            continue
        if path.suffix != PUBLIC_SUFFIX:
            continue
        try:
            sorter = check_name(path.stem)
            key = load_public(path)
        except KeyFileError as exc:
            problems.append(f"{exc} (left out)")
            continue
        names.setdefault(key, []).append(sorter)
    for key, sorters in names.items():
        if len(sorters) > 1:  # which id would it be?  Neither: fail closed
            problems.append(f"{directory}: {', '.join(s + '.key' for s in sorters)} hold the same key (all left "
                            "out: one key, one sorter)")
        else:
            allowed[key] = sorters[0]
    return allowed, problems
