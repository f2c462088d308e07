"""The daemon for real: multilog, SIGKILL, SQLite, nftables in a namespace, the CLI."""

from __future__ import annotations

import concurrent.futures
import json
import random
import re
import subprocess
import time
from pathlib import Path

from tests.daemon_harness import reject_message, wait_for
from tests.multilog import Multilog
from tests.netns import run

NOISE = [
    "tcpserver: status: 3/40\n",
    "tcpserver: pid 7 from 192.0.2.44\n",
    "qmail-smtpd: HELO rblsmtpd: 203.0.113.9 pid 1: 553 x\n",
    "rblsmtpd: 192.0.2.45 pid 7: 451 temporary RBL lookup error\n",
    "rblsmtpd: 192.0.2.46 pid 7: 451 Error: open resolver; https://check.spamhaus.org/returnc/pub/203.0.113.53/\n",
    "rblsmtpd: 192.0.2.47 pid 7: greetdelay: 15\n",
]


def test_sigkill_at_random_points_loses_no_ban(harness, tmp_path: Path) -> None:
    """multilog rotates every few dozen lines while the daemon is killed and restarted."""
    rng = random.Random(7)
    harness.write_config()
    log = Multilog(tmp_path / "log", size=4096)
    harness.start()
    expected: set[str] = set()
    written: dict[str, float] = {}  # address -> when its one reject line was written
    try:
        for round_ in range(6):
            for i in range(150):
                address = f"198.18.{round_}.{i}"
                expected.add(address)
                written[address] = time.time()
                log.write(reject_message(address, pid=i))
                log.write(rng.choice(NOISE))
            time.sleep(rng.uniform(0.0, 0.3))
            if round_ < 5:
                harness.kill()
                if rng.random() < 0.5:  # sometimes lines arrive while it is down
                    for i in range(150, 180):
                        address = f"198.18.{round_}.{i}"
                        expected.add(address)
                        written[address] = time.time()
                        log.write(reject_message(address, pid=i))
                harness.start()
        wait_for(lambda: harness.kernel_elements() >= expected, 20, "every ban in the kernel")
        wait_for(lambda: harness.state_bans() >= expected, 10, "every ban in SQLite")
    finally:
        log.close()
    rotated = list((tmp_path / "log").glob("@*.s"))
    assert len(rotated) > 10, "multilog should have rotated many times"
    assert harness.kernel_elements() == expected
    assert harness.state_bans() == expected
    assert not any("192.0.2." in e for e in harness.kernel_elements())
    # No line counted twice: a line re-read after a kill only refreshes its own ban (the
    # same end), while a second count would be a repeat offence with a 2 h ban.
    from rblguard.store.state import State

    with State(harness.config["state_dir"]) as state:
        history = {o.target: o.bans for o in state.load_history()}
        lengths = {b.target: b.until - t for b in state.load_bans(time.time())
                   if (t := written.get(b.target)) is not None}
    assert {history[a] for a in expected} == {1}
    assert len(lengths) == len(expected)
    assert all(3599 <= length <= 3601 for length in lengths.values()), \
        sorted(lengths.values())[-3:]


def test_repeat_lines_after_restart_are_not_counted_twice(harness, tmp_path: Path) -> None:
    """A clean restart resumes exactly at the saved position: no ban is logged twice."""
    harness.write_config()
    log = Multilog(tmp_path / "log", size=2000)
    harness.start()
    try:
        for i in range(60):
            log.write(reject_message(f"198.19.1.{i}"))
        wait_for(lambda: len(harness.kernel_elements()) == 60, what="60 bans")
        harness.kill(15)  # SIGTERM: a clean stop
        harness.start()
        before = time.time()
        for i in range(60, 80):
            log.write(reject_message(f"198.19.1.{i}"))
        wait_for(lambda: len(harness.kernel_elements()) == 80, what="80 bans")
        # status reads the last line's time from the last chunk, when asked
        last_time = harness.cli("status", "--json")["sources"][0]["last_time"]
        assert before - 0.01 <= last_time <= time.time(), (before, last_time)
    finally:
        log.close()
    logs = "".join(p.read_text() for p in tmp_path.glob("daemon-*.log"))
    for i in range(80):
        assert logs.count(f"ban 198.19.1.{i} ") == 1, f"198.19.1.{i} banned twice"


