"""The daemon when its files misbehave: a state directory that fills up or turns read-only
mid-run, copy-and-truncate, a replaced file, a source that appears after start-up.

Everything is real: ``rblguard run`` in a namespace with nftables, a real multilog, real
file systems mounted for the test (tmpfs, ext4 on a loop device), real renames and
truncations.  Each test says in its docstring what a broken daemon would do to fail it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from rblguard.logs import BURST
from tests.daemon_harness import (
    DaemonHarness,
    reject_message,
    tai64n,
    wait_for,
)
from tests.multilog import Multilog
from tests.netns import IN_CI, require_root_tools, run
from tests.test_metrics import netns_fetch


def ban_counts(text: str) -> tuple[Counter[str], Counter[str]]:
    """(new bans, refreshes) per target in a daemon log."""
    new: Counter[str] = Counter()
    refreshed: Counter[str] = Counter()
    for m in re.finditer(r"^INFO ban (\S+) until .*$", text, re.MULTILINE):
        (refreshed if " (refresh) " in m.group(0) else new)[m.group(1)] += 1
    return new, refreshed


METRICS = "127.0.0.1:19736"  # in the test's own namespace


def lines_read(h: DaemonHarness) -> int:
    """rblguard_lines_read_total of the running daemon: a line read twice counts twice
    (its ban does not show it: the same stamp gives the same end, so nothing is logged)."""
    text = netns_fetch(h.ns)(f"http://{METRICS}/metrics")
    return round(sum(float(v) for v in re.findall(
        r"^rblguard_lines_read_total\{[^}]*\} (\S+)$", text, re.MULTILINE)))


def assert_each_banned_once(h: DaemonHarness, expected: set[str]) -> None:
    """Every address in the kernel, each of its one reject line read once, its ban
    logged once and never refreshed."""
    assert h.kernel_elements() == expected
    assert lines_read(h) == len(expected)
    new, refreshed = ban_counts(h.log())
    assert set(new) == expected
    assert {a: n for a, n in new.items() if n != 1} == {}
    assert not refreshed, f"lines read twice: {sorted(refreshed)[:5]}"


@contextlib.contextmanager
def mounted(h: DaemonHarness, where: Path, *mount_args: str) -> Iterator[Path]:
    """``mount ARGS where``; on the way out the daemon is stopped first (its mount
    namespace holds the file system too), then it is unmounted."""
    require_root_tools("mount", "umount")
    where.mkdir(exist_ok=True)
    run(["mount", *mount_args, str(where)])
    try:
        yield where
    finally:
        h.kill()
        subprocess.run(["umount", str(where)], capture_output=True)
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def state_errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if "cannot save" in line]


def feed_batches(h: DaemonHarness, log: Multilog, expected: set[str], prefix: str,
                 rounds: int, per_round: int = 40, until=None, start: int = 0) -> int:
    """Write ``rounds`` batches of rejects (``prefix.R.I``, R from ``start``), each
    waited for in the kernel before the next (so each is a batch, and a commit, of its
    own); stop early once ``until()``."""
    for r in range(start, start + rounds):
        batch = {f"{prefix}.{r}.{i}" for i in range(per_round)}
        for address in sorted(batch):
            log.write(reject_message(address))
        expected.update(batch)
        wait_for(lambda: h.kernel_elements() >= expected, 15, f"batch {prefix}.{r}")
        if until is not None and until():
            return r + 1 - start
    return rounds


def test_state_dir_fills_up_mid_run(harness, tmp_path: Path) -> None:
    """A 512 KiB tmpfs as state_dir fills up under the bans' commits.

    Fails if the daemon dies or stops banning on SQLITE_FULL, logs a traceback or one
    error per batch, stops answering, never saves again once space is back, or saves a
    log position past bans it never saved (then a restart would neither restore those
    bans nor re-read their lines: they would be lost).
    """
    with mounted(harness, tmp_path / "state", "-t", "tmpfs", "-o", "size=512k",
                 "tmpfs") as state_dir:
        harness.write_config(metrics=METRICS)
        log = Multilog(tmp_path / "log", size=100_000)
        expected = {f"198.18.0.{i}" for i in range(40)}
        try:
            # A backlog, read at start-up in one commit: saved before the file system
            # fills up (a commit per line, as a live log gives, fills it within ~20).
            for address in sorted(expected):
                log.write(reject_message(address))
            current = tmp_path / "log" / "current"
            wait_for(lambda: current.exists() and current.read_text().count("\n") == 40,
                     5, "multilog to write the backlog")
            harness.start()
            wait_for(lambda: harness.state_bans() >= expected, 10, "saved before full")
            n = feed_batches(harness, log, expected, "198.19", 120,
                             until=lambda: bool(state_errors(harness.log())))
            assert state_errors(harness.log()), f"never filled up after {n} batches"
            before = set(expected)
            # Many more batches while full: each commit fails, the log says so rarely.
            feed_batches(harness, log, expected, "198.19", 12, per_round=20, start=130)
            unsaved = expected - before
            assert harness.proc is not None and harness.proc.poll() is None
            assert harness.kernel_elements() == expected
            status = harness.cli("status", "--json")
            assert status["state"] == str(state_dir)
            assert sum(status["active_bans"].values()) == len(expected)
            listed = {b["target"] for b in harness.cli("list", "--json")["bans"]}
            assert listed == expected
            # An unban while full must not come back from the state after a restart.
            lifted = {sorted(before)[0], sorted(unsaved)[0]}
            for target in lifted:
                harness.cli("unban", target)
            expected -= lifted

            text = harness.log()
            errors = state_errors(text)
            assert len(errors) <= BURST, errors
            for line in errors:
                assert str(state_dir / "state.db") in line, line
                assert "full" in line, line
            assert "Traceback" not in text

            run(["mount", "-o", "remount,size=16m", str(state_dir)])
            later: set[str] = set()
            feed_batches(harness, log, later, "198.19", 2, start=250)
            wait_for(lambda: harness.state_bans() >= later, 10, "later bans saved")
            expected |= later
            # The bans (and unbans) made while full were saved with the first commit
            # that worked: no saved position is ahead of an unsaved ban.
            assert harness.state_bans() == expected
            assert "works again" in harness.log()
            assert harness.kernel_elements() == expected

            harness.kill(15)  # and a restart neither loses nor repeats anything
            harness.start()
            assert harness.cli("status", "--json")["active_bans"]["ipv4"] == len(expected)
            assert harness.kernel_elements() == expected  # the lifted ones not restored
            assert lines_read(harness) == 0  # it resumed at the end: nothing read again
        finally:
            log.close()


def test_a_flush_while_the_state_is_full_is_kept(harness, tmp_path: Path) -> None:
    """`rblguard flush` while the state cannot be written: once it can, the flushed
    bans are gone from it too, so a restart does not bring them back."""
    with mounted(harness, tmp_path / "state", "-t", "tmpfs", "-o", "size=512k",
                 "tmpfs") as state_dir:
        harness.write_config(metrics=METRICS)
        log = Multilog(tmp_path / "log", size=100_000)
        flushed: set[str] = set()
        try:
            harness.start()
            feed_batches(harness, log, flushed, "198.19", 120,
                         until=lambda: bool(state_errors(harness.log())))
            assert state_errors(harness.log()), "the state never filled up"
            harness.cli("flush")
            assert harness.kernel_elements() == set()
            run(["mount", "-o", "remount,size=16m", str(state_dir)])
            later: set[str] = set()
            feed_batches(harness, log, later, "198.18", 1, start=200)
            wait_for(lambda: harness.state_bans() == later, 10, "the flush saved too")
            harness.kill(15)
            harness.start()
            assert harness.kernel_elements() == later
        finally:
            log.close()


def _ext4_trigger(mountpoint: Path) -> Path:
    device = subprocess.run(["findmnt", "-no", "SOURCE", str(mountpoint)], check=True,
                            capture_output=True, text=True).stdout.strip()
    trigger = Path("/sys/fs/ext4") / os.path.basename(device) / "trigger_fs_error"
    if not trigger.exists():
        if IN_CI:
            pytest.fail(f"needs {trigger} (ext4 in the kernel): CI must run this test")
        pytest.skip(f"needs {trigger}")
    return trigger


def writable(directory: Path) -> bool:
    try:
        (directory / "probe").write_text("x")
    except OSError as exc:
        assert exc.errno == errno.EROFS, exc
        return False
    (directory / "probe").unlink()
    return True


def test_state_dir_turns_read_only_mid_run(harness, tmp_path: Path) -> None:
    """The state's file system goes read-only under the running daemon.

    ``mount -o remount,ro`` (tmpfs or bind mount) cannot do that: the kernel refuses it
    (EBUSY) while SQLite holds state.db open for writing.  What does is what happens on
    a real server: ext4 with ``errors=remount-ro`` hitting an error (here the kernel's
    own trigger_fs_error) is forced read-only, and every write through the daemon's open
    descriptors fails with EROFS.  Such a file system cannot be made writable again in
    place (unmount, fsck, mount), so the state comes back with a restart: it resumes at
    the last saved position and bans again, and saves, what it read while read-only.

    Fails if the daemon dies or stops banning, logs a traceback or one error per batch,
    an error that does not say read-only, or if after the restart a ban is missing
    from the state or the kernel.
    """
    require_root_tools("mkfs.ext4", "e2fsck", "losetup", "findmnt")
    image = tmp_path / "state.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    run(["mkfs.ext4", "-q", "-F", str(image)])
    state_dir = tmp_path / "state"
    with mounted(harness, state_dir, "-o", "loop,errors=remount-ro", str(image)):
        trigger = _ext4_trigger(state_dir)
        harness.write_config(metrics=METRICS)
        log = Multilog(tmp_path / "log", size=100_000)
        harness.start()
        expected: set[str] = set()
        try:
            feed_batches(harness, log, expected, "198.18", 3)
            wait_for(lambda: harness.state_bans() >= expected, 10, "saved while writable")
            saved = set(expected)
            os.sync()  # what was saved is on the disk before the file system fails
            trigger.write_text("rblguard test: forced read-only\n")
            wait_for(lambda: not writable(state_dir), 5, "the file system read-only")
            feed_batches(harness, log, expected, "198.19", 12, per_round=20)
            assert harness.proc is not None and harness.proc.poll() is None
            assert harness.kernel_elements() == expected
            status = harness.cli("status", "--json")
            assert status["state"] == str(state_dir)
            assert sum(status["active_bans"].values()) == len(expected)
            assert {b["target"] for b in harness.cli("list", "--json")["bans"]} == expected
            assert harness.state_bans() == saved  # nothing could be written

            # the daemon saves at most once a second: its failure is logged by then
            wait_for(lambda: state_errors(harness.log()), 10, "the failed save logged")
            text = harness.log()
            errors = state_errors(text)
            assert len(errors) <= BURST, errors
            for line in errors:
                assert str(state_dir / "state.db") in line, line
                assert "read-only" in line, line
            assert "Traceback" not in text
        finally:
            log.close()
        # The repair an admin does: stop, unmount, fsck, mount; then start again.
        harness.kill(15)
        run(["umount", str(state_dir)])
        subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True)
        run(["mount", "-o", "loop,errors=remount-ro", str(image), str(state_dir)])
        harness.start()
        wait_for(lambda: harness.state_bans() == expected, 10, "the state complete again")
        assert harness.kernel_elements() == expected
        # from the last position saved before the failure: exactly the lines read since
        assert lines_read(harness) == len(expected - saved)


def _plain_source(harness: DaemonHarness, tmp_path: Path) -> Path:
    (tmp_path / "var").mkdir()
    path = tmp_path / "var" / "maillog"
    harness.write_config(sources=[{"path": str(path)}], metrics=METRICS)
    return path


def _write(f, addresses: list[str]) -> None:
    for address in addresses:
        f.write((tai64n() + reject_message(address)).encode())
    f.flush()


def test_copy_truncate_rotation_of_a_plain_file(harness, tmp_path: Path) -> None:
    """logrotate's copytruncate under a writer that keeps appending (O_APPEND).

    Fails if the daemon misses the truncation (it would wait for the file to pass the
    old offset, then read from the middle of a line or skip the first new lines), or
    re-reads lines (a refresh in its log), or follows the copy.
    """
    path = _plain_source(harness, tmp_path)
    writer = open(path, "ab")  # noqa: SIM115 - the writer, open across the rotations
    expected: set[str] = set()
    try:
        def batch(name: str, n: int) -> None:
            addresses = [f"198.18.{name}.{i}" for i in range(n)]
            _write(writer, addresses)
            expected.update(addresses)

        batch("1", 30)  # before the daemon starts
        harness.start()
        batch("2", 30)
        wait_for(lambda: harness.kernel_elements() >= expected, what="first bans")
        for rotation, (wait, n) in enumerate([(True, 20), (False, 90)], 1):
            shutil.copyfile(path, f"{path}.{rotation}")
            os.truncate(path, 0)
            if wait:  # first: the daemon sees the empty file; then: at once, refilled
                wait_for(lambda: "truncated in place" in harness.log(), 10,
                         "the daemon to notice the truncation")
            batch(f"{10 * rotation}", n)  # past the old offset in the second round
            wait_for(lambda: harness.kernel_elements() >= expected, what="after rotation")
        batch("40", 10)
        wait_for(lambda: harness.kernel_elements() >= expected, what="the last bans")
    finally:
        writer.close()
    assert_each_banned_once(harness, expected)
    assert ("truncated in place" in harness.log()
            or "rewritten in place" in harness.log())


def test_replaced_plain_file(harness, tmp_path: Path) -> None:
    """A new file moved over the source (new inode), already holding a few lines.

    The new file's lines before the move are fewer than the old file's offset: a daemon
    that kept the old offset for the new file would skip them, one that opened it at its
    end would too, and one that read the old file again would log refreshes.
    """
    path = _plain_source(harness, tmp_path)
    expected: set[str] = set()
    old = open(path, "ab")  # noqa: SIM115
    try:
        first = [f"198.18.1.{i}" for i in range(60)]
        _write(old, first[:30])
        harness.start()
        _write(old, first[30:])
        expected.update(first)
        wait_for(lambda: harness.kernel_elements() >= expected, what="the old file's bans")
        fresh = path.with_name("maillog.new")
        with open(fresh, "ab") as new:
            head = [f"198.18.2.{i}" for i in range(5)]
            _write(new, head)
            os.rename(fresh, path)
            expected.update(head)
            wait_for(lambda: harness.kernel_elements() >= expected, what="the new head")
            tail = [f"198.18.3.{i}" for i in range(40)]
            _write(new, tail)
            expected.update(tail)
            wait_for(lambda: harness.kernel_elements() >= expected, what="the new tail")
    finally:
        old.close()
    assert_each_banned_once(harness, expected)
    status = harness.cli("status", "--json")
    assert status["sources"][0]["offset"] == path.stat().st_size


def test_source_missing_at_start_appears_later(harness, tmp_path: Path) -> None:
    """The multilog directory, and its parent, do not exist when the daemon starts; the
    directory appears (moved into place) holding several rotated files, and multilog
    then goes on writing it.

    Fails if the daemon gives up on the missing source or never looks again, or takes a
    late source as one it already knew and starts at its live file (the rotated files'
    bans would be missing), or reads a line twice.
    """
    source = tmp_path / "svc" / "log"
    harness.write_config(sources=[{"path": str(source)}], metrics=METRICS)
    harness.start()
    assert harness.cli("status", "--json")["sources"][0]["path"] == str(source)
    assert f"source {source} does not exist (yet)" in harness.log()
    assert "not there yet" in harness.cli("status")
    expected: set[str] = set()

    def write(log: Multilog, third: int, n: int) -> None:
        for i in range(n):
            address = f"198.18.{third}.{i}"
            log.write(reject_message(address))
            expected.add(address)

    staging = tmp_path / "staging"
    staging.mkdir()
    log = Multilog(staging / "log", size=2000)
    try:
        write(log, 5, 80)
    finally:
        log.close()
    assert len(list((staging / "log").glob("@*.s"))) >= 2, "multilog should have rotated"
    for _ in range(2):  # two answers: a whole round of the loop looked for the source
        harness.cli("status", "--json")
    assert harness.kernel_elements() == set()
    source.parent.mkdir()
    os.rename(staging / "log", source)
    wait_for(lambda: harness.kernel_elements() >= expected, what="bans of a late source")
    log = Multilog(source, size=2000)
    try:
        write(log, 6, 40)
        wait_for(lambda: harness.kernel_elements() >= expected, what="its later bans")
    finally:
        log.close()
    assert_each_banned_once(harness, expected)
