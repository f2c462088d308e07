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

This module is imported by ``rblguard scan`` for ``list_files``: it must stay light, so
watchdog is imported only inside SourceWatcher.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import select
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rblguard.model import MAX_LINE_BYTES, SourcePosition

log = logging.getLogger("rblguard.sources.follow")

LIVE_NAME = "current"
PREVIOUS_NAME = "previous"  # multilog's name for a full `current` before it gets a label
FINGERPRINT_BYTES = 1024
LIVE_KEY = "~"  # sorts after every lowercase hex TAI64N label: the live file is newest
PREVIOUS_KEY = "}"  # between the labels and LIVE_KEY: `previous`, not yet labelled
UNLABELLED = (LIVE_KEY, PREVIOUS_KEY)  # keys of files with no TAI64N label (yet)
_ROTATED_NAME = re.compile(r"@([0-9a-fA-F]{24})\.[su]\Z")
_LONG_LINE_STEP = 1 << 20


# -- which files make up a source ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Layout:
    live: str  # the file being written: the plain file, or the multilog ``current``
    directory: str | None  # the multilog directory; None for a plain file


def _layout(source: str) -> _Layout:
    if os.path.isdir(source):
        return _Layout(os.path.join(source, LIVE_NAME), source)
    parent = os.path.dirname(source) or "."
    if os.path.basename(source) == LIVE_NAME or _rotated(parent):
        return _Layout(source, parent)
    return _Layout(source, None)


