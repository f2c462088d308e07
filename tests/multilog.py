"""One real ``multilog t`` for the tests, fed through a pipe.

daemontools' multilog is what writes a qmail front end's log: stamped lines, ``current``
rotated to ``@<tai64n>.s`` at a size limit, the oldest deleted past a count.  Tests use
the real program, never an imitation, so every rotation they see is one a mail host sees.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.netns import IN_CI


def require_multilog() -> None:
    if shutil.which("multilog") is None:
        if IN_CI:
            pytest.fail("needs multilog (daemontools): CI must run this test")
        pytest.skip("needs multilog (daemontools)")


class Multilog:
    """``multilog t sSIZE nKEEP DIRECTORY``; ``write`` feeds it text, ``write_lines``
    numbered lines ("line N"), ``wait_written`` waits until multilog has written all."""

    def __init__(self, directory: Path, size: int = 4096, keep: int = 200) -> None:
        require_multilog()
        self.directory = Path(directory)
        self.proc = subprocess.Popen(["multilog", "t", f"s{size}", f"n{keep}",
                                      str(directory)], stdin=subprocess.PIPE)
        self.written = 0  # numbered lines written so far
        self._last = b""
        deadline = time.monotonic() + 5
        while not (self.directory / "current").exists():  # the event: it has started
            assert time.monotonic() < deadline, "multilog did not start"
            time.sleep(0.01)

    def write(self, text: str) -> None:
        assert self.proc.stdin is not None
        data = text.encode()
        self.proc.stdin.write(data)
        self.proc.stdin.flush()
        if data.strip():
            self._last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]

    def write_lines(self, count: int) -> None:
        """``count`` numbered lines.  multilog holds its output back while more input
        waits, so the writer yields every ten lines, as a real log's writers do (pacing,
        not synchronisation: nothing waits for anything here)."""
        assert self.proc.stdin is not None
        for _ in range(count):
            self._last = b"line %d" % self.written
            self.proc.stdin.write(self._last + b"\n")
            self.proc.stdin.flush()
            self.written += 1
            if self.written % 10 == 0:
                time.sleep(0.0005)

    def wait_written(self, timeout: float = 5.0) -> None:
        """Until the last line written is in the log (multilog wrote it out)."""
        deadline = time.monotonic() + timeout
        while self._last and not self._newest_text().rstrip(b"\n").endswith(b" " + self._last):
            assert time.monotonic() < deadline, f"multilog did not write {self._last!r}"
            time.sleep(0.005)

    def _newest_text(self) -> bytes:
        """The text of the file that holds the newest line: ``current``, unless multilog
        has just rotated it (then it is empty or missing, and the line is in
        ``previous`` or the newest ``@…`` file).  A rotation under way can make this
        miss the line once; the caller looks again."""
        rotated = sorted(p.name for p in self.directory.glob("@*"))
        for name in ["current", "previous", *rotated[-1:]]:
            try:
                text = (self.directory / name).read_bytes()
            except FileNotFoundError:
                continue
            if text:
                return text
        return b""

    def close(self) -> None:
        """Stop multilog; it writes out everything it holds first."""
        if self.proc.stdin:
            self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0
