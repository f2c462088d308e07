"""`rblguard scan` as an admin runs it: a process, its JSON, its warnings, its exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import genlog
from rblguard.addresses import canonical_address
from rblguard.commands import scan as scan_module

STAMP = "@4000000065a1d28a302953e2 "
LOG = "".join(STAMP + line + "\n" for line in (
    "tcpserver: pid 7071 from 198.18.5.124",
    "rblsmtpd: 198.18.5.124 pid 7071: 451 https://www.spamhaus.org/query/ip/198.18.5.124",
    "rblsmtpd: ::ffff:198.18.5.124 pid 7072: 553 https://www.spamhaus.org/query/ip/198.18.5.124",
    "rblsmtpd: 2001:DB8::17 pid 7073: 553 listed",
    "rblsmtpd: 198.18.5.125 pid 7074: 451 temporary RBL lookup error",
    "rblsmtpd: 203.0.113.77 pid 7075: 451 Error: open resolver; "
    "https://check.spamhaus.org/returnc/pub/203.0.113.53/",
    "rblsmtpd: 198.18.300.1 pid 7076: 553 listed",
    "qmail-smtpd: HELO rblsmtpd: 203.0.113.9 pid 1: 553 x",
    "rblsmtpd: 198.51.100.7 pid 7077: greetdelay: 15",
))
CROSSING_RULE = (Path(__file__).parent / "fixtures" / "rules" / "crossing-lines.yaml").read_text()
# The same command in one process: the two-process split switched off.
ONE_PROCESS = ("import sys, rblguard.commands.scan as s; s.PARALLEL_MIN_BYTES = 1 << 62; "
               "from rblguard.commands.cli import main; sys.exit(main(sys.argv[1:]))")


def rblguard(*args: str, one_process: bool = False) -> subprocess.CompletedProcess[str]:
    command = ["-c", ONE_PROCESS] if one_process else ["-m", "rblguard"]
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture()
def log(tmp_path: Path) -> Path:
    path = tmp_path / "current"
    path.write_text(LOG)
    return path


def test_json_holds_what_the_readme_promises(log: Path) -> None:
    out = rblguard("scan", "--json", str(log))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {k: report[k] for k in ("lines", "matches", "by_rule", "ignored", "dnsbl_errors",
                                   "addresses", "parse_errors")} == {
        "lines": 9,
        "matches": 3,
        "by_rule": {"rblsmtpd": 3},
        "ignored": {"lookup-error": 1, "dnsbl-error": 1},
        "dnsbl_errors": 1,
        "addresses": 2,
        "parse_errors": 1,
    }
    assert report["lookup_errors"] == 1
    assert report["dnsbl_errors_by_zone"] == {"spamhaus.org": 1}
    assert report["top"] == [{"address": "198.18.5.124", "matches": 2},
                             {"address": "2001:db8::17", "matches": 1}]
    assert report["files"] == [str(log)]
    assert "offenders" not in report


def test_list_prints_every_offender(log: Path) -> None:
    out = rblguard("scan", "--list", str(log))
    assert out.returncode == 0, out.stderr
    listed = out.stdout.split("all offenders:\n", 1)[1].splitlines()
    assert listed == ["198.18.5.124\t2", "2001:db8::17\t1"]
    report = json.loads(rblguard("scan", "--json", "--list", "--top", "1", str(log)).stdout)
    assert report["offenders"] == {"198.18.5.124": 2, "2001:db8::17": 1}
    assert len(report["top"]) == 1


def test_dnsbl_error_replies_warn_on_stderr(log: Path, tmp_path: Path) -> None:
    out = rblguard("scan", "--json", str(log))
    assert "WARNING: 1 DNSBL error replies (spamhaus.org (1))" in out.stderr
    assert "First: rblsmtpd: 203.0.113.77 pid 7075: 451 Error: open resolver" in out.stderr
    json.loads(out.stdout)  # the warning never spoils the JSON
    clean = tmp_path / "clean"
    clean.write_text(STAMP + "rblsmtpd: 198.18.5.124 pid 1: 553 listed\n")
    assert rblguard("scan", "--json", str(clean)).stderr == ""


def test_exit_status_for_logs_that_cannot_be_read(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    empty_dir = tmp_path / "smtpd"
    empty_dir.mkdir()
    for path, message in ((missing, "no such file or directory"),
                          (fifo, "is not a regular file"),
                          (empty_dir, "no log file in this directory")):
        out = rblguard("scan", "--json", str(path))
        assert out.returncode == 2, (path, out.stdout, out.stderr)
        assert f"rblguard scan: {path}: " in out.stderr and message in out.stderr
        assert out.stdout == "" and "Traceback" not in out.stderr


def test_rules_directory_named_must_exist(log: Path, tmp_path: Path) -> None:
    out = rblguard("scan", "--json", "--rules", "/nonexistent", str(log))
    assert out.returncode == 2 and out.stdout == ""
    assert "rblguard scan: /nonexistent: no such rules directory" in out.stderr
    disabled = tmp_path / "rules"
    disabled.mkdir()
    (disabled / "r.yaml").write_text("enabled: false\n" + CROSSING_RULE)
    out = rblguard("scan", "--json", "--rules", str(disabled), str(log))
    assert out.returncode == 2 and "no enabled rule in " in out.stderr


@pytest.mark.parametrize("stamp", [STAMP, ""], ids=["tai64n", "none"])
def test_the_next_lines_client_text_is_never_a_reject(tmp_path: Path, stamp: str) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "dnsbl.yaml").write_text(CROSSING_RULE)
    log = tmp_path / "log"
    log.write_text(f"{stamp}qmail-dnsbl: rejected code 553\n"
                   f"{stamp}qmail-smtpd: HELO ip=203.0.113.9\n")
    out = rblguard("scan", "--json", "--list", "--rules", str(rules), str(log))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["matches"], report["offenders"]) == (0, {})
    log.write_text(log.read_text() + f"{stamp}qmail-dnsbl: rejected code 553 ip=198.18.0.1\n")
    report = json.loads(rblguard("scan", "--json", "--list", "--rules", str(rules),
                                 str(log)).stdout)
    assert report["offenders"] == {"198.18.0.1": 1}


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the split needs two cores")
def test_two_processes_give_exactly_the_one_process_answer(tmp_path: Path) -> None:
    """A file of PARALLEL_MIN_BYTES (128 MB) or more is scanned in two halves by two
    processes: the JSON must be exactly what one process gives, and what the generator
    wrote."""
    log = tmp_path / "current"
    truth = genlog.write_log(log, "tai64n", 11, size=scan_module.PARALLEL_MIN_BYTES + (1 << 20))
    assert log.stat().st_size >= scan_module.PARALLEL_MIN_BYTES
    parts = scan_module._parts(str(log), 2)
    assert len(parts) == 2 and parts[0][2] == parts[1][1]  # cut at one line boundary
    with open(log, "rb") as f:
        f.seek(parts[1][1] - 1)
        assert f.read(1) == b"\n"
    split = rblguard("scan", "--json", "--list", "--top", "50", str(log))
    single = rblguard("scan", "--json", "--list", "--top", "50", str(log), one_process=True)
    assert split.returncode == single.returncode == 0, split.stderr + single.stderr
    assert split.stdout == single.stdout
    assert split.stderr == single.stderr
    report = json.loads(split.stdout)
    assert report["lines"] == truth.lines
    assert report["matches"] == truth.rejects
    assert report["addresses"] == truth.reject_addresses
    assert (report["lookup_errors"], report["dnsbl_errors"]) == (truth.lookup_errors,
                                                                truth.dnsbl_errors)
    assert report["parse_errors"] == 0


def test_a_failure_in_a_scan_worker_is_raised_in_the_parent(tmp_path: Path) -> None:
    """A part scanned in a forked child that fails (here: its file vanished) is an
    error of the whole scan, never a silently smaller count."""
    log = tmp_path / "current"
    log.write_bytes(b"@4000000065a1d28a302953e2 rblsmtpd: 198.18.0.1 pid 1: 553 x\n" * 1000)
    scan_module._worker_scanner = scan_module.Scanner(
        scan_module.load_rules(None, explicit=False, require_enabled=True), connections=False)
    parts = [(str(log), 0, log.stat().st_size, "tai64n"),
             (str(tmp_path / "gone"), 0, 10, "tai64n")]
    with pytest.raises(FileNotFoundError):
        scan_module._forked(parts, 2)
    reports = scan_module._forked(parts[:1] * 2, 2)  # one each: both answers come back
    assert [r.lines for r in reports] == [1000, 1000]


@settings(max_examples=200, deadline=None)
@given(counts=st.dictionaries(st.sampled_from([f"198.18.0.{i}" for i in range(30)]),
                              st.integers(1, 4)),
       top=st.integers(0, 40))
def test_the_top_offenders_are_the_head_of_the_whole_ranking(counts: dict[str, int],
                                                            top: int) -> None:
    """--top picks its rows without sorting every offender: the same rows, ties by
    address, as the head of the full list."""
    report = scan_module.ScanReport()
    report.offenders.update(counts)
    assert report.ranked(top) == report.ranked()[:top]
    assert report.as_json(top, False)["top"] == report.as_json(top, True)["top"]


@settings(max_examples=200, deadline=None)
@given(mine=st.dictionaries(st.sampled_from("abcdefgh"), st.integers(1, 9)),
       theirs=st.dictionaries(st.sampled_from("abcdefgh"), st.integers(1, 9)))
def test_merging_two_parts_adds_their_offenders(mine: dict[str, int],
                                                theirs: dict[str, int]) -> None:
    a, b = scan_module.ScanReport(), scan_module.ScanReport()
    a.offenders.update(mine)
    b.offenders.update(theirs)
    a.merge(b)
    want = Counter(mine)
    want.update(theirs)
    assert a.offenders == want and type(a.offenders) is Counter


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.dictionaries(
    st.sampled_from([b"198.18.0.1", b"::ffff:198.18.0.1", b"::FFFF:198.18.0.1",
                     b"2001:db8::1", b"2001:DB8:0::1", b"198.18.0.2", b"not-an-address"]),
    st.integers(1, 5)), min_size=1, max_size=3))
def test_merged_parts_settle_to_one_count_per_client(parts: list[dict[bytes, int]]) -> None:
    """Each part (a process's share) hands back its matches by the address as the log
    spells it; after the merge they are made canonical once: a client spelled two ways,
    or seen by two parts, is one offender with all its matches, and a spelling that is
    no address is a parse error per match."""
    want: Counter[str] = Counter()
    errors = 0
    merged = scan_module.ScanReport()
    for part in parts:
        report = scan_module.ScanReport()
        report.raw["rblsmtpd"] = Counter(part)
        merged.merge(report)
        for spelled, n in part.items():
            address = canonical_address(spelled.decode())
            if address is None:
                errors += n
            else:
                want[address] += n
    merged.settle()
    assert merged.offenders == want and merged.parse_errors == errors
    assert merged.by_rule == (Counter({"rblsmtpd": sum(want.values())}) if want else Counter())
    assert merged.raw == {}


def test_a_forked_scan_of_many_parts_gives_the_one_process_answer(tmp_path: Path) -> None:
    """Each process of a forked scan settles its whole share of parts at once (here
    several files each): the merged answer is the one of scanning them in turn."""
    scan_module._worker_scanner = scan_module.Scanner(
        scan_module.load_rules(None, explicit=False, require_enabled=True), connections=False)
    parts = []
    for seed in range(5):
        log = tmp_path / f"log{seed}"
        genlog.write_log(log, "tai64n", seed, lines=3000 + 500 * seed)
        parts += scan_module._parts(str(log), 1)
    answers = []
    for reports in (scan_module._forked(parts, 2), [scan_module._scan_part(p) for p in parts]):
        merged = scan_module.ScanReport()
        for report in reports:
            merged.merge(report)
        merged.settle()
        answers.append(merged.as_json(10, True))
    assert answers[0] == answers[1] and answers[0]["matches"] > 0
