"""`rblguard simulate` on small hand-made logs, with numbers worked out by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rblguard.commands.simulate import parse_threshold, parse_zones, simulate, zone_position

BASE = 0x4000000065A1D280  # a TAI64 label; +n is n seconds later


def stamp(seconds: int) -> str:
    return f"@{BASE + seconds:016x}00000000 "


def write_log(path: Path, events: list[tuple[int, str, str, str]]) -> None:
    """(second, kind, address, zone operator): kind 'pass' or 'reject'."""
    lines = []
    for pid, (t, kind, address, operator) in enumerate(events, 1):
        lines.append(f"{stamp(t)}tcpserver: pid {pid} from {address}")
        if kind == "reject":
            lines.append(f"{stamp(t)}rblsmtpd: {address} pid {pid}: 553 "
                         f"https://www.{operator}.org/query/ip/{address}")
        lines.append(f"{stamp(t)}tcpserver: end {pid} status 0")
    path.write_text("\n".join(lines) + "\n")


def test_ideal_bans_with_exact_counts(tmp_path: Path) -> None:
    log = tmp_path / "current"
    spam = [(t, "reject", "198.18.0.1", "spamhaus") for t in (0, 30, 60, 700, 4000)]
    spam2 = [(t, "reject", "198.18.0.2", "spamcop") for t in (10, 20)]
    legit = [(t, "pass", "192.0.2.7", "") for t in (5, 15, 25)]
    write_log(log, sorted(spam + spam2 + legit))
    result = simulate([str(log)], [600, 3600], (1, 3600), 2, [])
    # no banning: spamhaus rejects cost 1 query (zone 1), spamcop 2, legit 2 each
    assert result["connections"] == 10 and result["rejects"] == 7
    assert result["baseline"]["queries"] == 5 * 1 + 2 * 2 + 3 * 2
    ten_min, hour = result["policies"]
    # ban 10m: 198.18.0.1 pays at 0 and 700 and 4000 (bans from 0..600, 700..1300, ...);
    # 198.18.0.2 pays once (banned at 10 until 610); legit 6
    assert ten_min["queries"] == 3 + 2 + 6
    assert ten_min["connections_blocked"] == 2 + 1
    # ban 1h: 198.18.0.1 pays at 0 and 4000
    assert hour["queries"] == 2 + 2 + 6
    assert hour["cut_pct"] == pytest.approx(100 * (15 - 10) / 15, abs=0.01)


def test_threshold_and_rejects_without_connection_lines(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("".join(f"{stamp(t)}rblsmtpd: 198.18.0.9 pid {t}: 553 listed\n"
                           for t in (0, 10, 20, 30, 40)))
    result = simulate([str(log)], [3600], (3, 60), 2, [])
    assert result["baseline"]["queries"] == 5
    assert result["policies"][0]["queries"] == 3  # the third reject bans


def test_zone_parsing() -> None:
    assert parse_zones("2") == (2, [])
    assert parse_zones("zen.spamhaus.org, bl.spamcop.net") == (
        2, ["zen.spamhaus.org", "bl.spamcop.net"])
    assert zone_position("553 https://www.spamcop.net/bl.shtml", 2,
                         ["zen.spamhaus.org", "bl.spamcop.net"]) == 2
    assert parse_threshold("3/10m") == (3, 600.0)
    with pytest.raises(ValueError, match="N/WINDOW"):
        parse_threshold("3")


def test_cli_json_and_errors(tmp_path: Path) -> None:
    log = tmp_path / "current"
    write_log(log, [(0, "reject", "198.18.0.1", "spamhaus"), (5, "reject", "198.18.0.1",
                                                               "spamhaus")])
    run = [sys.executable, "-m", "rblguard", "simulate"]
    out = subprocess.run([*run, "--json", "--ban-time", "1h", str(log)], capture_output=True,
                         text=True, check=True)
    data = json.loads(out.stdout)
    assert data["baseline"]["queries"] == 2 and data["policies"][0]["queries"] == 1
    text = subprocess.run([*run, str(log)], capture_output=True, text=True, check=True).stdout
    assert "no banning" in text and "ban 1h" in text
    bad = subprocess.run([*run, "--ban-time", "5x", str(log)], capture_output=True, text=True)
    assert bad.returncode == 2 and "'5x' is not a duration" in bad.stderr


def test_a_rules_directory_that_is_not_there_is_an_error(tmp_path: Path) -> None:
    """A typo in --rules must not give a report of zero rejects."""
    log = tmp_path / "current"
    write_log(log, [(0, "reject", "198.18.0.1", "spamhaus")])
    out = subprocess.run([sys.executable, "-m", "rblguard", "simulate", "--rules",
                          str(tmp_path / "no-such-dir"), str(log)], capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert "no-such-dir" in out.stderr and "Traceback" not in out.stderr


def test_run_check_refuses_a_config_with_no_enabled_rule(tmp_path: Path) -> None:
    """shipped_rules off and a mistyped rules_dirs: the daemon would ban nothing."""
    config = tmp_path / "rblguard.yaml"
    config.write_text(f"shipped_rules: false\nrules_dirs: [{tmp_path / 'rulez.d'}]\n")
    out = subprocess.run([sys.executable, "-m", "rblguard", "run", "--config", str(config),
                          "--check"], capture_output=True, text=True)
    assert out.returncode == 2, out.stdout
    assert "no enabled rule" in out.stderr and "Traceback" not in out.stderr