def _rotated(directory: str) -> list[tuple[str, str]]:
    """(label, path) of multilog's finished files, oldest first.

    TAI64N labels are fixed-width hex, so once lower-cased they sort as times do.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    found = []
    for name in names:
        m = _ROTATED_NAME.match(name)
        if m:
            found.append((m.group(1).lower(), os.path.join(directory, name)))
    found.sort()
    return found


def list_files(source: str | os.PathLike[str]) -> list[Path]:
    """Every file of a source in the order its lines were written.

    A multilog directory gives its rotated ``@*.s``/``@*.u`` files oldest first, then
    ``current`` if it exists; a plain file gives itself (missing or not, so the caller
    reports the error).
    """
    layout = _layout(os.fspath(source))
    if layout.directory is None:
        return [Path(layout.live)]
    files = [Path(path) for _label, path in _rotated(layout.directory)]
    if os.path.isfile(layout.live):
        files.append(Path(layout.live))
    return files


# -- fingerprints -------------------------------------------------------------------


def fingerprint(head: bytes) -> str:
    """Digest of a file's first bytes, with their count: ``"<n>:<sha256 hex>"``.

    The count matters because a file shorter than FINGERPRINT_BYTES is still growing:
    a later comparison digests the same number of bytes, so growth is not a mismatch.
    """
    head = head[:FINGERPRINT_BYTES]
    return f"{len(head)}:{hashlib.sha256(head).hexdigest()}"


def _fingerprint_fd(fd: int, length: int = FINGERPRINT_BYTES) -> str:
    return fingerprint(os.pread(fd, min(length, FINGERPRINT_BYTES), 0))


def _fingerprint_length(stored: str) -> int:
    try:
        return int(stored.split(":", 1)[0])
    except ValueError:
        return -1


def _fingerprint_matches(fd: int, stored: str) -> bool:
    length = _fingerprint_length(stored)
    return length >= 0 and _fingerprint_fd(fd, length) == stored


# -- what the daemon gets -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    """Complete lines from one file: ``data`` starts at byte ``start`` and ends in b"\\n"."""

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
class _Open:
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


@dataclass(slots=True)
class _Seen:
    """One file of a source as a snapshot found it (see Follower._snapshot)."""

    key: str  # its label, or PREVIOUS_KEY / LIVE_KEY
    path: str
    identity: tuple[int, int]
    opened: tuple[int, os.stat_result] | None = None  # already open: the live file, previous
    was_live: bool = False  # the file `current` named when the snapshot began


# What is wrong with a path, said once until it changes: a log path that became a FIFO
# or a directory is looked at on every wake-up.  Bounded: one entry per path followed.
_TROUBLE: dict[str, str] = {}
_NO_LIVE = f"a directory with no multilog {LIVE_NAME!r} in it"
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: _NO_LIVE}


def _trouble(path: str, what: str | None) -> None:
    """Log ``what`` is wrong with ``path`` once; None: it is fine (again)."""
    if what is None:
        _TROUBLE.pop(path, None)
    elif _TROUBLE.get(path) != what:
        _TROUBLE[path] = what
        log.warning("%s is %s: waiting for a log file there", path, what)


def _dangling(path: str) -> None:
    """Say so if ``path``, found missing, is a symlink to nothing (not just missing)."""
    with contextlib.suppress(OSError):
        _trouble(path, f"a dangling symlink (to {os.readlink(path)})")


def _open(path: str) -> tuple[int, os.stat_result] | None:
    """The regular file at ``path``, opened; None if there is none.

    O_NONBLOCK: a FIFO put where a log was must not block the daemon in open() (it
    would wait for a writer); O_NOCTTY: a terminal device must not become ours.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        _dangling(path)
        return None
    except IsADirectoryError:  # a plain file's path that became one: read as multilog's
        _trouble(path, _NO_LIVE)
        return None
    except NotADirectoryError:
        return None
    except PermissionError:
        _trouble(path, "unreadable (permission denied)")
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        _trouble(path, _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file"))
        return None
    _trouble(path, None)
    return fd, st


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        _dangling(path)
        return None
    except NotADirectoryError:
        return None
    return st.st_dev, st.st_ino


class Follower:
    """Reads one source's new complete lines, oldest first, each exactly once."""

    def __init__(self, source: str, position: SourcePosition | None = None) -> None:
        self.source = source
        self._layout = _layout(source)
        self._file: _Open | None = None
        # With no file open: the next file is the oldest rotated one newer than this
        # label ("" = all of them), or the live file.
        self._after = ""
        if position is not None:
            self._resume(position)
        elif os.path.exists(source) or (self._layout.directory is not None
                                        and _rotated(self._layout.directory)):
            self._advance(None)  # a new source: start at the live file's first byte
        # else: missing now; whatever appears later is new, so _after = "" reads it all

    # -- public ----------------------------------------------------------------------

    @property
    def current_file(self) -> str | None:
        return self._file.path if self._file else None

    def read(self, max_bytes: int = 4 << 20) -> list[Chunk]:
        """New complete lines since the last read, at most about ``max_bytes``.

        A single line longer than ``max_bytes`` still comes whole, in a chunk of its own.
        """
        chunks: list[Chunk] = []
        budget = max_bytes
        if self._file is None:
            self._advance(self._after)
        elif not self._file.finished:
            self._check_rewritten(self._file)
        while self._file is not None and budget > 0:
            f = self._file
            data = self._complete_lines(f, budget, whole_line=not chunks)
            if data is None:
                break  # the next line would overrun the budget: next time
            if data:
                chunks.append(Chunk(f.path, f.dev, f.inode, f.offset, data, f.fingerprint))
                f.offset += len(data)
                budget -= len(data)
                continue
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
            for label, path in _rotated(self._layout.directory):
                if label > after and _identity(path) != (f.dev, f.inode):
                    lag += _size(path)
        if _identity(self._layout.live) != (f.dev, f.inode):
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

    def _complete_lines(self, f: _Open, budget: int, whole_line: bool) -> bytes | None:
        """Complete lines from ``f`` within ``budget``; b"" if none is complete yet.

        A line longer than the budget comes whole when ``whole_line`` (nothing else was
        read in this call), else None says: stop here, it comes first next time.
        """
        size = _size_now(f)
        while not f.skipping or _skip_line(f, size):
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
                line = _long_line(f, data, size)
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

    def _check_rewritten(self, f: _Open) -> None:
        """A plain file truncated and refilled past our offset: its head changed."""
        if self._layout.directory is not None:
            return  # multilog never rewrites a file
        if _fingerprint_matches(f.fd, f.fingerprint):
            return
        if os.fstat(f.fd).st_size < _fingerprint_length(f.fingerprint):
            return  # shrunk: _complete_lines reports the truncation
        log.warning("%s was rewritten in place: reading it again from its start", f.path)
        f.offset = 0
        f.fingerprint = _fingerprint_fd(f.fd)

    def _replaced(self, f: _Open) -> bool:
        """Whether the live path now names another file (rotation or replacement).

        A missing live path is not a switch: multilog creates the new ``current`` right
        after the rename, and until then the old file is the one to read.
        """
        now = _identity(self._layout.live)
        return now is not None and now != (f.dev, f.inode)

    # -- moving between files --------------------------------------------------------

    def _next_after(self, f: _Open) -> bool:
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
                if _identity(os.path.join(directory, PREVIOUS_NAME)) == (f.dev, f.inode):
                    return False
                for label, path in _rotated(directory):
                    identity = _identity(path)
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
        live = _open(layout.live)
        previous_path = (os.path.join(layout.directory, PREVIOUS_NAME)
                         if layout.directory is not None else None)
        previous = _open(previous_path) if previous_path is not None else None
        files: dict[tuple[int, int], _Seen] = {}
        for label, path in (_rotated(layout.directory) if layout.directory else []):
            identity = _identity(path)
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
        opened = seen.opened or _open(seen.path)
        seen.opened = None
        if opened is None:
            return False
        fd, st = opened
        if stored_fingerprint is not None and not _fingerprint_matches(fd, stored_fingerprint):
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
        self._file = _Open(fd, seen.path, st.st_dev, st.st_ino, offset,
                           stored_fingerprint or _fingerprint_fd(fd), key=seen.key,
                           floor=floor, older=unlabelled, finished=seen.key != LIVE_KEY)
        return True

    def _advance(self, after: str | None) -> None:
        """Open the oldest file newer than ``after``, else remember ``after`` for later.

        ``after=None`` (a new source) opens the live file, skipping the older ones.
        """
        self.close()
        self._layout = _layout(self.source)
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
            _trouble(self.source, _NO_LIVE)
        self._after = after

    def _resume(self, pos: SourcePosition) -> None:
        """Continue where a previous run stopped (see docs/following.md for each case)."""
        snapshot = self._snapshot()
        by_identity = [i for i, s in enumerate(snapshot) if s.identity == (pos.dev, pos.inode)]
        by_content = [] if _fingerprint_length(pos.fingerprint) < FINGERPRINT_BYTES else [
            i for i in range(len(snapshot)) if i not in by_identity]
        for index in by_identity + by_content:
            if self._take(snapshot, index, pos.offset, pos.fingerprint):
                return
        _close_all(snapshot)
        # The file we were reading is gone.  A rotated name tells where it stood; for a
        # vanished `current`, multilog deletes oldest first, so every file left is newer.
        m = _ROTATED_NAME.match(os.path.basename(pos.file))
        after = m.group(1).lower() if m else ""
        if pos.offset > 0:
            log.warning("%s (dev %d inode %d) is gone or was replaced: going on with the "
                        "files newer than it; lines after byte %d of it may have been lost",
                        pos.file, pos.dev, pos.inode, pos.offset)
        self._advance(after)


def _size_now(f: _Open) -> int:
    """The file's size, after noticing a truncation in place or a young head's growth."""
    size = os.fstat(f.fd).st_size
    if size < f.offset and not f.finished:
        log.warning("%s was truncated in place (copy-and-truncate rotation?): reading "
                    "it again from its start; lines written just before the "
                    "truncation may be lost", f.path)
        f.offset = 0
        f.skipping = False
        f.fingerprint = _fingerprint_fd(f.fd)
    if _fingerprint_length(f.fingerprint) < min(size, FINGERPRINT_BYTES):
        f.fingerprint = _fingerprint_fd(f.fd)  # a young file's head grew
    return size


def _long_line(f: _Open, head: bytes, size: int) -> bytes | None:
    """A line longer than the read budget, read on to its newline.

    b"" while its newline is not written yet; None once it is past MAX_LINE_BYTES.
    """
    parts = [head]
    got = len(head)
    while f.offset + got < size and got <= MAX_LINE_BYTES:
        piece = os.pread(f.fd, min(_LONG_LINE_STEP, size - f.offset - got), f.offset + got)
        if not piece:
            break
        cut = piece.find(b"\n")
        if cut >= 0:
            parts.append(piece[: cut + 1])
            return b"".join(parts)
        parts.append(piece)
        got += len(piece)
    return None if got > MAX_LINE_BYTES else b""


def _skip_line(f: _Open, size: int) -> bool:
    """Drop the rest of an overlong line; False while its newline is not written yet.

    The offset moves on without a chunk, so a saved position stays before the line and
    a restart skips it again.
    """
    while f.offset < size:
        piece = os.pread(f.fd, min(_LONG_LINE_STEP, size - f.offset), f.offset)
        if not piece:
            break
        cut = piece.find(b"\n")
        if cut >= 0:
            f.offset += cut + 1
            f.skipping = False
            return True
        f.offset += len(piece)
    return False


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


# -- noticing changes ----------------------------------------------------------------

_IN_MODIFY, _IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x40, 0x80, 0x100
_IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x200, 0x400, 0x800
_IN_Q_OVERFLOW, _IN_IGNORED, _IN_ONLYDIR, _IN_ISDIR = 0x4000, 0x8000, 0x01000000, 0x40000000
_WATCH_MASK = (_IN_MODIFY | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
               | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR)
_RESHAPE = _IN_ISDIR | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED | _IN_Q_OVERFLOW
_EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len


def _parse_events(buf: bytes) -> list[tuple[int, int, str]]:
    events = []
    pos = 0
    while pos + _EVENT_HEADER.size <= len(buf):
        wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(buf, pos)
        pos += _EVENT_HEADER.size
        name = buf[pos:pos + length].rstrip(b"\0").decode("utf-8", "surrogateescape")
        pos += length
        events.append((wd, mask, name))
    return events


def _interest(source: str) -> list[tuple[str, str | None, bool]]:
    """(directory, entry name or None for any, whether ``@*`` names count) for a source.

    A directory not there yet is replaced by its nearest existing ancestor, watched for
    the next path component, so the source is noticed the moment it appears.
    """
    found: list[tuple[str, str | None, bool]] = []
    if os.path.isdir(source):
        found.append((source, None, False))
    parent, name = os.path.dirname(source), os.path.basename(source)
    rotated_too = True
    while not os.path.isdir(parent) and os.path.dirname(parent) != parent:
        parent, name, rotated_too = os.path.dirname(parent), os.path.basename(parent), False
    found.append((parent, name, rotated_too))
    return found


class SourceWatcher:
    """Calls ``on_change(source)`` within milliseconds of a change to a source's files.

    Directories are watched, not files, so renames, creations and deletions are seen.
    watchdog's Observer is not used on Linux: its inotify buffer (watchdog 2.2.1, as in
    Debian 12) holds an IN_MOVED_FROM whose IN_MOVED_TO did not come in the same read
    for 0.5 s, and every event behind it waits too.  A multilog rename usually comes
    whole, but not always (28 of 19,300 measured waited 500 ms), and a file moved out
    of the directory (logrotate's olddir) always waits; watchdog 7.1 holds them too
    and adds a 1 ms coalescing window.  benchmarks/watch_latency.py measures both, and
    docs/following.md has the figures.  Instead one thread reads inotify through
    watchdog's ctypes bindings (the same in watchdog 2.x and 7.x) and calls back once
    per source per batch of events.  ``on_change`` runs
    in that thread and must only hand work over.
    """

    def __init__(self, paths: list[str], on_change: Callable[[str], None]) -> None:
        self.sources = {os.path.abspath(p): p for p in paths}
        self._on_change = on_change
        self._fd = -1
        self._wakeup: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._observer = None  # watchdog's Observer where inotify is unavailable
        self._wd_dir: dict[int, str] = {}
        self._dir_wd: dict[str, int] = {}
        self._by_dir: dict[str, list[tuple[str, str | None, bool]]] = {}

    def start(self) -> None:
        try:
            from watchdog.observers import inotify_c
        except Exception:  # not Linux, or a libc without inotify
            self._start_observer()
            return
        self._add_watch, self._rm_watch = inotify_c.inotify_add_watch, inotify_c.inotify_rm_watch
        self._fd = inotify_c.inotify_init()
        if self._fd < 0:
            raise OSError("inotify_init failed")
        os.set_inheritable(self._fd, False)
        os.set_blocking(self._fd, False)
        self._wakeup = os.pipe()
        self._reshape()
        self._thread = threading.Thread(target=self._run, name="rblguard-inotify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        if self._thread is not None and self._wakeup is not None:
            os.write(self._wakeup[1], b"x")
            self._thread.join()
            self._thread = None
        for fd in (self._fd, *(self._wakeup or ())):
            if fd >= 0:
                os.close(fd)
        self._fd, self._wakeup = -1, None

    def _reshape(self) -> set[str]:
        """Watch exactly the directories the sources need now; the sources that moved."""
        by_dir: dict[str, list[tuple[str, str | None, bool]]] = {}
        for source in self.sources:
            for directory, name, rotated_too in _interest(source):
                by_dir.setdefault(directory, []).append((source, name, rotated_too))
        changed = {s for d in set(by_dir) ^ set(self._by_dir)
                   for s, _n, _r in by_dir.get(d, []) + self._by_dir.get(d, [])}
        for directory in set(self._dir_wd) - set(by_dir):
            self._rm_watch(self._fd, self._dir_wd.pop(directory))
        for directory in set(by_dir) - set(self._dir_wd):
            wd = self._add_watch(self._fd, os.fsencode(directory), _WATCH_MASK)
            if wd >= 0:
                self._dir_wd[directory] = wd
                self._wd_dir[wd] = directory
        self._by_dir = by_dir
        return changed

    def _run(self) -> None:
        assert self._wakeup is not None
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wakeup[0], select.POLLIN)
        while True:
            if any(fd == self._wakeup[0] for fd, _ in poller.poll()):
                return
            try:
                buf = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            touched: set[str] = set()
            reshape = False
            for wd, mask, name in _parse_events(buf):
                if mask & _RESHAPE:
                    reshape = True
                if mask & _IN_Q_OVERFLOW:
                    touched.update(self.sources)
                if mask & _IN_IGNORED:
                    directory = self._wd_dir.pop(wd, None)
                    if directory is not None and self._dir_wd.get(directory) == wd:
                        del self._dir_wd[directory]
                for source, wanted, rotated_too in self._by_dir.get(self._wd_dir.get(wd, ""), ()):
                    if wanted is None or name == wanted or (rotated_too and name[:1] == "@"):
                        touched.add(source)
            if reshape:
                touched |= self._reshape()
            for source in touched:
                self._notify(source)

    def _notify(self, source: str) -> None:
        try:
            self._on_change(self.sources[source])
        except Exception:
            log.exception("source change callback failed for %s", source)

    def _start_observer(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: object) -> None:
                for path in (getattr(event, "src_path", ""), getattr(event, "dest_path", "")):
                    path = os.fsdecode(path or "")
                    for source in watcher.sources:
                        parent = os.path.dirname(source)
                        if path == source or os.path.dirname(path) in (source, parent):
                            watcher._notify(source)

        self._observer = Observer()
        for directory in {d for s in self.sources for d, _n, _r in _interest(s)}:
            self._observer.schedule(Handler(), directory, recursive=False)
        self._observer.start()
