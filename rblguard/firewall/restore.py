"""Feeding a restore tool (``ipset -exist restore``) its lines while they are still made.

A batch's lines cost Python a few microseconds each to format, and the tool a few more
to parse.  Made first and written after (``subprocess.run(input=...)``), the two costs
add up: a tenth of a 10,000-ban batch's time was spent before the tool read a byte.
Started first and fed in slices as they are formatted, the tool parses one slice while
the next is made, on the other core, so a batch takes little more than the tool's own
time.  Writes are non-blocking with one deadline for the whole run, so a tool that
stops reading cannot hold the caller forever.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

SLICE_LINES = 1_000  # lines formatted and written at a time
TIMEOUT = 120.0  # s for a whole run of a tool (ipset._sh gives every other call the same)


class ToolError(Exception):
    """The tool could not be run or did not finish in time; the message says which."""


@dataclass
class Fed:
    """What a run did: every line made (all of them, also those the tool never read),
    its exit status and what it wrote on standard error."""

    lines: list[str]
    returncode: int
    stderr: str


def feed(command: Sequence[str], lines: Iterable[str], timeout: float = TIMEOUT) -> Fed:
    """Run ``command`` with ``lines`` (newline-terminated by this function) on its
    standard input, formatting them slice by slice while it reads."""
    deadline = time.monotonic() + timeout
    try:
        proc = subprocess.Popen(list(command), stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as exc:
        raise ToolError(f"{command[0]}: {exc}") from exc
    made: list[str] = []
    said = bytearray()  # what it wrote on standard error while it read
    try:
        _write_all(proc, _slices(iter(lines), made), deadline, said)
        # (a tool that stopped early still leaves every line made: the caller resumes)
        _, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.wait()
        raise ToolError(f"{command[0]}: no answer within {timeout:.0f} s") from exc
    return Fed(made, proc.returncode, (bytes(said) + err).decode("utf-8", "replace"))


def _slices(lines: Iterator[str], made: list[str]) -> Iterator[bytes]:
    """The lines as encoded slices; each one's lines are kept in ``made`` first."""
    while True:
        part = list(islice(lines, SLICE_LINES))
        if not part:
            return
        made.extend(part)
        yield ("\n".join(part) + "\n").encode()


def _write_all(proc: subprocess.Popen[bytes], slices: Iterator[bytes],
               deadline: float, said: bytearray) -> None:
    """Write every slice; once the tool stops reading (a line it refused ends a
    restore), the remaining slices are only made, not written.  Its standard error is
    read meanwhile, into ``said``: a tool that writes much there while we write to it
    must not block on a full pipe and stop reading."""
    assert proc.stdin is not None and proc.stderr is not None
    fd, err = proc.stdin.fileno(), proc.stderr.fileno()
    os.set_blocking(fd, False)
    broken, listen = False, [err]
    for data in slices:
        view = memoryview(data)
        while view and not broken:
            left = deadline - time.monotonic()
            readable, writable, _ = select.select(listen, [fd], [], max(0.0, left))
            if not readable and not writable:
                raise subprocess.TimeoutExpired(proc.args, 0)
            if readable:
                text = os.read(err, 1 << 16)
                said += text
                if not text:  # closed: from now on only the writes are waited for
                    listen = []
            if writable:
                try:
                    view = view[os.write(fd, view):]
                except BrokenPipeError:
                    broken = True
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    proc.stdin = None  # closed: communicate() must not flush it again
