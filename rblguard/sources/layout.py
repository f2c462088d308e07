"""Which files make up a log source on disk, and opening them safely.

A source is a plain file, a multilog directory, or a multilog ``current`` file.  This
module knows multilog's names (``current``, ``previous``, ``@<tai64n>.s``), tells files
apart by a fingerprint of their first bytes, and opens a path without ever blocking
(a FIFO put where a log was) or taking what is not a regular file; what is wrong with a
path is said once.  rblguard.sources.follow reads the files it names.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path
from typing import NamedTuple

from rblguard.logs import warn

LIVE_NAME = "current"
PREVIOUS_NAME = "previous"  # multilog's name for a full `current` before it gets a label
FINGERPRINT_BYTES = 1024
LIVE_KEY = "~"  # sorts after every lowercase hex TAI64N label: the live file is newest
PREVIOUS_KEY = "}"  # between the labels and LIVE_KEY: `previous`, not yet labelled
UNLABELLED = (LIVE_KEY, PREVIOUS_KEY)  # keys of files with no TAI64N label (yet)
ROTATED_NAME = re.compile(r"@([0-9a-fA-F]{24})\.[su]\Z")


# -- which files make up a source ---------------------------------------------------


class Layout(NamedTuple):
    live: str  # the file being written: the plain file, or the multilog ``current``
    directory: str | None  # the multilog directory; None for a plain file


def layout_of(source: str) -> Layout:
    if os.path.isdir(source):
        return Layout(os.path.join(source, LIVE_NAME), source)
    parent = os.path.dirname(source) or "."
    if os.path.basename(source) == LIVE_NAME or rotated(parent):
        return Layout(source, parent)
    return Layout(source, None)


def rotated(directory: str) -> list[tuple[str, str]]:
    """(label, path) of multilog's finished files, oldest first.

    TAI64N labels are fixed-width hex, so once lower-cased they sort as times do.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    found = []
    for name in names:
        m = ROTATED_NAME.match(name)
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
    layout = layout_of(os.fspath(source))
    if layout.directory is None:
        return [Path(layout.live)]
    files = [Path(path) for _label, path in rotated(layout.directory)]
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
    import hashlib  # here: `scan` and the other commands never need it

    return f"{len(head)}:{hashlib.sha256(head).hexdigest()}"


def fingerprint_fd(fd: int, length: int = FINGERPRINT_BYTES) -> str:
    return fingerprint(os.pread(fd, min(length, FINGERPRINT_BYTES), 0))


def fingerprint_length(stored: str) -> int:
    try:
        return int(stored.split(":", 1)[0])
    except ValueError:
        return -1


def fingerprint_matches(fd: int, stored: str) -> bool:
    length = fingerprint_length(stored)
    return length >= 0 and fingerprint_fd(fd, length) == stored


# What is wrong with a path, said once until it changes: a log path that became a FIFO
# or a directory is looked at on every wake-up.  Bounded: one entry per path followed.
_TROUBLE: dict[str, str] = {}
NO_LIVE = f"a directory with no multilog {LIVE_NAME!r} in it"
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: NO_LIVE}


def trouble(path: str, what: str | None) -> None:
    """Log ``what`` is wrong with ``path`` once; None: it is fine (again)."""
    if what is None:
        _TROUBLE.pop(path, None)
    elif _TROUBLE.get(path) != what:
        _TROUBLE[path] = what
        warn(__name__, "%s is %s: waiting for a log file there", path, what)


def dangling(path: str) -> None:
    """Say so if ``path``, found missing, is a symlink to nothing (not just missing)."""
    with contextlib.suppress(OSError):
        trouble(path, f"a dangling symlink (to {os.readlink(path)})")


def open_log(path: str) -> tuple[int, os.stat_result] | None:
    """The regular file at ``path``, opened; None if there is none.

    O_NONBLOCK: a FIFO put where a log was must not block the daemon in open() (it
    would wait for a writer); O_NOCTTY: a terminal device must not become ours.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        dangling(path)
        return None
    except IsADirectoryError:  # a plain file's path that became one: read as multilog's
        trouble(path, NO_LIVE)
        return None
    except NotADirectoryError:
        return None
    except PermissionError:
        trouble(path, "unreadable (permission denied)")
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        trouble(path, _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file"))
        return None
    trouble(path, None)
    return fd, st


def identity_of(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        dangling(path)
        return None
    except NotADirectoryError:
        return None
    return st.st_dev, st.st_ino
