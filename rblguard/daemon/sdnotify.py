"""sd_notify by hand: tell systemd we are ready, reloading, stopping, and alive.

A datagram to ``$NOTIFY_SOCKET`` is the whole protocol; without systemd (no variable)
every call is a no-op, so the daemon runs the same in a terminal.
"""

from __future__ import annotations

import os
import socket
import time


def notify(message: str) -> bool:
    """Send one state message; False when not under systemd or the send failed."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def ready() -> bool:
    return notify("READY=1")


def reloading() -> bool:
    # MONOTONIC_USEC lets systemd >= 253 match the reload to this notification.
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Seconds systemd waits for a keep-alive, if it asked for them (for this process)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None
