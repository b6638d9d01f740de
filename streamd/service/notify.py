"""systemd's sd_notify protocol (READY=1, WATCHDOG=1, ...) over $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import time


def sd_notify(message: str) -> bool:
    """Send ``message`` to systemd; a no-op (False) when not run by systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(addr)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


class Watchdog:
    """Pings systemd's watchdog, but only when told that audio was processed: a pipeline
    that stops moving stops pinging, and systemd restarts it."""

    def __init__(self):
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        self.interval = usec / 2e6 if usec else 0.0
        self._last = 0.0

    def processed(self) -> None:
        if self.interval and time.monotonic() - self._last >= self.interval:
            sd_notify("WATCHDOG=1")
            self._last = time.monotonic()
