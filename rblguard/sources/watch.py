"""Noticing, within milliseconds, that a log source changed: inotify on its directories.

The follower (rblguard.sources.follow) reads; this module only says *when* to read.
Directories are watched rather than files, so that renames (multilog's rotation),
creations (a new ``current``) and deletions are seen, and a source whose directory does
not exist yet is noticed the moment it appears.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import struct
import threading
from collections.abc import Callable

log = logging.getLogger("rblguard.sources.watch")


class _Inotify:
    """The kernel's inotify, through the three libc calls it takes.

    Not a library: Debian 12 packages none with a public API that keeps a rotation's
    events prompt (see SourceWatcher), and these calls are the kernel's stable ABI.
    OSError when inotify is not there.
    """

    _IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC

    def __init__(self) -> None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            self._init1 = libc.inotify_init1
            self._add = libc.inotify_add_watch
            self._rm = libc.inotify_rm_watch
        except (OSError, AttributeError) as exc:
            raise OSError(f"inotify is not available: {exc}") from None
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        self.fd = self._init1(self._IN_NONBLOCK | self._IN_CLOEXEC)
        if self.fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"inotify_init1: {os.strerror(errno)}")

    def add(self, directory: str, mask: int) -> int:
        """The watch descriptor, or -1 (the directory vanished meanwhile: no error)."""
        return int(self._add(self.fd, os.fsencode(directory), mask))

    def remove(self, wd: int) -> None:
        self._rm(self.fd, wd)


_IN_MODIFY, _IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x40, 0x80, 0x100
_IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x200, 0x400, 0x800
_IN_Q_OVERFLOW, _IN_IGNORED, _IN_ONLYDIR, _IN_ISDIR = 0x4000, 0x8000, 0x01000000, 0x40000000
# A directory whose entries come and go (the parent of a source directory, an ancestor
# waited on) is watched for that only: its other files' writes (qmail-send's log in
# /var/log/qmail, beside smtpd/) would each wake the daemon for nothing.
_STRUCTURE_MASK = (_IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
                   | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR)
_WATCH_MASK = _STRUCTURE_MASK | _IN_MODIFY  # a directory whose files are the source's
_RESHAPE = _IN_ISDIR | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED | _IN_Q_OVERFLOW
_RESHAPE_ROUNDS = 8  # looks at the paths after a change of watches (see _reshape)
_EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len
_REMEMBERED_READ = 4 * _EVENT_HEADER.size + 256  # a read of a few events (see _plain)


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


def _writes_matter(directory: str, name: str | None, rotated_too: bool) -> bool:
    """Whether writes in ``directory`` concern the interest: all of them for a source
    directory (``name`` None), those to the source file itself for its parent; none
    for the parent of a source directory or an ancestor waited on (``rotated_too``
    False: the path below it does not exist yet)."""
    return name is None or (rotated_too and not os.path.isdir(os.path.join(directory, name)))


class SourceWatcher:
    """Calls ``on_change(source)`` within milliseconds of a change to a source's files.

    Directories are watched, not files, so renames, creations and deletions are seen.
    watchdog's Observer is not used on Linux: its inotify buffer (watchdog 2.2.1, as in
    Debian 12) holds an IN_MOVED_FROM whose IN_MOVED_TO did not come in the same read
    for 0.5 s, and every event behind it waits too.  A multilog rename usually comes
    whole, but not always (28 of 19,300 measured waited 500 ms), and a file moved out
    of the directory (logrotate's olddir) always waits; watchdog 7.1 holds them too
    and adds a 1 ms coalescing window.  benchmarks/watch_latency.py measures both, and
    docs/following.md has the figures.  Instead one thread reads inotify itself (three
    libc calls, see _Inotify) and calls back once per source per batch of events; the
    Observer, through watchdog's public API, is only the fallback where inotify is not
    there.  ``on_change`` runs in that thread and must only hand work over.
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
        self._dir_mask: dict[str, int] = {}
        self._by_dir: dict[str, list[tuple[str, str | None, bool]]] = {}
        # What a short read without watch changes said, by its bytes: it depends on
        # nothing else until the watches change (then it is forgotten), and a busy
        # log's writes give the same one again and again (IN_MODIFY of `current`),
        # which each wake-up of the daemon would otherwise parse and match anew.
        self._plain: dict[bytes, frozenset[str]] = {}

    def start(self, own_thread: bool = True) -> None:
        """Watch from now on.  With ``own_thread`` False, no thread reads inotify: the
        caller polls fileno() and calls changed() when it is readable (the daemon's
        loop does, so that a change costs no hand-over between threads); fileno() is
        -1 where the fallback Observer calls ``on_change`` from its thread instead."""
        try:
            self._inotify = _Inotify()
        except OSError:  # not Linux, or a libc without inotify
            self._start_observer()
            return
        self._fd = self._inotify.fd
        self._reshape()
        if own_thread:
            self._wakeup = os.pipe()
            self._thread = threading.Thread(target=self._run, name="rblguard-inotify",
                                            daemon=True)
            self._thread.start()

    def fileno(self) -> int:
        """The inotify descriptor to poll, or -1 when there is none (see start())."""
        return self._fd

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
        """Watch exactly the directories the sources need now; the sources that moved.

        A directory made between looking at the paths and adding its parent's watch
        (``mkdir -p`` makes a whole path at once) gives that watch no event, so the
        paths are looked at again after each change of watches until they hold still.
        """
        changed: set[str] = set()
        wanted = self._wanted()
        for _ in range(_RESHAPE_ROUNDS):  # bounded: a path that never holds still
            changed |= self._watch(wanted)  # is picked up again by its next event
            wanted = self._wanted()
            if wanted == self._by_dir:
                break
        return changed

    def _wanted(self) -> dict[str, list[tuple[str, str | None, bool]]]:
        """Each directory to watch, with the interests of the sources in it."""
        by_dir: dict[str, list[tuple[str, str | None, bool]]] = {}
        for source in self.sources:
            for directory, name, rotated_too in _interest(source):
                by_dir.setdefault(directory, []).append((source, name, rotated_too))
        return by_dir

    def _watch(self, by_dir: dict[str, list[tuple[str, str | None, bool]]]) -> set[str]:
        """Set the watches to ``by_dir``; the sources whose directories changed."""
        changed = {s for d in set(by_dir) ^ set(self._by_dir)
                   for s, _n, _r in by_dir.get(d, []) + self._by_dir.get(d, [])}
        for directory in set(self._dir_wd) - set(by_dir):
            self._inotify.remove(self._dir_wd.pop(directory))
            self._dir_mask.pop(directory, None)
        for directory, interests in by_dir.items():
            mask = _WATCH_MASK if any(_writes_matter(directory, name, rotated_too)
                                      for _s, name, rotated_too in interests) else _STRUCTURE_MASK
            if directory in self._dir_wd and self._dir_mask.get(directory) == mask:
                continue
            wd = self._inotify.add(directory, mask)  # a new mask replaces the old one
            if wd >= 0:
                self._dir_wd[directory] = wd
                self._wd_dir[wd] = directory
                self._dir_mask[directory] = mask
        self._by_dir = by_dir
        self._plain.clear()
        return changed

    def _run(self) -> None:
        assert self._wakeup is not None
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wakeup[0], select.POLLIN)
        while True:
            if any(fd == self._wakeup[0] for fd, _ in poller.poll()):
                return
            for source in self.changed():
                self._notify(source)

    def changed(self) -> set[str]:
        """The sources touched by the events inotify holds now (none: an empty set;
        it never blocks)."""
        if self._fd < 0:
            return set()
        try:
            buf = os.read(self._fd, 1 << 16)
        except BlockingIOError:
            return set()
        known = self._plain.get(buf)
        if known is not None:  # the same events as before: a write to a source
            return set(known)
        touched: set[str] = set()
        reshape = False
        for wd, mask, name in _parse_events(buf):
            if mask & _RESHAPE:
                reshape = True
            if mask & _IN_Q_OVERFLOW:
                touched.update(self.sources)
            if mask & _IN_IGNORED:
                self._drop_watch(wd)
            for source, wanted, rotated_too in self._by_dir.get(self._wd_dir.get(wd, ""), ()):
                if wanted is None or name == wanted or (rotated_too and name[:1] == "@"):
                    touched.add(source)
            if mask & _IN_MOVE_SELF:  # the watch went with the directory: its path names
                self._drop_watch(wd)  # another (or none), which _reshape watches afresh
                self._inotify.remove(wd)
        if reshape:
            touched |= self._reshape()
        changed = set(map(self.sources.__getitem__, touched))  # in C, no comprehension
        if not reshape and len(buf) <= _REMEMBERED_READ:  # then it depends on buf alone
            if len(self._plain) >= 64:  # rotations' moves each differ (their cookie)
                self._plain.clear()
            self._plain[buf] = frozenset(changed)
        return changed

    def _drop_watch(self, wd: int) -> None:
        """Forget watch ``wd`` (the kernel dropped it, or its directory moved away)."""
        directory = self._wd_dir.pop(wd, None)
        if directory is not None and self._dir_wd.get(directory) == wd:
            del self._dir_wd[directory]
            self._dir_mask.pop(directory, None)

    def _notify(self, source: str) -> None:
        try:
            self._on_change(source)
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
                            watcher._notify(watcher.sources[source])

        self._observer = Observer()
        for directory in {d for s in self.sources for d, _n, _r in _interest(s)}:
            self._observer.schedule(Handler(), directory, recursive=False)
        self._observer.start()
