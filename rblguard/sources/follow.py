"""Following log sources live: every complete line once, across rotations and restarts.

A source is a plain file, a multilog directory, or a multilog ``current`` file.  The
Follower hands out byte ranges of complete lines (``Chunk``); the daemon commits a
chunk's end as a ``SourcePosition`` only after acting on it, and passes the last
committed position back after a restart.

Why files are found by dev/inode, ordered by name: multilog rotates by renaming
``current`` to ``@<tai64n>.s``, which keeps the inode, so the inode says *which* file
we were reading and the TAI64N label in the name says *when* it was finished.  An open
descriptor is kept on the file being read, so a file renamed (or even deleted) under us
is still read to its end before the next one.

Noticing that a source changed is rblguard.sources.watch's job; this module only reads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import NamedTuple

from rblguard.model import SourcePosition
from rblguard.sources.layout import (
    FINGERPRINT_BYTES,
    LIVE_KEY,
    NO_LIVE,
    PREVIOUS_KEY,
    PREVIOUS_NAME,
    ROTATED_NAME,
    UNLABELLED,
    fingerprint_fd,
    fingerprint_length,
    fingerprint_matches,
    identity_of,
    layout_of,
    open_log,
    rotated,
    trouble,
)
from rblguard.sources.openfile import (
    OpenFile,
    before_rewrite,
    complete_lines,
    read_again,
    rewritten,
)

log = logging.getLogger("rblguard.sources.follow")


# -- what the daemon gets -----------------------------------------------------------


class Chunk(NamedTuple):
    """Complete lines from one file: ``data`` starts at byte ``start`` and ends in b"\\n".
    A named tuple, as SourcePosition: one is made at every wake-up."""

    file: str
    dev: int
    inode: int
    start: int
    data: bytes
    fingerprint: str

    @property
    def end(self) -> int:
        return self.start + len(self.data)

    def position(self, source: str) -> SourcePosition:
        """Where to resume once every line of this chunk has been acted on."""
        return SourcePosition(source=source, file=self.file, dev=self.dev, inode=self.inode,
                              offset=self.end, fingerprint=self.fingerprint)


@dataclass(slots=True)
class _Seen:
    """One file of a source as a snapshot found it (see Follower._snapshot)."""

    key: str  # its label, or PREVIOUS_KEY / LIVE_KEY
    path: str
    identity: tuple[int, int]
    opened: tuple[int, os.stat_result] | None = None  # already open: the live file, previous
    was_live: bool = False  # the file `current` named when the snapshot began


class Follower:
    """Reads one source's new complete lines, oldest first, each exactly once."""

    def __init__(self, source: str, position: SourcePosition | None = None) -> None:
        self.source = source
        self._layout = layout_of(source)
        self._file: OpenFile | None = None
        # With no file open: the next file is the oldest rotated one newer than this
        # label ("" = all of them), or the live file.
        self._after = ""
        if position is not None:
            self._resume(position)
        elif os.path.exists(source) or (self._layout.directory is not None
                                        and rotated(self._layout.directory)):
            self._advance(None)  # a new source: start at the live file's first byte
        # else: missing now; whatever appears later is new, so _after = "" reads it all

    # -- public ----------------------------------------------------------------------

    @property
    def current_file(self) -> str | None:
        return self._file.path if self._file else None

    def read(self, max_bytes: int = 4 << 20) -> list[Chunk]:
        """New complete lines since the last read, at most about ``max_bytes``.

        A single line longer than ``max_bytes`` still comes whole, in a chunk of its own.
        A plain file's head is looked at after the read (multilog never rewrites a
        file): one truncated and refilled past our offset (copytruncate), before the
        read or while it ran, gives back what the old file held, and is read again
        from its start at once (openfile.before_rewrite).
        """
        if self._file is None:
            self._advance(self._after)
        chunks = self._read_on(max_bytes)
        f = self._file
        if (f is not None and not f.finished and self._layout.directory is None
                and rewritten(f)):
            chunks = before_rewrite(f, chunks)
            read_again(f)
            chunks += self._read_on(max_bytes - sum(len(c.data) for c in chunks))
        return chunks

    def _read_on(self, max_bytes: int) -> list[Chunk]:
        """Complete lines from where we are, across files, at most about ``max_bytes``."""
        chunks: list[Chunk] = []
        budget = max_bytes
        while self._file is not None and budget > 0:
            f = self._file
            data = complete_lines(f, budget, whole_line=not chunks)
            if data is None:
                break  # the next line would overrun the budget: next time
            if data:
                chunks.append(Chunk(f.path, f.dev, f.inode, f.offset, data, f.fingerprint))
                f.offset += len(data)
                budget -= len(data)
                if f.offset < f.size_seen or f.finished:
                    continue  # a partial line or the budget's cut: look again
                # at the size we just saw: the next look would find nothing new
            if not f.finished:
                if not self._replaced(f):
                    break  # at the end of the live file
                f.finished = True  # its last bytes may have come just before the switch
                continue
            if not self._next_after(f):
                break  # multilog is between the two steps of a rotation
        return chunks

    def lag_bytes(self) -> int:
        """Bytes written but not yet read: the rest of this file and every newer one."""
        f = self._file
        if f is None:
            return 0
        lag = max(0, os.fstat(f.fd).st_size - f.offset)
        if not f.finished and not self._replaced(f):
            return lag
        after = f.key if f.key not in UNLABELLED else f.floor
        if self._layout.directory is not None:
            for label, path in rotated(self._layout.directory):
                if label > after and identity_of(path) != (f.dev, f.inode):
                    lag += _size(path)
        if identity_of(self._layout.live) != (f.dev, f.inode):
            lag += _size(self._layout.live)
        return lag

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file.fd)
            self._file = None

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------

    def _replaced(self, f: OpenFile) -> bool:
        """Whether the live path now names another file (rotation or replacement).

        A missing live path is not a switch: multilog creates the new ``current`` right
        after the rename, and until then the old file is the one to read.
        """
        now = identity_of(self._layout.live)
        return now is not None and now != (f.dev, f.inode)

    # -- moving between files --------------------------------------------------------

    def _next_after(self, f: OpenFile) -> bool:
        """``f`` is read to its end: go on with the next newer file, if it can be known.

        multilog rotates in two steps: it renames ``current`` to ``previous``, creates a
        new ``current``, then links ``previous`` to ``@<tai64n>.s`` and unlinks it.  While
        the finished file is still ``previous`` it has no label, and guessing one could
        make a later step take that file for a newer one and read it twice; so wait for
        the link.  ``previous`` is looked at before the labels are listed: multilog links
        before it unlinks, so a file moving between the two names is seen under one.
        """
        after = f.key
        directory = self._layout.directory
        if after in UNLABELLED:
            after = f.floor
            if directory is not None:
                if identity_of(os.path.join(directory, PREVIOUS_NAME)) == (f.dev, f.inode):
                    return False
                for label, path in rotated(directory):
                    identity = identity_of(path)
                    if identity == (f.dev, f.inode):
                        after = label
                        break
                    if identity == f.older:  # it was unlabelled when f was opened
                        after = max(after, label)
                # not found: multilog deleted it (its n), and every older file before it
        self._advance(after)
        return True

    def _snapshot(self) -> list[_Seen]:
        """Every file of the source now, oldest first, each once.

        Opened and listed in the order multilog moves a file (``current``, then
        ``previous``, then its label; it links before it unlinks), so that a file in
        the middle of a rotation is seen under one of its names, never under none.  A
        file found under a label and also open as live or ``previous`` (it moved while
        we looked) is taken under its label, with the descriptor already open.
        """
        layout = self._layout
        live = open_log(layout.live)
        previous_path = (os.path.join(layout.directory, PREVIOUS_NAME)
                         if layout.directory is not None else None)
        previous = open_log(previous_path) if previous_path is not None else None
        files: dict[tuple[int, int], _Seen] = {}
        for label, path in (rotated(layout.directory) if layout.directory else []):
            identity = identity_of(path)
            if identity is not None:
                files.setdefault(identity, _Seen(label, path, identity))
        for key, path, opened in ((PREVIOUS_KEY, previous_path, previous),
                                  (LIVE_KEY, layout.live, live)):
            if opened is None or path is None:
                continue
            identity = (opened[1].st_dev, opened[1].st_ino)
            seen = files.get(identity)
            if seen is None:
                seen = files[identity] = _Seen(key, path, identity, opened)
            elif seen.opened is None:
                seen.opened = opened
            else:  # `current` became `previous` between the two opens: one file
                os.close(opened[0])
            seen.was_live = seen.was_live or key == LIVE_KEY
        return sorted(files.values(), key=lambda s: s.key)

    def _take(self, snapshot: list[_Seen], index: int, offset: int,
              stored_fingerprint: str | None) -> bool:
        """Open ``snapshot[index]`` as the file being read and close every other
        descriptor the snapshot holds; False (closing only its own) if it vanished or,
        given ``stored_fingerprint``, holds other content."""
        seen = snapshot[index]
        opened = seen.opened or open_log(seen.path)
        seen.opened = None
        if opened is None:
            return False
        fd, st = opened
        if stored_fingerprint is not None and not fingerprint_matches(fd, stored_fingerprint):
            os.close(fd)
            return False
        _close_all(snapshot)
        older = snapshot[:index]
        floor = max((s.key for s in older if s.key not in UNLABELLED), default="")
        unlabelled = next((s.identity for s in older if s.key == PREVIOUS_KEY), None)
        if st.st_size < offset:
            log.warning("%s is shorter than the saved position %d: reading it from its "
                        "start", seen.path, offset)
            offset = 0
        self._file = OpenFile(fd, seen.path, st.st_dev, st.st_ino, offset,
                           stored_fingerprint or fingerprint_fd(fd), key=seen.key,
                           floor=floor, older=unlabelled, finished=seen.key != LIVE_KEY)
        return True

    def _advance(self, after: str | None) -> None:
        """Open the oldest file newer than ``after``, else remember ``after`` for later.

        ``after=None`` (a new source) opens the live file, skipping the older ones.
        """
        self.close()
        self._layout = layout_of(self.source)
        snapshot = self._snapshot()
        if after is None:
            live = next((i for i, s in enumerate(snapshot) if s.was_live), None)
            if live is None:  # no live file: all there is now is old
                after = snapshot[-1].key if snapshot else ""
            else:
                after = snapshot[live - 1].key if live > 0 else ""
        for index, seen in enumerate(snapshot):
            if seen.key <= after:
                continue
            if self._take(snapshot, index, 0, None):
                return
            log.warning("%s was deleted before it could be read: its lines are lost "
                        "(raise multilog's n, or keep rblguard running)", seen.path)
            after = seen.key
        _close_all(snapshot)
        if not snapshot and self._layout.directory is not None:
            trouble(self.source, NO_LIVE)
        self._after = after

    def _resume(self, pos: SourcePosition) -> None:
        """Continue where a previous run stopped (see docs/following.md for each case)."""
        snapshot = self._snapshot()
        by_identity = [i for i, s in enumerate(snapshot) if s.identity == (pos.dev, pos.inode)]
        by_content = [] if fingerprint_length(pos.fingerprint) < FINGERPRINT_BYTES else [
            i for i in range(len(snapshot)) if i not in by_identity]
        for index in by_identity + by_content:
            if self._take(snapshot, index, pos.offset, pos.fingerprint):
                return
        _close_all(snapshot)
        # The file we were reading is gone.  A rotated name tells where it stood; for a
        # vanished `current`, multilog deletes oldest first, so every file left is newer.
        m = ROTATED_NAME.match(os.path.basename(pos.file))
        after = m.group(1).lower() if m else ""
        if pos.offset > 0:
            log.warning("%s (dev %d inode %d) is gone or was replaced: going on with the "
                        "files newer than it; lines after byte %d of it may have been lost",
                        pos.file, pos.dev, pos.inode, pos.offset)
        self._advance(after)


def _close_all(snapshot: list[_Seen]) -> None:
    for seen in snapshot:
        if seen.opened is not None:
            os.close(seen.opened[0])
            seen.opened = None


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
