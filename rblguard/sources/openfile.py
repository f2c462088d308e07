"""Reading complete lines from one open log file, as the follower needs them.

Held apart from the follower's moving between files: a budget per read, a line
longer than the budget read on to its newline, a line past MAX_LINE_BYTES skipped, a
truncation in place noticed, and a young file's head fingerprinted again as it grows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Protocol, TypeVar

from rblguard.model import MAX_LINE_BYTES
from rblguard.sources.layout import (
    FINGERPRINT_BYTES,
    fingerprint_fd,
    fingerprint_length,
    fingerprint_matches,
)

log = logging.getLogger("rblguard.sources.follow")

LONG_LINE_STEP = 1 << 20


@dataclass(slots=True)
class OpenFile:
    """A file being read, held open so a rename or unlink cannot take its bytes away."""

    fd: int
    path: str
    dev: int
    inode: int
    offset: int
    fingerprint: str
    key: str  # TAI64N label of a rotated file, LIVE_KEY or PREVIOUS_KEY when unlabelled
    floor: str  # newest rotated label that existed when it was opened (all older)
    older: tuple[int, int] | None = None  # an older file still unlabelled at that time
    finished: bool = False  # no longer the live file: read to its end, then move on
    skipping: bool = False  # inside a line longer than MAX_LINE_BYTES: drop to its end
    size_seen: int = 0  # the size at the last read: lines up to it were taken



def complete_lines(f: OpenFile, budget: int, whole_line: bool) -> bytes | None:
    """Complete lines from ``f`` within ``budget``; b"" if none is complete yet.

    A line longer than the budget comes whole when ``whole_line`` (nothing else was
    read in this call), else None says: stop here, it comes first next time.
    """
    size = f.size_seen = size_now(f)
    while not f.skipping or skip_line(f, size):
        available = size - f.offset
        if available <= 0:
            return b""
        data = os.pread(f.fd, min(available, budget), f.offset)
        cut = data.rfind(b"\n")
        if cut >= 0:
            return data[: cut + 1]
        if len(data) < available and not whole_line:
            return None
        if len(data) < available:
            line = long_line(f, data, size)
            if line is not None:
                return line
        elif f.finished:
            log.warning("%s ends with %d bytes without a newline (the writer died "
                        "mid-line): skipped", f.path, len(data))
            f.offset = size
            return b""
        elif len(data) <= MAX_LINE_BYTES:
            return b""  # the line is still being written
        log.warning("%s: the line at byte %d is longer than %d bytes: skipped (no "
                    "reject is that long)", f.path, f.offset, MAX_LINE_BYTES)
        f.skipping = True
    return b""


def size_now(f: OpenFile) -> int:
    """The file's size, after noticing a truncation in place or a young head's growth."""
    size = os.fstat(f.fd).st_size
    if size < f.offset and not f.finished:
        log.warning("%s was truncated in place (copy-and-truncate rotation?): reading "
                    "it again from its start; lines written just before the "
                    "truncation may be lost", f.path)
        f.offset = 0
        f.skipping = False
        f.fingerprint = fingerprint_fd(f.fd)
    if (fingerprint_length(f.fingerprint) < min(size, FINGERPRINT_BYTES)
            and fingerprint_matches(f.fd, f.fingerprint)):
        f.fingerprint = fingerprint_fd(f.fd)  # a young file's head grew (not rewritten)
    return size


def long_line(f: OpenFile, head: bytes, size: int) -> bytes | None:
    """A line longer than the read budget, read on to its newline.

    b"" while its newline is not written yet; None once it is past MAX_LINE_BYTES.
    """
    parts = [head]
    got = len(head)
    while f.offset + got < size and got <= MAX_LINE_BYTES:
        piece = os.pread(f.fd, min(LONG_LINE_STEP, size - f.offset - got), f.offset + got)
        if not piece:
            break
        cut = piece.find(b"\n")
        if cut >= 0:
            parts.append(piece[: cut + 1])
            return b"".join(parts)
        parts.append(piece)
        got += len(piece)
    return None if got > MAX_LINE_BYTES else b""


def skip_line(f: OpenFile, size: int) -> bool:
    """Drop the rest of an overlong line; False while its newline is not written yet.

    The offset moves on without a chunk, so a saved position stays before the line and
    a restart skips it again.
    """
    while f.offset < size:
        piece = os.pread(f.fd, min(LONG_LINE_STEP, size - f.offset), f.offset)
        if not piece:
            break
        cut = piece.find(b"\n")
        if cut >= 0:
            f.offset += cut + 1
            f.skipping = False
            return True
        f.offset += len(piece)
    return False


class _Piece(Protocol):  # what before_rewrite needs of a chunk
    dev: int
    inode: int
    start: int
    data: bytes


P = TypeVar("P", bound=_Piece)


def rewritten(f: OpenFile) -> bool:
    """Whether the file was truncated and refilled past its head (the head changed);
    one that only shrank is for complete_lines to report."""
    return (not fingerprint_matches(f.fd, f.fingerprint)
            and os.fstat(f.fd).st_size >= fingerprint_length(f.fingerprint))


def read_again(f: OpenFile) -> None:
    log.warning("%s was rewritten in place: reading it again from its start", f.path)
    f.offset = 0
    f.fingerprint = fingerprint_fd(f.fd)


def before_rewrite(f: OpenFile, chunks: list[P]) -> list[P]:
    """The chunks read before ``f`` was rewritten in place (copytruncate, then the
    writer refilling it past our offset, between our look at its head and our read).
    A chunk of ``f`` that its new content holds at the same offset is that content's
    middle: it and what follows are dropped, to be read from the start.  Chunks the
    old file gave are kept: their lines were written before the truncation."""
    kept = []
    for chunk in chunks:
        if (chunk.dev, chunk.inode) == (f.dev, f.inode) and \
                os.pread(f.fd, len(chunk.data), chunk.start) == chunk.data:
            break
        kept.append(chunk)
    return kept
