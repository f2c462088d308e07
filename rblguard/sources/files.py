"""A log read as a batch job (``scan``, ``simulate``, ``test-rules``): its files, and
their complete lines in buffers.

The daemon follows a log with rblguard.sources.follow; a command reads one from start
to end.  Both hand the scanner whole lines only, and both skip a line past
MAX_LINE_BYTES (see docs/limits.md).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from rblguard.model import MAX_LINE_BYTES
from rblguard.sources.layout import list_files

log = logging.getLogger("rblguard.sources.files")

CHUNK_SIZE = 8 << 20  # bytes per buffer: big enough that the scanner's setup is noise


def read_complete_lines(path: str | Path, start: int = 0, end: int | None = None,
                        chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[int, bytes]]:
    """(offset, buffer) pairs of a file's complete lines, in order, from ``start`` up to
    ``end`` (a line boundary; default: the end of the file).

    A last line without its newline is left out: it is not complete yet.  A line longer
    than a chunk is read whole up to MAX_LINE_BYTES; a longer one is skipped.
    """
    with open(path, "rb") as f:
        f.seek(start)
        offset, carry, skipping = start, b"", False
        while True:
            want = chunk_size if end is None else min(chunk_size, end - offset - len(carry))
            data = f.read(want) if want > 0 else b""
            if not data:
                return
            if skipping:
                cut = data.find(b"\n") + 1
                offset += cut or len(data)
                skipping, data = cut == 0, data[cut:] if cut else b""
            data = carry + data if carry else data
            cut = data.rfind(b"\n") + 1
            if cut:
                yield offset, data[:cut]
                offset += cut
            carry = data[cut:]
            if len(carry) > MAX_LINE_BYTES:
                log.warning("%s: the line at byte %d is longer than %d bytes: skipped",
                            path, offset, MAX_LINE_BYTES)
                offset, carry, skipping = offset + len(carry), b"", True


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
