"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon_harness import daemon_namespace
from tests.netns import require_root_tools


@pytest.fixture
def harness(tmp_path: Path):
    """A network namespace with a daemon ready to configure and start in ``tmp_path``
    (see tests/daemon_harness.py); deleted afterwards, even on failure."""
    require_root_tools("nft", "multilog")
    with daemon_namespace(tmp_path) as h:
        yield h


@pytest.fixture
def log_harness(harness, tmp_path: Path):
    """``harness`` whose log is an empty multilog directory the test writes to
    (``tmp_path / "log" / "current"``) instead of a running multilog."""
    (tmp_path / "log").mkdir()
    return harness
