"""A time bound on the standard library's ``re`` engine, for scanning whole files fast.

The rules are compiled with the ``regex`` module because its matching takes a timeout:
a rule that backtracks catastrophically on a hostile line must not stall anything
(docs/rules.md).  But over a whole buffer the standard library's ``re`` is about a
third faster, and a scan of months of logs is mostly that one search.  ``re`` has no
timeout; it does check for signals while it matches, so a SIGALRM timer whose handler
raises TimeoutError bounds it just as well.  Signals reach only the main thread, so
callers elsewhere (the daemon's threads) keep to ``regex`` and its timeout.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import regex

_armed = False


def usable() -> bool:
    """True where a timer can bound ``re``: in the main thread, on a system with
    setitimer."""
    return (hasattr(signal, "setitimer")
            and threading.current_thread() is threading.main_thread())


def _expired(signum: int, frame: FrameType | None) -> None:
    if _armed:  # a late signal after the bound was lifted is ignored
        raise TimeoutError("re: the time bound ran out")


@contextmanager
def bound(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the ``with`` body once ``seconds`` (wall clock) have passed.

    Only from the main thread (see usable()); the previous SIGALRM handler and timer
    are put back on the way out.
    """
    global _armed
    previous = signal.signal(signal.SIGALRM, _expired)
    _armed = True
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        _armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compile_fast(pattern: bytes, flags: int) -> re.Pattern[bytes] | None:
    """``pattern`` compiled by ``re`` (with the ``re`` flags ``flags``), or None when it
    uses what only ``regex`` knows: then the caller keeps the ``regex`` pattern."""
    try:
        return re.compile(pattern, flags)
    except (re.error, OverflowError, RecursionError):
        return None


def findall(pattern: regex.Pattern, fast: re.Pattern | None, data: bytes | bytearray,
            stop: int, seconds: float) -> list:
    """``pattern.findall`` over ``data[:stop]``: by ``fast`` (the same pattern compiled
    by ``re``) under bound() where usable(), else by ``regex`` with its own timeout;
    either way TimeoutError once ``seconds`` have passed."""
    if fast is not None and usable():
        with bound(seconds):
            return fast.findall(data, 0, stop)
    return pattern.findall(data, 0, stop, timeout=seconds)
