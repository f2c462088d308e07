"""State: real SQLite files; bans, history and positions survive a reopen; clear errors."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rblguard.model import Ban, Offender, SourcePosition
from rblguard.store.state import SCHEMA_VERSION, State, StateError
from tests.netns import require_root_tools

NOW = 1_700_000_000.0


def _bans(n: int, until: float = NOW + 3600) -> list[Ban]:
    return [Ban(f"198.18.{i >> 8 & 255}.{i & 255}", until, "rbl", f"line {i}")
            for i in range(n)]


def test_roundtrip_in_one_transaction(tmp_path: Path) -> None:
    pos = SourcePosition("/var/log/qmail/smtpd", "/var/log/qmail/smtpd/current", 8, 42,
                         1234, "abc123")
    with State(tmp_path / "state") as state:
        state.commit(bans=[Ban("198.51.100.7", NOW + 60, "rbl", "553 sorry"),
                           Ban("2001:db8:1:2::/64", NOW + 120, "rbl6", "451 later"),
                           Ban("203.0.113.9", NOW - 1, "rbl", "old")],
                     history=[Offender("198.51.100.7", 3, NOW)], positions=[pos])
    assert (tmp_path / "state" / "state.db").exists()
    with State(tmp_path / "state") as state:
        assert state.load_bans(NOW) == [Ban("198.51.100.7", NOW + 60, "rbl", "553 sorry"),
                                        Ban("2001:db8:1:2::/64", NOW + 120, "rbl6",
                                            "451 later")]
        assert state.load_history() == [Offender("198.51.100.7", 3, NOW)]
        assert state.load_positions() == {pos.source: pos}
        assert state.db is not None
        assert state.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert state.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_refresh_unban_flush_prune(tmp_path: Path) -> None:
    with State(tmp_path) as state:
        state.commit(bans=_bans(3))
        state.commit(bans=[Ban("198.18.0.0", NOW + 7200, "manual", "again")],
                     unbans=["198.18.0.1"])
        assert [(b.target, b.until) for b in state.load_bans(NOW)] == [
            ("198.18.0.2", NOW + 3600), ("198.18.0.0", NOW + 7200)]
        state.prune(NOW + 3600)
        assert [b.target for b in state.load_bans(0)] == ["198.18.0.0"]
        state.commit(history=[Offender("a", 1, NOW - 100), Offender("b", 1, NOW)])
        state.prune(NOW, forget_before=NOW - 50)
        assert [o.target for o in state.load_history()] == ["b"]
        state.flush()
        assert state.load_bans(0) == []
        assert len(state.load_history()) == 1  # flush lifts bans, keeps history


def test_failed_commit_writes_nothing(tmp_path: Path) -> None:
    """One transaction: a bad row makes the whole commit fail and leaves the old state."""
    pos = SourcePosition("s", "f", 1, 2, 100, "fp")
    with State(tmp_path) as state:
        state.commit(bans=_bans(2), positions=[pos])
        bad = Ban("198.18.9.9", NOW, "rbl", None)  # type: ignore[arg-type]
        with pytest.raises(StateError, match=r"state\.db: cannot save"):
            state.commit(bans=[*_bans(5)[2:], bad],
                         positions=[SourcePosition("s", "f", 1, 2, 999, "fp")])
        assert len(state.load_bans(NOW)) == 2
        assert state.load_positions()["s"].offset == 100


def test_thousand_ban_commit_and_100k_load_are_fast(tmp_path: Path) -> None:
    """Not a timing test: just that the batch paths work at size (figures in docs)."""
    bans = _bans(65536) + [Ban(f"2001:db8::{i:x}", NOW + 3600, "rbl", "x")
                           for i in range(34464)]
    with State(tmp_path) as state:
        for i in range(0, len(bans), 1000):
            state.commit(bans=bans[i:i + 1000])
        assert len(state.load_bans(NOW)) == 100_000


def test_corrupt_database_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match=r"state\.db: cannot open: .*damaged"):
        State(tmp_path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StateError, match="newer than this rblguard"):
        State(tmp_path)


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError, match="cannot create state directory"):
        State(tmp_path / "file" / "state")


@contextlib.contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_file_system(tmp_path: Path) -> None:
    require_root_tools("mount", "umount")
    with _tmpfs(tmp_path / "ro", "size=1m,mode=0755") as mnt:
        with State(mnt / "state") as state:
            state.commit(bans=_bans(3))
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(StateError, match=rf"{mnt}/state"), State(mnt / "state") as state:
            state.commit(bans=_bans(10))
        with pytest.raises(StateError, match="cannot create state directory"):
            State(mnt / "other")


def test_full_disk(tmp_path: Path) -> None:
    require_root_tools("mount", "umount")
    with _tmpfs(tmp_path / "full", "size=64k") as mnt:
        with pytest.raises(StateError) as info, State(mnt) as state:
            state.commit(bans=_bans(100))
            for i in range(200):  # grow until the 64k file system is full
                state.commit(bans=[Ban(f"2001:db8::{i:x}:{j:x}", NOW + 3600, "rbl",
                                       "x" * 200) for j in range(100)])
        assert str(mnt / "state.db") in str(info.value)
        assert "full" in str(info.value)


def test_history_prune_uses_an_index_and_old_files_get_it(tmp_path: Path) -> None:
    """The daemon prunes forgotten offenders every few seconds: an index keeps that cheap,
    and a file written before the index existed gets it when opened."""
    with State(tmp_path) as state:
        assert state.db is not None
        state.db.execute("DROP INDEX history_last_ban")
    with State(tmp_path) as state:
        assert state.db is not None
        plan = " ".join(str(row) for row in state.db.execute(
            "EXPLAIN QUERY PLAN DELETE FROM history WHERE last_ban < 1"))
        assert "history_last_ban" in plan
        state.commit(history=[Offender(f"198.18.0.{i}", 1, NOW - i * 86400)
                              for i in range(60)])
        state.prune(NOW, forget_before=NOW - 30 * 86400)
        assert len(state.load_history()) == 31


def test_admin_bans_are_found_by_their_own_index_and_old_files_get_it(tmp_path: Path) -> None:
    """A start looks up the admins' own bans among all saved ones: by a partial index
    that holds only those, made when a file without it is opened; without it (a file
    we may only read) by one pass over the table, with the same answer."""
    bans = [*_bans(200), Ban("198.51.100.7", NOW + 60, "manual", "by hand"),
            Ban("198.51.100.8", NOW - 60, "manual", "ran out"),
            Ban("2001:db8::7", NOW + 60, "manual", "by hand")]
    with State(tmp_path) as state:
        assert state.db is not None
        state.commit(bans=bans)
        state.db.execute("DROP INDEX bans_manual")
        assert state.manual_targets(NOW) == {"198.51.100.7", "2001:db8::7"}
    with State(tmp_path) as state:
        assert state.db is not None
        assert state.manual_targets(NOW) == {"198.51.100.7", "2001:db8::7"}
        plan = " ".join(str(row) for row in state.db.execute(
            "EXPLAIN QUERY PLAN SELECT target FROM bans WHERE rule = 'manual' "
            "AND +until > 1"))
        assert "bans_manual" in plan
        indexed = state.db.execute("SELECT count(*) FROM bans INDEXED BY bans_manual "
                                   "WHERE rule = 'manual'").fetchone()[0]
        assert indexed == 3  # the daemon's 200 never enter it
