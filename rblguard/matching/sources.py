"""Scanning whole sources: every file of a source, oldest first, chunk by chunk.

The scanner (rblguard.matching.scanner) works on buffers; this is what ``simulate`` and
the tests use to feed it a log as it lies on disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from rblguard.matching.rules import RuleSet
from rblguard.matching.scanner import Scanner
from rblguard.model import ChunkResult
from rblguard.sources.files import read_complete_lines
from rblguard.sources.layout import list_files
from rblguard.sources.stamps import StampFormat, detect_format


def scan_file(path: str | Path, scanner: Scanner, *,
              tally: bool = False) -> Iterator[ChunkResult]:
    """Scan one file from start to end, detecting its stamp format from its first lines.

    With ``tally`` the chunks come from Scanner.tally(): counts instead of events.
    """
    ref = os.stat(path).st_mtime
    fmt: StampFormat | None = None
    for offset, buf in read_complete_lines(path):
        if fmt is None:
            fmt = detect_format(buf)
        yield (scanner.tally if tally else scanner.scan)(buf, offset, fmt, ref)


def scan_source(path: str | Path, ruleset: RuleSet, *, scanner: Scanner | None = None,
                tally: bool = False) -> Iterator[ChunkResult]:
    """Scan every file of a source (a file, or a multilog directory oldest first)."""
    scanner = scanner or Scanner(ruleset)
    for file in list_files(str(path)):
        yield from scan_file(file, scanner, tally=tally)
