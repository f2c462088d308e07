"""Following sources with a real multilog: every line once, across rotations and restarts."""

from __future__ import annotations

import itertools
import logging
import os
import random
import select
import struct
import threading
import time
from pathlib import Path

import pytest

import rblguard.sources.watch
from rblguard.model import MAX_LINE_BYTES, SourcePosition
from rblguard.sources.follow import Chunk, Follower
from rblguard.sources.layout import fingerprint, list_files
from rblguard.sources.watch import SourceWatcher
from tests.multilog import Multilog


def numbers(chunks: list[Chunk]) -> list[int]:
    """The line numbers in chunks, after checking each chunk's own promises."""
    found = []
    for chunk in chunks:
        assert chunk.data.endswith(b"\n")
        assert chunk.end == chunk.start + len(chunk.data)
        found += [int(line.rsplit(b" ", 1)[1]) for line in chunk.data.split(b"\n")[:-1]]
    return found


def test_list_files_orders_rotated_files_by_label_then_current(tmp_path: Path) -> None:
    labels = ["@400000006b0676050000000a.s", "@400000006b06760400000000.u",
              "@400000006B0676060000000b.s"]
    for name in reversed(labels):
        (tmp_path / name).write_bytes(b"x\n")
    for name in ("current", "lock", "state", "previous-ish"):
        (tmp_path / name).write_bytes(b"")
    expected = [tmp_path / labels[1], tmp_path / labels[0], tmp_path / labels[2],
                tmp_path / "current"]
    assert list_files(str(tmp_path)) == expected
    assert list_files(str(tmp_path / "current")) == expected  # `current` means its directory
    plain = tmp_path / "sub" / "maillog"
    plain.parent.mkdir()
    plain.write_bytes(b"")
    assert list_files(str(plain)) == [plain]


def test_fingerprint_records_how_many_bytes_it_covers() -> None:
    assert fingerprint(b"abc").startswith("3:")
    assert fingerprint(b"a" * 5000) == fingerprint(b"a" * 1024)
    assert fingerprint(b"abc") != fingerprint(b"abd")


def test_concurrent_reader_gets_every_line_once_across_many_rotations(tmp_path: Path) -> None:
    """A reader racing multilog's renames.  multilog keeps every file here (n500), so a
    line missing or repeated is the follower's fault, never multilog's deletion."""
    log = Multilog(tmp_path / "log", keep=500)
    follower = Follower(str(tmp_path / "log"), None)
    got: list[Chunk] = []
    done = threading.Event()
    rng = random.Random(1)

    def read_loop() -> None:
        while not done.is_set():
            got.extend(follower.read(rng.choice([200, 4096, 1 << 20])))
            time.sleep(0.001)

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        log.write_lines(6000)
    finally:
        log.close()
        done.set()
        reader.join()
    got.extend(follower.read())
    assert numbers(got) == list(range(6000))
    switches = sum(a.inode != b.inode for a, b in itertools.pairwise(got))
    assert switches > 20, "multilog should have rotated often"
    assert follower.lag_bytes() == 0


def test_a_file_caught_as_previous_is_read_before_the_new_current(tmp_path: Path) -> None:
    """multilog's rotation caught half-way, by hand: while the follower finishes an
    older file, `current` becomes `previous` (no label yet) and a new `current` starts.
    The unlabelled file must be read next, once, and its label later not read again."""
    log = tmp_path / "log"
    log.mkdir()
    first = log / "@400000006b0f0c0218e396f4.s"
    first.write_bytes(b"".join(b"line %d\n" % i for i in range(10)))
    (log / "current").write_bytes(b"".join(b"line %d\n" % i for i in range(10, 20)))
    st = first.stat()
    resume = SourcePosition(str(log), str(first), st.st_dev, st.st_ino, 0,
                            fingerprint(first.read_bytes()))
    follower = Follower(str(log), resume)
    assert follower.current_file == str(first)
    os.rename(log / "current", log / "previous")
    (log / "current").write_bytes(b"".join(b"line %d\n" % i for i in range(20, 30)))
    got = follower.read()
    assert numbers(got) == list(range(20))  # waits for the label before going on
    os.link(log / "previous", log / "@400000006b0f0c0218f179a4.s")
    os.unlink(log / "previous")
    got += follower.read()
    assert numbers(got) == list(range(30))
    assert follower.read() == []


