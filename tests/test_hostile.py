"""Hostile input, as an attacker or a careless admin would write it.

Each case is something that once stalled the daemon, blew its memory or hid a reject
(a followed path turned FIFO, a catastrophic rule, a YAML alias bomb, a huge first
line, a rule file that is not UTF-8, a full or idle control socket), or that held and
must keep holding (huge lines, NUL bytes, invalid UTF-8, client text imitating a
reject, garbage control requests).  The daemon cases run a real daemon in a namespace.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rblguard.daemon.control import ControlServer, Unreachable, request
from rblguard.matching.rules import shipped_rules_dir
from tests.daemon_harness import reject_message, tai64n, wait_for

EVIL_RULES = r"""
rules:
  - name: evil
    match: 'evil-smtpd: <ADDR> pid (\d+)+x$'
samples:
  - line: 'evil-smtpd: 192.0.2.8 pid 12x'
    ban: 192.0.2.8
"""
HOSTILE_LINE = "evil-smtpd: 192.0.2.9 pid " + "1" * 100_000 + "\n"

BOMB = "a: &a [" + ",".join(['"lol"'] * 9) + "]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n"
    for i in range(8))


def rblguard(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rblguard", *args], capture_output=True,
                          text=True, timeout=timeout)


def append(h, *messages: str) -> None:
    with open(h.workdir / "log" / "current", "a") as f:
        for message in messages:
            f.write(tai64n() + message)


def banned_within(h, address: str, seconds: float) -> None:
    wait_for(lambda: address in h.kernel_elements(), timeout=seconds, what=f"{address} banned")


# -- the daemon ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "dangling symlink"])
def test_a_followed_path_that_is_no_log_file_blocks_nothing(log_harness, tmp_path: Path,
                                                            kind: str) -> None:
    odd = tmp_path / "odd.log"
    odd.write_text("")
    log_harness.write_config(sources=[{"path": str(tmp_path / "log")}, {"path": str(odd)}])
    log_harness.start()
    odd.unlink()
    if kind == "fifo":
        os.mkfifo(odd)
    elif kind == "device":
        os.mknod(odd, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: never ends
    elif kind == "directory":
        odd.mkdir()
    else:
        odd.symlink_to(tmp_path / "nowhere")
    with open(tmp_path / "other.log", "w") as f:
        f.write("poke\n")  # wake the watcher on the odd path's directory, too
    for i in range(1, 4):
        append(log_harness, reject_message(f"192.0.2.{i}"))
        banned_within(log_harness, f"192.0.2.{i}", 5)
        started = time.monotonic()
        log_harness.cli("status", "--json")
        assert time.monotonic() - started < 1.0
    expected = {"fifo": "is a FIFO", "device": "is a character device",
                "directory": "is a directory", "dangling symlink": "is a dangling symlink"}
    said = f"{odd} {expected[kind]}"
    wait_for(lambda: said in log_harness.log(), what="the path's problem logged")
    assert log_harness.log().count(said) == 1  # said once, not at every wake-up


def test_a_catastrophic_rule_cannot_stall_the_daemon(log_harness, tmp_path: Path) -> None:
    (tmp_path / "rules.d" / "evil.yaml").write_text(EVIL_RULES)
    log_harness.write_config()
    log_harness.start()
    append(log_harness, HOSTILE_LINE, reject_message("192.0.2.20"))
    started = time.monotonic()
    banned_within(log_harness, "192.0.2.20", 1.0)
    log_harness.cli("status", "--json")
    assert time.monotonic() - started < 1.5
    wait_for(lambda: "rule evil took over" in log_harness.log(), what="the slow rule named")
    assert "evil.yaml:3:" in log_harness.log()


def test_client_text_and_garbage_in_the_log_hide_no_reject(log_harness, tmp_path: Path) -> None:
    """The cases that held: a 20 MB line, NUL bytes, invalid UTF-8, imitated rejects."""
    log_harness.write_config()
    log_harness.start()
    with open(tmp_path / "log" / "current", "ab") as f:
        f.write(tai64n().encode() + b"x" * (20 << 20) + b"\n")
        f.write(tai64n().encode() + b"rblsmtpd: \0\0 pid 1: 553 \xff\xfe\n")
        f.write(tai64n().encode() + b"qmail-smtpd: HELO rblsmtpd: 203.0.113.9 pid 1: 553 x\n")
        f.write(tai64n().encode() + reject_message("192.0.2.30").encode())
    banned_within(log_harness, "192.0.2.30", 10)
    assert "203.0.113.9" not in log_harness.kernel_elements()
    log_harness.cli("status", "--json")


def test_garbage_and_oversized_control_requests_get_an_answer(log_harness) -> None:
    log_harness.write_config()
    log_harness.start()
    for payload in (b"\xff\xfe garbage\n", b'{"cmd": "ban", "target": 7}\n',
                    b"[1, 2, 3]\n", b'{"cmd": "status"' + b" " * (70 << 10) + b"}\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(log_harness.socket)
            s.sendall(payload)
            answer = json.loads(s.makefile("rb").readline())
            assert answer["ok"] is False and answer["error"]
    log_harness.cli("status", "--json")


# -- files and commands (no root) -----------------------------------------------------


def test_a_yaml_alias_bomb_is_refused_fast_and_small(tmp_path: Path) -> None:
    config = tmp_path / "bomb.yaml"
    config.write_text(BOMB)
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "bomb.yaml").write_text("rules:\n  - name: x\n    match: 'x: <ADDR> '\n" + BOMB)
    for args in (["run", "--check", "--config", str(config)],
                 ["test-rules", "--rules", str(rules)]):
        started = time.monotonic()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "rblguard",
                               *args], capture_output=True, text=True, timeout=30)
        assert time.monotonic() - started < 1.0 + 2.0  # interpreter start on a busy host
        assert proc.returncode == 2
        assert "alias bomb" in proc.stderr and "Traceback" not in proc.stderr
        assert int(proc.stderr.strip().splitlines()[-1]) < 100_000  # KB


def test_a_rule_file_that_is_not_utf8_is_named_by_line(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_bytes(b"rules:\n  - name: x\n    match: 'rblsmtpd: \xff'\n")
    proc = rblguard("test-rules", "--rules", str(tmp_path))
    assert proc.returncode == 2
    assert f"{tmp_path / 'r.yaml'}:3: not UTF-8 (byte 0xff at column 23)" in proc.stderr


def test_scan_counts_every_reject_after_a_megabyte_first_line(tmp_path: Path) -> None:
    log = tmp_path / "current"
    with open(log, "w") as f:
        f.write(tai64n() + "x" * (1 << 20) + "\n")
        for i in range(1, 51):
            f.write(tai64n() + reject_message(f"192.0.2.{i}"))
    report = json.loads(rblguard("scan", "--json", str(log)).stdout)
    assert report["matches"] == 50


def test_scan_and_test_rules_on_a_hostile_line_finish_fast(tmp_path: Path) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "evil.yaml").write_text(EVIL_RULES)
    (rules / "rblsmtpd.yaml").write_bytes((shipped_rules_dir() / "rblsmtpd.yaml").read_bytes())
    log = tmp_path / "current"
    log.write_text(tai64n() + HOSTILE_LINE + tai64n() + reject_message("192.0.2.40"))
    for args in (["scan", "--json", "--rules", str(rules), str(log)],
                 ["test-rules", "--rules", str(rules), str(log)]):
        started = time.monotonic()
        proc = rblguard(*args)
        assert time.monotonic() - started < 2.0 + 1.0  # interpreter start on a busy host
        assert "Traceback" not in proc.stderr
        if args[0] == "scan":
            assert json.loads(proc.stdout)["matches"] == 1  # the reject after it


def test_idle_connections_do_not_lock_the_admin_out(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    server = ControlServer(path, lambda req: {"cmd": req["cmd"]})
    server.start()
    idle = []
    try:
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            idle.append(s)
        started = time.monotonic()
        assert request(path, {"cmd": "status"}, timeout=5) == {"cmd": "status"}
        assert time.monotonic() - started < 2.0
    finally:
        for s in idle:
            s.close()
        server.stop()


def test_a_full_listen_queue_is_a_clear_error(tmp_path: Path) -> None:
    path = str(tmp_path / "stuck.sock")
    stuck = socket.socket(socket.AF_UNIX)
    stuck.bind(path)
    stuck.listen(0)  # never accepts: its queue fills at once
    queued = []
    try:
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
        with pytest.raises(Unreachable, match="did not answer within"):
            request(path, {"cmd": "status"}, timeout=0.5)
    finally:
        for s in queued:
            s.close()
        stuck.close()
