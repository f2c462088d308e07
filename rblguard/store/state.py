"""rblguard's saved state: active bans, offender history and source positions, in SQLite.

The kernel is the authority on bans (it expires them itself); this file is what lets a
restart put them back in seconds and resume every log exactly where it stopped.  The
daemon calls ``commit`` only after the kernel has accepted a batch, with the source
position just past the lines that caused it, in ONE transaction: a crash before the
commit re-reads those lines (bans are idempotent), a crash after it re-reads nothing.

WAL with ``synchronous=NORMAL``: a commit survives a crash of the process (the WAL is
written before commit returns); only a power cut can lose the last commits, and those
bans are re-derived from the log, whose position was not saved either.  It is also what
makes a 1,000-ban commit take milliseconds instead of an fsync each.

Only the daemon's main thread uses a State object.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from rblguard.model import Ban, Offender, SourcePosition

SCHEMA_VERSION = 2
DB_NAME = "state.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bans (
    target TEXT PRIMARY KEY,
    until REAL NOT NULL,
    rule TEXT NOT NULL,
    reason TEXT NOT NULL,
    created REAL NOT NULL,
    origin TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS bans_until ON bans(until);
CREATE TABLE IF NOT EXISTS history (
    target TEXT PRIMARY KEY,
    bans INTEGER NOT NULL,
    last_ban REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS positions (
    source TEXT PRIMARY KEY,
    file TEXT NOT NULL,
    dev INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    fingerprint TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fleet (
    stream TEXT PRIMARY KEY,
    last_id TEXT NOT NULL
) WITHOUT ROWID;
"""
# Schema 1 to 2: the fleet's bans name their origin, and the fleet's read position.
_UPGRADE_2 = """
ALTER TABLE bans ADD COLUMN origin TEXT;
CREATE TABLE IF NOT EXISTS fleet (
    stream TEXT PRIMARY KEY,
    last_id TEXT NOT NULL
) WITHOUT ROWID;
"""


