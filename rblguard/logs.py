"""Logging: to stderr (journald stamps it), with repeated warnings limited.

A flood of bad log lines or a firewall that keeps refusing must not flood the journal:
``warn_limited`` lets through a few messages per key per minute and then says how many
it held back.

``logging`` itself is imported only where a message is made (``warn``) or the daemon
sets it up: it is 5 ms of the start of every command, and ``scan`` of a clean log never
says a thing.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging

INTERVAL = 60.0  # seconds
BURST = 5  # messages per key per interval before suppression

_windows: dict[str, list[float | int]] = {}  # key -> [window start, sent, suppressed]


def setup_logging(level: str = "info") -> None:
    """Log to stderr; a timestamp only on a terminal (journald adds its own)."""
    import logging

    fmt = "%(levelname)s %(message)s"
    if sys.stderr.isatty():
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt,
                        stream=sys.stderr, force=True)
    # What the format never shows is not gathered for each record: the calling frame
    # (a walk up the stack), the thread, the process (the logging HOWTO's optimisation
    # list).  The daemon logs a line per ban, and a wave bans thousands a second.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def warn(logger: str, message: str, *args: object) -> None:
    """``logging.getLogger(logger).warning(message, *args)``, with logging imported
    only now (see above): for the stages, which rarely have something to say."""
    import logging

    logging.getLogger(logger).warning(message, *args)


def warn_limited(log: logging.Logger, key: str, message: str, *args: object,
                 now: float | None = None) -> bool:
    """Warn at most BURST times per INTERVAL for ``key``; True if this one was logged."""
    now = time.monotonic() if now is None else now
    window = _windows.get(key)
    if window is None or now - window[0] >= INTERVAL:
        if window is not None and window[2]:
            log.warning("... suppressed %d similar messages (%s) in the last %.0f s",
                        window[2], key, now - window[0])
        window = _windows[key] = [now, 0, 0]
        if len(_windows) > 1000:  # keys are few; never let them grow without bound
            _windows.clear()
            _windows[key] = window
    if window[1] < BURST:
        window[1] += 1
        log.warning(message, *args)
        return True
    window[2] += 1
    return False
