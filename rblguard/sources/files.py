"""A log read as a batch job (``scan``, ``simulate``, ``test-rules``): its files, and
their complete lines in buffers.

The daemon follows a log with rblguard.sources.follow; a command reads one from start
to end.  Both hand the scanner whole lines only, and both skip a line past
MAX_LINE_BYTES (see docs/limits.md).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from rblguard.logs import warn
from rblguard.model import MAX_LINE_BYTES
from rblguard.sources.layout import list_files

CHUNK_SIZE = 8 << 20  # bytes per buffer: big enough that the scanner's setup is noise


def read_complete_lines(path: str | Path, start: int = 0, end: int | None = None,
                        chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[int, bytes]]:
    """(offset, buffer) pairs of a file's complete lines, in order, from ``start`` up to
    ``end`` (a line boundary; default: the end of the file).

    A last line without its newline is left out: it is not complete yet.  A line longer
    than a chunk is read whole up to MAX_LINE_BYTES; a longer one is skipped.  The
    buffers are read_windows()'s, each copied out, so that they may be kept.
    """
    for offset, window, stop in read_windows(path, start, end, chunk_size):
        yield offset, bytes(window[1:stop])


WINDOW_SIZE = 1 << 20  # bytes per window: a pass over one stays in the CPU's cache


def read_windows(path: str | Path, start: int = 0, end: int | None = None,
                 size: int = WINDOW_SIZE) -> Iterator[tuple[int, bytearray, int]]:
    """(offset, window, stop) triples covering a file's complete lines from ``start`` up
    to ``end`` (a line boundary; default: the end of the file): ``window[1:stop]`` are
    whole lines, the first at byte ``offset``; ``window[0]`` is a newline, so a pattern
    can look behind for the start of the first line as of any other.

    One buffer, reused: a window is valid only until the next is asked for, and the
    bytes past ``stop`` are not lines (a partial one, or stale), so every search in it
    must end at ``stop``.  Reading into the same cache-sized buffer is what makes a
    scan cheaper than reading line by line (fresh large buffers cost a page fault per
    page, and each pass over one that misses the cache costs a trip to memory).
    A line longer than the window grows it up to MAX_LINE_BYTES; a longer one is
    skipped whole, and said once.
    """
    window = bytearray(size + 1)
    window[0] = 10
    cap = MAX_LINE_BYTES + 2  # the longest line kept, its newline, and window[0]
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        # window[i] is the file's byte offset + i - 1; window[1:have] is a partial line
        offset, have, skipping = start, 1, False
        while True:
            room = len(window) - have
            if end is not None:
                room = min(room, end - offset - (have - 1))
            filled = have + _read_into(f, window, have, room)
            if filled == have:
                return
            if skipping:  # the rest of an overlong line, up to its newline
                newline = window.find(b"\n", have, filled)
                if newline < 0:
                    offset, have = offset + filled - 1, 1
                    continue
                offset += newline
                window[1:filled - newline] = window[newline + 1:filled]
                have = filled = filled - newline
                skipping = False
            cut = window.rfind(b"\n", 1, filled) + 1
            if cut:
                yield offset, window, cut
                offset += cut - 1
                window[1:1 + filled - cut] = window[cut:filled]
                have = 1 + filled - cut
            elif filled < len(window):  # a short read: wait for the rest of the line
                have = filled
            elif len(window) < cap:  # a long line: a larger window
                window.extend(bytes(min(len(window), cap - len(window))))
                have = filled
            else:
                warn(__name__, "%s: the line at byte %d is longer than %d bytes: skipped",
                     path, offset, MAX_LINE_BYTES)
                offset, have, skipping = offset + filled - 1, 1, True


def _read_into(f: BinaryIO, window: bytearray, at: int, room: int) -> int:
    """Bytes read into ``window[at:at + room]``; the views are released at once, or the
    window could not grow."""
    if room <= 0:
        return 0
    with memoryview(window) as whole, whole[at:at + room] as part:
        return f.readinto(part) or 0


def log_files(source: str | Path) -> list[Path]:
    """The files of a log source that an admin named (a file, or a multilog directory
    oldest first), each checked to be a regular file: OSError naming the path if not.

    A FIFO or a device would block or never end, and a directory without a single log
    file would read as an empty log: both are errors, not "no rejects".
    """
    files = list_files(str(source))
    if not files:
        raise OSError(errno.ENOENT, "no log file in this directory (no current, no @*.s)",
                      str(source))
    for file in files:
        mode = os.stat(file).st_mode
        if not stat.S_ISREG(mode):
            what = ("is a directory, not a log file" if stat.S_ISDIR(mode)
                    else "is not a regular file (a FIFO, socket or device)")
            raise OSError(errno.EINVAL, what, str(file))
    return files