def test_restarts_from_saved_positions_lose_and_repeat_nothing(tmp_path: Path) -> None:
    """The Follower is recreated from its last committed position at random points.

    Each read waits until multilog has written everything, so that the files it finds,
    and so how far it lags, follow from the seed alone: left to the scheduler, a
    multilog held back under load and then let go can rotate past all ``keep`` files
    between two reads, and deleting lines nobody read is multilog's right (the test
    with keep=2 below checks that the follower says so)."""
    rng = random.Random(2)
    log = Multilog(tmp_path / "log", keep=5)
    source = str(tmp_path / "log")
    follower = Follower(source, None)
    position = None
    got: list[Chunk] = []
    restarts = 0
    try:
        for _ in range(150):
            log.write_lines(rng.randint(1, 60))
            log.wait_written()
            chunks = follower.read(rng.choice([100, 1000, 1 << 20]))
            got += chunks
            if chunks:
                position = chunks[-1].position(source)
            if rng.random() < 0.3:
                follower.close()
                follower = Follower(source, position)
                restarts += 1
    finally:
        log.close()
    while chunks := follower.read(1000):
        got += chunks
    assert restarts > 20
    assert numbers(got) == list(range(log.written))
    assert any(os.path.basename(c.file).startswith("@") for c in got), \
        "some restart should have resumed inside a rotated file"


def test_several_rotations_between_two_reads(tmp_path: Path) -> None:
    log = Multilog(tmp_path / "log", keep=50)
    follower = Follower(str(tmp_path / "log"), None)
    log.write_lines(50)
    first = numbers(follower.read())
    log.write_lines(800)  # about 7 rotations
    log.close()
    chunks = follower.read()
    assert first + numbers(chunks) == list(range(850))
    assert sum(os.path.basename(c.file).startswith("@") for c in chunks) >= 5


def test_resume_into_a_rotated_file_then_newer_ones(tmp_path: Path) -> None:
    log = Multilog(tmp_path / "log", keep=50)
    source = str(tmp_path / "log")
    log.write_lines(40)
    log.wait_written()
    with Follower(source, None) as follower:
        chunks = follower.read(300)  # stop in the middle of `current`
    position = chunks[-1].position(source)
    done = numbers(chunks)
    assert 0 < len(done) < 40
    log.write_lines(600)
    log.close()
    assert os.path.basename(position.file) == "current"
    with Follower(source, position) as follower:
        rest = follower.read()
    assert done + numbers(rest) == list(range(640))
    assert os.path.basename(rest[0].file).startswith("@")  # found again by its inode
    assert rest[0].inode == position.inode and rest[0].start == position.offset