def test_control_ban_unban_list_flush_and_allowlist(harness, tmp_path: Path) -> None:
    harness.write_config(allowlist=["198.51.100.0/24"], metrics="127.0.0.1:19733")
    (tmp_path / "log").mkdir()
    harness.start()
    out = harness.cli("ban", "203.0.113.5", "--for", "10m", "--reason", "by hand")
    assert "203.0.113.5" in out
    assert "203.0.113.5" in harness.kernel_elements()
    listed = harness.cli("list", "--json")
    assert [b["target"] for b in listed["bans"]] == ["203.0.113.5"]
    assert 590 < listed["bans"][0]["remaining_s"] <= 600

    refused = subprocess.run(
        ["python3", "-m", "rblguard", "ban", "--socket", harness.socket, "198.51.100.9"],
        capture_output=True, text=True)
    assert refused.returncode == 1 and "allowlist" in refused.stderr
    assert "198.51.100.9" not in harness.kernel_elements()

    harness.cli("unban", "203.0.113.5")
    assert "203.0.113.5" not in harness.kernel_elements()
    harness.cli("ban", "2001:db8:1:2::7")  # an admin's ban is exactly what was asked
    assert "2001:db8:1:2::7" in harness.kernel_elements()
    harness.cli("ban", "2001:db8:9::/48")
    assert "2001:db8:9::/48" in harness.kernel_elements()
    harness.cli("flush")
    assert harness.kernel_elements() == set()
    assert harness.cli("list", "--json")["bans"] == []
    from tests.test_metrics import netns_fetch

    text = netns_fetch(harness.ns)("http://127.0.0.1:19733/metrics")
    lifted = dict(re.findall(r'^rblguard_unbans_total\{reason="(\w+)"\} (\S+)$', text,
                             re.MULTILINE))
    assert lifted == {"manual": "1.0", "allowlisted": "0.0", "flush": "2.0"}


def test_allowlisted_and_tcprules_addresses_are_never_banned(harness, tmp_path: Path) -> None:
    tcprules = tmp_path / "tcp.smtp"
    tcprules.write_text('192.0.2.10:allow,RELAYCLIENT=""\n198.51.100.7-19:allow,RELAYCLIENT=""\n'
                        ":allow\n")
    harness.write_config(allowlist=["203.0.113.0/28"], tcprules=str(tcprules))
    log = Multilog(tmp_path / "log")
    harness.start()
    try:
        for address in ("192.0.2.10", "198.51.100.12", "203.0.113.3", "198.18.9.9"):
            log.write(reject_message(address))
        wait_for(lambda: "198.18.9.9" in harness.kernel_elements(), what="the one real ban")
        # A tcprules edit is picked up without a restart.
        reloads = harness.log().count("reloaded ")
        tcprules.write_text('198.18.7.0/24\n198.18.7.:allow,RELAYCLIENT=""\n')
        wait_for(lambda: harness.log().count("reloaded ") > reloads, what="the tcprules reload")
        log.write(reject_message("198.18.7.7"))
        log.write(reject_message("198.18.9.10"))
        wait_for(lambda: "198.18.9.10" in harness.kernel_elements(), what="a later ban")
    finally:
        log.close()
    assert harness.kernel_elements() == {"198.18.9.9", "198.18.9.10"}


