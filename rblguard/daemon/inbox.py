"""The loop's one inbox: work other threads hand over, and a pipe that rings for it.

The control socket's threads, signal handlers and the fallback file watcher put items
here.  Each put also writes a byte to a pipe, so the loop can wait in one poll() for
this inbox and for inotify's descriptor together: a change to a log then wakes the
loop thread directly, with no second thread and no hand-over between the two
(docs/following.md has what that saved: a few per cent of the daemon's CPU).
"""

from __future__ import annotations

import contextlib
import os
import queue
from typing import Any


class Inbox:
    """A queue with a doorbell; put() may be called from any thread or a signal
    handler, take() only by the loop."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._bell, self._ring = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def put(self, item: Any) -> None:
        self._items.put(item)  # first the item, then the bell: take() never misses it
        with contextlib.suppress(BlockingIOError):  # a full pipe rings already
            os.write(self._ring, b"!")

    def fileno(self) -> int:
        """Readable while something may wait: for the loop's poll()."""
        return self._bell

    def take(self) -> list[Any]:
        """Every item waiting now, oldest first (never blocks).  The one reader is the
        loop, so empty() is exact; bytes past the first read ring again, harmlessly."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._bell, 4096)
        items = []
        get, empty = self._items.get_nowait, self._items.empty
        while not empty():
            items.append(get())
        return items

    def close(self) -> None:
        for fd in (self._bell, self._ring):
            with contextlib.suppress(OSError):
                os.close(fd)