def test_resume_after_the_saved_file_was_deleted_warns_and_reads_only_newer(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = Multilog(tmp_path / "log", keep=2)
    source = str(tmp_path / "log")
    log.write_lines(40)
    log.wait_written()
    with Follower(source, None) as follower:
        chunks = follower.read(300)
    position = chunks[-1].position(source)
    done = numbers(chunks)
    log.write_lines(1500)  # many rotations: multilog's n2 deletes the file we were in
    log.close()
    with (caplog.at_level(logging.WARNING, "rblguard.sources.follow"),
          Follower(source, position) as f):
        rest = numbers(f.read())
    assert "may have been lost" in caplog.text
    assert rest == list(range(rest[0], 1540)), "a gap-free run up to the last line"
    assert rest[0] > done[-1] + 1


def test_copy_truncate_restarts_at_zero_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "maillog"
    path.write_bytes(b"".join(b"old %d\n" % i for i in range(100)))
    follower = Follower(str(path), None)
    assert len(numbers(follower.read())) == 100
    inode = path.stat().st_ino
    with open(path, "r+b") as f:
        f.truncate(0)
    with open(path, "ab") as f:
        f.write(b"new 0\nnew 1\n")
    with caplog.at_level(logging.WARNING, "rblguard.sources.follow"):
        chunks = follower.read()
    assert [(c.inode, c.start, c.data) for c in chunks] == [(inode, 0, b"new 0\nnew 1\n")]
    assert "truncated" in caplog.text


def test_truncated_and_refilled_past_the_offset_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "maillog"
    path.write_bytes(b"".join(b"old %d\n" % i for i in range(10)))
    follower = Follower(str(path), None)
    assert numbers(follower.read()) == list(range(10))
    with open(path, "r+b") as f:  # rewritten in place, longer than before
        f.truncate(0)
        f.write(b"".join(b"fresh %d\n" % i for i in range(50)))
    assert numbers(follower.read()) == list(range(50))


def test_replaced_file_finishes_the_old_one_then_reads_the_new_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "maillog"
    writer = open(path, "ab", buffering=0)  # noqa: SIM115 - kept open across the rename
    writer.write(b"a 0\na 1\n")
    follower = Follower(str(path), None)
    assert numbers(follower.read()) == [0, 1]
    path.rename(tmp_path / "maillog.1")
    writer.write(b"a 2\n")  # the writer has not reopened yet
    assert numbers(follower.read()) == [2], "path missing: keep following the old file"
    path.write_bytes(b"b 3\nb 4\n")
    writer.write(b"a 5\n")
    writer.close()
    assert numbers(follower.read()) == [5, 3, 4], "the old file's end, then the new one"
    # A saved position whose inode now holds other bytes: the new file from its start.
    assert follower.read() == []
    stale = Chunk(str(path), path.stat().st_dev, path.stat().st_ino, 0, b"x 9\n",
                  fingerprint(b"x 9\n")).position(str(path))
    with Follower(str(path), stale) as again:
        assert numbers(again.read()) == [3, 4]


def test_missing_source_is_followed_from_its_start_once_it_appears(tmp_path: Path) -> None:
    plain = tmp_path / "later" / "maillog"
    follower = Follower(str(plain), None)
    assert follower.read() == [] and follower.current_file is None
    plain.parent.mkdir()
    plain.write_bytes(b"x 0\nx 1\n")
    assert numbers(follower.read()) == [0, 1]

    source = tmp_path / "multi"
    follower = Follower(str(source), None)
    assert follower.read() == []
    log = Multilog(source, keep=50)
    log.write_lines(500)  # rotations before the follower looks again: read them too
    log.close()
    assert numbers(follower.read()) == list(range(500))


def test_partial_last_line_waits_for_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "maillog"
    path.write_bytes(b"x 0\nx 1")
    follower = Follower(str(path), None)
    assert [c.data for c in follower.read()] == [b"x 0\n"]
    assert follower.read() == []
    assert follower.lag_bytes() == 3
    with open(path, "ab") as f:
        f.write(b"1\n")
    chunks = follower.read()
    assert [(c.start, c.data) for c in chunks] == [(4, b"x 11\n")]


def test_long_line_and_bounded_backlog(tmp_path: Path) -> None:
    path = tmp_path / "maillog"
    long_line = b"L" * 900_000 + b" 0\n"
    short = b"".join(b"s %d\n" % i for i in range(1, 20001))
    path.write_bytes(long_line + short)
    follower = Follower(str(path), None)
    first = follower.read(65536)
    assert [c.data for c in first] == [long_line], "a line longer than max_bytes comes whole"
    pieces = []
    while chunks := follower.read(65536):
        assert sum(len(c.data) for c in chunks) <= 65536
        pieces += chunks
    assert len(pieces) > 2
    assert numbers(first + pieces) == list(range(20001))


def test_a_line_past_the_cap_is_skipped_and_said_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "maillog"
    path.write_bytes(b"s 0\n" + b"L" * (MAX_LINE_BYTES + 10))  # no newline yet
    follower = Follower(str(path), None)
    assert numbers(follower.read(65536)) == [0]
    assert numbers(follower.read(65536)) == []
    with open(path, "ab") as f:  # the writer goes on: still the same line
        f.write(b"L" * 3_000_000)
    assert numbers(follower.read(65536)) == []
    with open(path, "ab") as f:
        f.write(b" 99\ns 1\ns 2\n")
    chunks = follower.read(65536)
    assert numbers(chunks) == [1, 2], "the overlong line is dropped whole, not its tail"
    assert chunks[0].start == 4 + MAX_LINE_BYTES + 10 + 3_000_000 + 4
    skipped = [r for r in caplog.records if "longer than" in r.getMessage()]
    assert len(skipped) == 1 and "maillog: the line at byte 4 " in skipped[0].getMessage()


def test_resume_with_a_fingerprint_taken_when_the_file_was_short(tmp_path: Path) -> None:
    path = tmp_path / "maillog"
    path.write_bytes(b"x 0\n")
    with Follower(str(path), None) as follower:
        position = follower.read()[-1].position(str(path))
    assert position.fingerprint.startswith("4:")
    with open(path, "ab") as f:
        f.write(b"".join(b"x %d\n" % i for i in range(1, 1000)))
    with Follower(str(path), position) as follower:
        assert numbers(follower.read()) == list(range(1, 1000))


def test_bytes_are_bytes(tmp_path: Path) -> None:
    path = tmp_path / "maillog"
    path.write_bytes(b"\xff\xfe\x00 0\n\x00\x00 1\n")
    assert numbers(Follower(str(path), None).read()) == [0, 1]


def test_source_watcher_calls_back_within_milliseconds(tmp_path: Path) -> None:
    log = Multilog(tmp_path / "log", size=4096, keep=50)
    plain = tmp_path / "maillog"
    missing = tmp_path / "not" / "yet" / "there"
    sources = [str(tmp_path / "log"), str(plain), str(missing)]
    calls: list[tuple[str, float]] = []
    cond = threading.Condition()

    def on_change(source: str) -> None:
        with cond:
            calls.append((source, time.monotonic()))
            cond.notify_all()

    def delay_after(action, source: str) -> float:
        with cond:
            calls.clear()
        start = time.monotonic()
        action()
        with cond:
            assert cond.wait_for(lambda: any(s == source for s, _ in calls), timeout=5), source
            return next(t for s, t in calls if s == source) - start

    watcher = SourceWatcher(sources, on_change)
    watcher.start()
    try:
        write_delays = [delay_after(lambda: log.write_lines(1), sources[0]) for _ in range(20)]
        rotate_delays = []
        for _ in range(5):  # a rotation (its callback seen), then the first write after it
            delay_after(lambda: log.write_lines(120), sources[0])
            rotate_delays.append(delay_after(lambda: log.write_lines(1), sources[0]))
        plain_delay = delay_after(lambda: plain.write_bytes(b"x\n"), sources[1])
        missing.parent.mkdir(parents=True)
        appear_delay = delay_after(lambda: missing.write_bytes(b"x\n"), sources[2])
        # settle: the second write's callback comes in a later batch than the first's,
        # so every event of `missing` (one inotify queue, read in order) is handled
        for _ in range(2):
            delay_after(lambda: plain.write_bytes(b"x\n"), sources[1])
        # a file no source names is not reported: its event comes before the next
        # write's, in the same directory, so once that one is seen it has been handled
        with cond:
            calls.clear()
        (tmp_path / "other").write_bytes(b"x\n")
        plain.write_bytes(b"y\n")
        with cond:
            assert cond.wait_for(lambda: any(s == sources[1] for s, _ in calls), timeout=5)
            assert {s for s, _ in calls} == {sources[1]}, "a file no source names is reported"
    finally:
        watcher.stop()
        log.close()
    write_delays.sort()
    print(f"\nwatcher delay: write median {write_delays[10] * 1000:.2f} ms, max "
          f"{write_delays[-1] * 1000:.2f} ms; after rotation max {max(rotate_delays) * 1000:.2f}"
          f" ms; plain file {plain_delay * 1000:.2f} ms; appeared {appear_delay * 1000:.2f} ms")


def test_a_rewrite_between_the_check_and_the_read_is_read_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """copytruncate refills the file between the follower's look at its head and its
    read at the old offset: what that read got is the new content's middle, and is
    dropped (the new content is read from its start once), while lines the old file
    still held at that offset are kept (seen once in CI: 18 lines read twice)."""
    path = tmp_path / "maillog"
    path.write_bytes(b"".join(b"old %d\n" % i for i in range(20)))
    follower = Follower(str(path), None)
    assert numbers(follower.read()) == list(range(20))
    old_end = path.stat().st_size
    real_pread = os.pread
    rewritten = []

    def racing_pread(fd: int, n: int, offset: int) -> bytes:
        if offset == old_end and not rewritten:  # the read at the old offset
            rewritten.append(True)
            with open(path, "r+b") as w:  # logrotate's copytruncate, then the writer
                w.truncate(0)
                w.write(b"".join(b"new %d\n" % (100 + i) for i in range(40)))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", racing_pread)
    with open(path, "ab") as w:  # the old file grows: the follower looks again
        w.write(b"old 20\n")
    got = numbers(follower.read())
    got += numbers(follower.read())
    assert rewritten
    assert got == [100 + i for i in range(40)], got


def test_writes_beside_a_source_directory_wake_nothing(tmp_path: Path) -> None:
    """/var/log/qmail holds qmail-send's own log beside smtpd/: its parent is watched
    for smtpd/ coming and going, never for its other files' writes (each one woke the
    daemon for nothing, 40% of its wake-ups in benchmarks/e2e.py)."""
    source = tmp_path / "smtpd"
    source.mkdir()
    (source / "current").write_bytes(b"")
    sibling = tmp_path / "current"  # qmail-send's multilog, one directory up
    sibling.write_bytes(b"")
    watcher = SourceWatcher([str(source)], lambda _source: None)
    watcher.start(own_thread=False)
    try:
        with sibling.open("ab") as f:
            for _ in range(50):
                f.write(b"@400000006b0676 delivery 1: success\n")
                f.flush()
        (tmp_path / "marker.tmp").write_bytes(b"")
        (tmp_path / "marker.tmp").rename(tmp_path / "marker")  # an event the parent gets
        poller = select.poll()
        poller.register(watcher.fileno(), select.POLLIN)
        assert poller.poll(5000), "no inotify event for the rename"
        raw = os.read(watcher.fileno(), 1 << 16)
        names, pos = [], 0
        while pos < len(raw):
            _wd, _mask, _cookie, length = struct.unpack_from("iIII", raw, pos)
            names.append(raw[pos + 16:pos + 16 + length].rstrip(b"\0").decode())
            pos += 16 + length
        assert names and "current" not in names, names  # no write to the sibling woke it
    finally:
        watcher.stop()


def test_repeated_events_are_remembered_until_the_watches_change(tmp_path: Path) -> None:
    """A busy log's writes give the same inotify bytes at every wake-up: the watcher
    answers them from memory, and forgets it when its watches change, so an answer
    never outlives the watches it was made for.  A source directory moved away and made
    again is watched afresh at its path (the kernel's watch goes with the moved one,
    which until 2026-12-08 left the new directory unwatched: only the loop's 1 s
    re-read saw its lines), and the moved one no longer."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "current").write_bytes(b"")
    watcher = SourceWatcher([str(a), str(b)], lambda _source: None)
    watcher.start(own_thread=False)
    poller = select.poll()
    poller.register(watcher.fileno(), select.POLLIN)

    def changed_after(path: Path) -> set[str]:
        with path.open("ab") as f:
            f.write(b"x\n")
        assert poller.poll(5000), f"no inotify event for {path}"
        return watcher.changed()

    try:
        for _ in range(3):
            assert changed_after(a / "current") == {str(a)}
        assert len(watcher._plain) == 1  # one read, the same bytes each time
        assert changed_after(b / "current") == {str(b)}
        remembered = set(watcher._plain)
        a.rename(tmp_path / "a.old")  # the source directory replaced under the watcher
        a.mkdir()
        assert poller.poll(5000), "no inotify event for the rename"
        assert str(a) in watcher.changed()
        assert not remembered & set(watcher._plain)  # forgotten with the old watches
        assert changed_after(a / "current") == {str(a)}
        with (tmp_path / "a.old" / "current").open("ab") as f:
            f.write(b"x\n")  # no longer a source: its writes name none
        assert not poller.poll(200) or watcher.changed() == set()
    finally:
        watcher.stop()


def test_a_path_made_at_once_is_followed_down_to_the_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mkdir -p not/yet`` makes ``yet`` before the watch on ``not`` is added when the
    watcher looks in between: no event will ever say so, so it must look again.  CI
    met it by chance (the source's file was never reported); here the directory is made
    inside the add itself, every time."""
    missing = tmp_path / "not" / "yet" / "there"
    real_add = rblguard.sources.watch._Inotify.add

    def add_after_mkdir(inotify: object, directory: str, mask: int) -> int:
        if directory == str(tmp_path / "not"):
            (tmp_path / "not" / "yet").mkdir()
        return real_add(inotify, directory, mask)

    monkeypatch.setattr(rblguard.sources.watch._Inotify, "add", add_after_mkdir)
    # A source beside keeps tmp_path watched: dropping its watch would queue an event,
    # and that one's reshape would find yet/ by luck.
    watcher = SourceWatcher([str(missing), str(tmp_path / "maillog")], lambda _source: None)
    watcher.start(own_thread=False)
    poller = select.poll()
    poller.register(watcher.fileno(), select.POLLIN)
    try:
        (tmp_path / "not").mkdir()
        assert poller.poll(5000), "no inotify event for not/"
        watcher.changed()  # the reshape: watches not/, which makes yet/ meanwhile
        missing.write_bytes(b"x\n")
        assert poller.poll(5000), "no inotify event for not/yet/there"
        assert watcher.changed() == {str(missing)}
    finally:
        watcher.stop()


def test_multilogs_two_step_rotation_never_reads_a_file_twice(tmp_path: Path) -> None:
    """multilog renames current to previous, makes a new current, then links previous to
    its label: a reader that catches two rotations in that window must not lose count."""
    source = tmp_path / "log"
    source.mkdir()
    (source / "current").write_bytes(b"x 0\n")
    follower = Follower(str(source), None)
    got = follower.read()
    label = 0x400000006B067600000000

    def rotate(lines: bytes) -> None:  # step one: the full file becomes `previous`
        (source / "current").rename(source / "previous")
        (source / "current").write_bytes(lines)

    def finish() -> None:  # step two: `previous` gets its label
        nonlocal label
        label += 1
        os.link(source / "previous", source / f"@{label:024x}.s")
        (source / "previous").unlink()

    rotate(b"x 1\n")
    got += follower.read()  # caught between the two steps
    finish()
    got += follower.read()
    rotate(b"x 2\n")
    got += follower.read()  # and again, with the first file now labelled
    finish()
    got += follower.read()
    assert numbers(got) == [0, 1, 2]


def test_lines_the_writer_adds_just_before_the_switch_are_read(tmp_path: Path) -> None:
    """The old file is read to its end once more after the live path changed."""
    path = tmp_path / "maillog"
    path.write_bytes(b"a 0\n")
    old = path.open("ab", buffering=0)

    class RacedFollower(Follower):
        raced = False

        def _replaced(self, f):  # the writer's last line lands between EOF and this check
            if not self.raced:
                self.raced = True
                old.write(b"a 1\n")
                path.rename(tmp_path / "maillog.1")
                path.write_bytes(b"b 2\n")
            return super()._replaced(f)

    follower = RacedFollower(str(path), None)
    assert numbers(follower.read()) == [0, 1, 2]
    old.close()
