"""The fleet in the state: each ban's origin and the stream position, saved together."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from rblguard.model import Ban
from rblguard.store.journal import Journal
from rblguard.store.state import SCHEMA_VERSION, State

NOW = 1_700_000_000.0
SCHEMA_1 = """
CREATE TABLE bans (target TEXT PRIMARY KEY, until REAL NOT NULL, rule TEXT NOT NULL,
    reason TEXT NOT NULL, created REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE history (target TEXT PRIMARY KEY, bans INTEGER NOT NULL,
    last_ban REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE positions (source TEXT PRIMARY KEY, file TEXT NOT NULL, dev INTEGER NOT NULL,
    inode INTEGER NOT NULL, offset INTEGER NOT NULL, fingerprint TEXT NOT NULL) WITHOUT ROWID;
INSERT INTO bans VALUES ('198.51.100.7', 1700003600.0, 'rbl', '553 sorry', 1700000000.0);
PRAGMA user_version=1;
"""


def test_a_schema_1_file_is_upgraded_and_keeps_its_bans(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "state.db")
    db.executescript(SCHEMA_1)
    db.close()
    with State(tmp_path) as state:
        assert state.load_bans(NOW) == [Ban("198.51.100.7", NOW + 3600, "rbl", "553 sorry")]
        assert state.fleet_cursor("rblguard:bans") is None
        assert state.db is not None
        assert state.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2


def test_origins_and_the_stream_position_survive_a_reopen(tmp_path: Path) -> None:
    with State(tmp_path) as state:
        journal = Journal(state, lambda _t: True, lambda _b: [])
        journal.kernel_took([Ban("198.51.100.7", NOW + 60, "rbl", "fleet ban from mx1", "mx1"),
                             Ban("203.0.113.9", NOW + 60, "rbl", "553 here")])
        journal.fleet_cursor = ("rblguard:bans", "1700000000123-0")
        journal.commit(force=True)
        assert journal.fleet_cursor is None
    with State(tmp_path) as state:
        assert {b.target: b.origin for b in state.load_bans(NOW)} == {
            "198.51.100.7": "mx1", "203.0.113.9": None}
        assert state.fleet_cursor("rblguard:bans") == "1700000000123-0"
        assert state.fleet_cursor("other:bans") is None