def test_bad_rule_edit_keeps_old_rules_and_good_edit_applies(harness, tmp_path: Path) -> None:
    harness.write_config()
    log = Multilog(tmp_path / "log")
    harness.start()
    rules_d = tmp_path / "rules.d"
    try:
        (rules_d / "mine.yaml").write_text("rules:\n  - name: x\n    match: 'no address'\n")
        wait_for(lambda: "mine.yaml:3" in harness.log(), 10, "the reload error in the log")
        log.write(reject_message("198.18.3.3"))
        wait_for(lambda: "198.18.3.3" in harness.kernel_elements(), what="old rules still ban")
        (rules_d / "mine.yaml").write_text(
            "rules:\n  - name: custom554\n    match: 'rblsmtpd: <ADDR> pid \\d+: 554 '\n"
            "samples:\n  - line: 'rblsmtpd: 198.18.0.1 pid 1: 554 x'\n    ban: 198.18.0.1\n")
        # the shipped rblsmtpd and qmail-smtpd rules, and this one
        wait_for(lambda: "reloaded 3 rule(s)" in harness.log(), 10, "the good reload")
        log.write("rblsmtpd: 198.18.4.4 pid 9: 554 blocked\n")
        wait_for(lambda: "198.18.4.4" in harness.kernel_elements(), what="the new rule bans")
    finally:
        log.close()
    assert harness.proc is not None and harness.proc.poll() is None


def test_self_repair_after_nft_flush_ruleset(harness, tmp_path: Path) -> None:
    harness.write_config()
    (tmp_path / "log").mkdir()
    harness.start()
    for i in range(5):
        harness.cli("ban", f"198.18.50.{i}")
    run(["ip", "netns", "exec", harness.ns, "nft", "flush", "ruleset"])
    assert harness.kernel_elements() == set()
    wait_for(lambda: len(harness.kernel_elements()) == 5, 10, "self-repair within 10 s")


def test_concurrent_cli_calls_and_socket_permissions(harness, tmp_path: Path) -> None:
    harness.write_config()
    (tmp_path / "log").mkdir()
    harness.start()
    mode = Path(harness.socket).stat().st_mode & 0o777
    assert mode == 0o600
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: harness.cli("ban", f"198.18.60.{i}"), range(24)))
    assert len(results) == 24
    assert len(harness.kernel_elements()) == 24
    status = harness.cli("status", "--json")
    assert status["active_bans"]["ipv4"] == 24
    assert status["backend"]["healthy"] is True


def test_unwritable_state_dir_keeps_banning(harness, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    harness.write_config(state_dir=str(blocker / "state"))
    log = Multilog(tmp_path / "log")
    harness.start()
    try:
        log.write(reject_message("198.18.70.1"))
        wait_for(lambda: "198.18.70.1" in harness.kernel_elements(), what="a ban without state")
    finally:
        log.close()
    assert "running without saved state" in harness.log()
    assert str(blocker) in harness.log()


def test_a_repeat_reject_restarts_the_kernel_clock(harness, tmp_path: Path) -> None:
    """A new ban's element is added with its time; a reject while it runs resets that
    time in the kernel (nftables needs "expires" for that, which new bans skip)."""
    harness.write_config(ban_time="30s", repeat=False)
    log = Multilog(tmp_path / "log")
    harness.start()

    def expires(address: str) -> float | None:
        out = run(["ip", "netns", "exec", harness.ns, "nft", "-j", "list", "set", "inet",
                   "rblguard", "v4"]).stdout
        for item in json.loads(out)["nftables"]:
            for elem in item.get("set", {}).get("elem", []):
                if isinstance(elem, dict) and elem["elem"]["val"] == address:
                    return elem["elem"].get("expires")
        return None

    try:
        log.write(reject_message("198.18.7.7"))
        wait_for(lambda: expires("198.18.7.7") is not None, what="the first ban")
        assert 27 <= expires("198.18.7.7") <= 30
        wait_for(lambda: (expires("198.18.7.7") or 30) <= 26, 10, "its clock to run")
        log.write(reject_message("198.18.7.7", pid=2))
        wait_for(lambda: (expires("198.18.7.7") or 0) >= 28, 5, "the clock to restart")
    finally:
        log.close()
