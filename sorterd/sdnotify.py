"""systemd's notify protocol (sd_notify): READY=1, WATCHDOG=1, STOPPING=1.

The protocol is one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET
(an abstract socket when it starts with '@').  systemd-python's
`systemd.daemon.notify` does the same; we use it when installed and fall
back to the socket otherwise, so the daemon needs no extra dependency.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send `state` to systemd; False when not running under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    try:
        from systemd import daemon  # type: ignore[import-not-found,attr-defined]

        return bool(daemon.notify(state))
    except ImportError:
        pass
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
        return True
    except OSError:
        return False
