"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon_harness import daemon_namespace
from tests.netns import require_root_tools


@pytest.fixture
def log_harness(tmp_path: Path):
    """A daemon namespace whose log is an empty multilog directory the test writes to
    (``tmp_path / "log" / "current"``) instead of a running multilog."""
    require_root_tools("nft")
    with daemon_namespace(tmp_path) as h:
        (tmp_path / "log").mkdir()
        yield h