class StateError(Exception):
    """The state database cannot be used; the message names the file and the cause.

    ``code`` is SQLite's error name (``SQLITE_FULL``, ``SQLITE_READONLY``, ...), or ""
    when the error is rblguard's own (a schema too new, a closed database)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


# What an admin can do about each SQLite error class (by prefix of its error name).
_ADVICE = {
    "SQLITE_CORRUPT": " (the file is damaged: move it away and rblguard starts a new one)",
    "SQLITE_NOTADB": " (the file is damaged: move it away and rblguard starts a new one)",
    "SQLITE_READONLY": " (make {dir} writable for rblguard)",
    "SQLITE_CANTOPEN": " (make {dir} writable for rblguard)",
    "SQLITE_FULL": " (free space on the file system of {dir})",
}


class State:
    """The SQLite file ``state.db`` under ``state_dir`` (created if missing)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / DB_NAME
        try:
            self.dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.dir}: "
                             f"{exc.strerror or exc}") from None
        self.db: sqlite3.Connection | None = None
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=2000")  # the CLI may read meanwhile
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(f"state database {self.path} has schema {version}, "
                                 f"newer than this rblguard's {SCHEMA_VERSION}: "
                                 "upgrade rblguard or move the file away")
            if version < SCHEMA_VERSION:
                upgrade = _UPGRADE_2 if version == 1 else _SCHEMA
                self.db.executescript(f"BEGIN;{upgrade}"
                                      f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
            self.db.execute("SELECT count(*) FROM positions").fetchone()
            self._indexes()
        except sqlite3.Error as exc:
            self.close()
            raise self._error("cannot open", exc) from None
        except StateError:
            self.close()
            raise

    def _indexes(self) -> None:
        """Indexes older files lack, made here; a file we may only read works without.

        ``history.last_ban``: the daemon's prune of forgotten offenders (every few
        seconds) reads only what it deletes.  ``bans_manual``, of the admins' own bans
        alone (a partial index: the daemon's bans never enter it): a start finds them
        without reading every ban (100,000 bans: 20-35 ms -> 0.05 ms)."""
        assert self.db is not None
        with contextlib.suppress(sqlite3.OperationalError):
            self.db.execute("CREATE INDEX IF NOT EXISTS history_last_ban "
                            "ON history(last_ban)")
            self.db.execute("CREATE INDEX IF NOT EXISTS bans_manual "
                            "ON bans(target) WHERE rule = 'manual'")

    def _error(self, what: str, exc: BaseException) -> StateError:
        """A StateError saying what failed and what the admin can do, chosen by
        SQLite's own error code (``sqlite_errorname``), never by its message text."""
        code = getattr(exc, "sqlite_errorname", None) or ""
        text = str(exc)
        if code.startswith("SQLITE_IOERR"):  # SQLite keeps the errno to itself
            cause = self._write_probe()
            if cause:
                text += f" ({cause})"
        for prefix, advice in _ADVICE.items():
            if code.startswith(prefix):
                text += advice.format(dir=self.dir)
                break
        return StateError(f"state database {self.path}: {what}: {text}", code)

    def _write_probe(self) -> str | None:
        """Why the state directory cannot be written now, found by writing a byte to a
        nameless temporary file there; None if that works."""
        try:
            with tempfile.TemporaryFile(dir=self.dir) as f:
                f.write(b"\0")
                f.flush()
        except OSError as exc:
            if exc.errno == errno.EROFS:
                return "read-only file system"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return "file system full"
            return exc.strerror or str(exc)
        return None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN ... COMMIT, rolled back on any error so a failed commit leaves nothing."""
        db = self._conn()
        db.execute("BEGIN")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _conn(self) -> sqlite3.Connection:
        if self.db is None:
            raise StateError(f"state database {self.path}: closed")
        return self.db

    # -- reading (at start-up, and for `rblguard list`) -------------------------------

    def load_bans(self, now: float) -> list[Ban]:
        """Every ban still running at ``now``, soonest expiry first."""
        try:
            rows = self._conn().execute(
                "SELECT target, until, rule, reason, origin FROM bans WHERE until > ? "
                "ORDER BY until",
                (now,)).fetchall()
        except sqlite3.Error as exc:
            raise self._error("cannot read bans", exc) from None
        return [Ban(*row) for row in rows]

    def each_active_ban(self, now: float) -> Iterator[tuple[str, float, bool]]:
        """(target, until, made by an admin) of every ban still running at ``now``,
        streamed from the file: all a start needs, without the reasons, so that a
        million bans never sit in memory twice (``rblguard list`` reads the reasons)."""
        try:
            rows = self._conn().execute(
                "SELECT target, until, rule = 'manual' FROM bans WHERE until > ?", (now,))
            for target, until, manual in rows:
                yield target, until, bool(manual)
        except sqlite3.Error as exc:
            raise self._error("cannot read bans", exc) from None

    def active_ban_chunks(self, now: float,
                          size: int = 50_000) -> Iterator[list[tuple[str, float]]]:
        """(target, until) of every ban still running at ``now``, ``size`` rows at a
        time: a start loads 100,000 before it is ready, and sqlite's fetchmany builds
        the tuples in C where a generator would add a Python step per row."""
        try:
            rows = self._conn().execute(
                "SELECT target, until FROM bans WHERE until > ?", (now,))
            while chunk := rows.fetchmany(size):
                yield chunk
        except sqlite3.Error as exc:
            raise self._error("cannot read bans", exc) from None

    def manual_targets(self, now: float) -> set[str]:
        """The targets of running bans an admin made (``rblguard ban``)."""
        try:
            # "+until": not by the index on until, which holds every ban, but by
            # bans_manual (or, in a file without it, one pass over the table)
            return {row[0] for row in self._conn().execute(
                "SELECT target FROM bans WHERE rule = 'manual' AND +until > ?", (now,))}
        except sqlite3.Error as exc:
            raise self._error("cannot read bans", exc) from None

    def each_offender(self) -> Iterator[Offender]:
        """The offender history, streamed from the file."""
        try:
            for row in self._conn().execute("SELECT target, bans, last_ban FROM history"):
                yield Offender(*row)
        except sqlite3.Error as exc:
            raise self._error("cannot read offender history", exc) from None

    def load_history(self) -> list[Offender]:
        return list(self.each_offender())

    def fleet_cursor(self, stream: str) -> str | None:
        """The id of the last entry of the fleet's ``stream`` this host has applied."""
        try:
            row = self._conn().execute("SELECT last_id FROM fleet WHERE stream = ?",
                                       (stream,)).fetchone()
        except sqlite3.Error as exc:
            raise self._error("cannot read the fleet position", exc) from None
        return row[0] if row else None

    def load_positions(self) -> dict[str, SourcePosition]:
        try:
            rows = self._conn().execute(
                "SELECT source, file, dev, inode, offset, fingerprint FROM positions"
            ).fetchall()
        except sqlite3.Error as exc:
            raise self._error("cannot read source positions", exc) from None
        return {row[0]: SourcePosition(*row) for row in rows}

    # -- writing ----------------------------------------------------------------------

    def commit(self, bans: Iterable[Ban] = (), unbans: Iterable[str] = (),
               history: Iterable[Offender] = (),
               positions: Iterable[SourcePosition] = (),
               fleet: tuple[str, str] | None = None) -> None:
        """Write everything in one transaction: all of it is saved, or none of it.
        ``fleet`` is (stream, last id applied): saved with the bans it brought.

        A ban for a target already saved replaces it (a refresh); ``unbans`` are
        removed after ``bans`` are written, so an unban in the same call wins.
        """
        db = self._conn()
        created = time.time()
        ban_rows = [(b.target, b.until, b.rule, b.reason, created, b.origin) for b in bans]
        unban_rows = [(t,) for t in unbans]
        history_rows = [tuple(o) for o in history]
        position_rows = [(p.source, p.file, p.dev, p.inode, p.offset, p.fingerprint)
                         for p in positions]
        if not (ban_rows or unban_rows or history_rows or position_rows or fleet):
            return
        try:
            with self._transaction():
                if ban_rows:
                    db.executemany(
                        "INSERT INTO bans (target, until, rule, reason, created, origin) "
                        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(target) DO UPDATE SET "
                        "until=excluded.until, rule=excluded.rule, "
                        "reason=excluded.reason, origin=excluded.origin", ban_rows)
                if unban_rows:
                    db.executemany("DELETE FROM bans WHERE target = ?", unban_rows)
                if history_rows:
                    db.executemany(
                        "INSERT OR REPLACE INTO history (target, bans, last_ban) "
                        "VALUES (?, ?, ?)", history_rows)
                if position_rows:
                    db.executemany(
                        "INSERT OR REPLACE INTO positions "
                        "(source, file, dev, inode, offset, fingerprint) "
                        "VALUES (?, ?, ?, ?, ?, ?)", position_rows)
                if fleet:
                    db.execute("INSERT OR REPLACE INTO fleet (stream, last_id) "
                               "VALUES (?, ?)", fleet)
        except sqlite3.Error as exc:
            raise self._error("cannot save", exc) from None

    def flush(self) -> None:
        """Forget every active ban (``rblguard flush``); history and positions stay."""
        self._write("cannot flush bans", "DELETE FROM bans", ())

    def prune(self, now: float, forget_before: float | None = None) -> None:
        """Drop bans expired at ``now``, and history last banned before ``forget_before``
        (the daemon passes now - repeat.forget_after, so the table stays bounded)."""
        self._write("cannot prune expired bans", "DELETE FROM bans WHERE until <= ?", (now,))
        if forget_before is not None:
            self._write("cannot prune offender history",
                        "DELETE FROM history WHERE last_ban < ?", (forget_before,))

    def _write(self, what: str, sql: str, args: tuple[object, ...]) -> None:
        try:
            self._conn().execute(sql, args)
        except sqlite3.Error as exc:
            raise self._error(what, exc) from None

    def close(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            finally:
                self.db = None

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
