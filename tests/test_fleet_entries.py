"""Fleet config and entries, without Redis or root: what is accepted, what is refused, why."""

from __future__ import annotations

from pathlib import Path

import pytest

from rblguard.config import ConfigError, parse_config
from rblguard.fleet.entries import (
    ForeignBan,
    Refusal,
    canonical_target,
    parse_entry,
    parse_id,
    parse_snapshot_member,
    stream_fields,
)
from rblguard.fleet.guard import OriginGuard
from rblguard.fleet.settings import FleetSettings

SETTINGS = FleetSettings(redis="redis://127.0.0.1:6379/0", name="mx2")


def fleet(text: str, tmp_path: Path) -> FleetSettings | None:
    return parse_config(text, tmp_path / "rblguard.yaml").fleet


def test_off_by_default_and_the_minimal_block(tmp_path: Path) -> None:
    assert parse_config("ban_time: 1h\n").fleet is None
    got = fleet("fleet:\n  redis: redis://hub.example:6379/0\n  name: mx1\n", tmp_path)
    assert got == FleetSettings(redis="redis://hub.example:6379/0", name="mx1")
    assert got.hub == "redis://hub.example:6379/0" and got.password() is None
    default = fleet("fleet:\n  redis: unix:///run/redis/redis.sock\n", tmp_path)
    assert default is not None and default.name  # the host name


def test_every_key(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    got = fleet("""\
fleet:
  sentinels: [s1.example:26379, "[2001:db8::5]:26379"]
  service: rblguard
  name: mx-3.a
  username: rblguard
  password_file: pw
  tls: {ca: ca.pem, cert: cert.pem, key: key.pem, check_hostname: false}
  prefix: "site1:"
  max_duration: 2d
  origin_max_per_second: 20000
  quarantine: 10m
  queue_max: 5000
  timeout: 0.5
""", tmp_path)
    assert got is not None
    assert got.sentinels == (("s1.example", 26379), ("2001:db8::5", 26379))
    assert got.hub == "sentinel://s1.example:26379,2001:db8::5:26379/rblguard"
    assert got.password() == "s3cret"  # read from the file, without its newline
    assert got.tls is not None and got.tls.cert == str(tmp_path / "cert.pem")
    assert not got.tls.check_hostname
    assert (got.prefix, got.max_duration, got.quarantine) == ("site1:", 172800.0, 600.0)
    assert (got.origin_max_per_second, got.queue_max, got.timeout) == (20000.0, 5000, 0.5)


@pytest.mark.parametrize(("block", "line", "problem"), [
    ("  redis: http://hub:6379\n", 2, "fleet.redis: 'http://hub:6379' must start with"),
    ("  redis: redis://:pw@hub:6379\n", 2, "fleet.redis: must not hold a password"),
    ("  redis: unix://relative.sock\n", 2, "needs an absolute socket path"),
    ("  redis: redis://hub:6379/99\n", 2, "database '99' must be a number from 0 to 15"),
    ("  name: mx1\n", 1, "fleet: needs redis:"),
    ("  redis: redis://hub\n  name: 'mx 1'\n", 3, "fleet.name: 'mx 1' must be letters"),
    ("  redis: redis://hub\n  reddis: x\n", 3, "fleet.reddis: unknown key"),
    ("  redis: redis://hub\n  password_file: /nonexistent/pw\n", 3, "is not a readable file"),
    ("  redis: redis://hub\n  tls: {ca: /nonexistent}\n", 3, "fleet.tls: needs a rediss://"),
    ("  sentinels: [s1:26379]\n", 2, "fleet.sentinels: needs service:"),
    ("  sentinels: [s1]\n  service: x\n", 2, "fleet.sentinels[0]: 's1' must be host:port"),
    ("  redis: redis://hub\n  sentinels: [s1:1]\n  service: x\n", 3, "not both"),
    ("  redis: redis://hub\n  max_duration: forever\n", 3, "fleet.max_duration"),
    ("  redis: redis://hub\n  queue_max: 1\n", 3, "fleet.queue_max: must be between"),
])
def test_bad_blocks_name_file_line_key_and_problem(tmp_path: Path, block: str, line: int,
                                                   problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        fleet("fleet:\n" + block, tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'rblguard.yaml'}: line {line}: "), message
    assert problem in message, message


def test_run_check_checks_the_fleet_block(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from rblguard.commands.cli import main

    config = tmp_path / "rblguard.yaml"
    config.write_text("shipped_rules: true\nrules_dirs: []\nfleet:\n"
                      "  redis: redis://hub.example:6379/0\n  name: mx1\n")
    assert main(["run", "--check", "--config", str(config)]) == 0
    assert "fleet member mx1 of redis://hub.example:6379/0" in capsys.readouterr().out
    config.write_text("fleet:\n  redis: redis://hub.example:6379/0\n  prefix: 'a b'\n")
    assert main(["run", "--check", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rblguard: {config}: line 3: fleet.prefix: 'a b' must be"), err
    assert "\n" not in err


def raw(target: str = "198.51.100.7", seconds: str = "3600", rule: str = "spamhaus",
        origin: str = "mx1", version: str = "1") -> dict[bytes, bytes]:
    fields = stream_fields(target, int(seconds) if seconds.isdigit() else 0, rule, origin)
    fields.update({"s": seconds, "v": version})
    return {k.encode(): v.encode() for k, v in fields.items()}


def test_a_good_entry_ends_at_its_stream_time_plus_its_seconds() -> None:
    assert parse_entry(raw(), 1_000_000, SETTINGS) == ForeignBan(
        "198.51.100.7", 1_000_000 + 3_600_000, "spamhaus", "mx1", written_ms=1_000_000)
    assert parse_entry(raw("2001:db8:1:2::/64"), 0, SETTINGS).target == "2001:db8:1:2::/64"
    assert parse_entry(raw("198.51.100.9/24"), 0, SETTINGS).target == "198.51.100.0/24"
    assert parse_entry(raw("2001:DB8::0001"), 0, SETTINGS).target == "2001:db8::1"


def test_own_entries_are_never_applied_again() -> None:  # no echo
    assert parse_entry(raw(origin="mx2"), 0, SETTINGS) is None


@pytest.mark.parametrize(("fields", "reason"), [
    (raw("0.0.0.0/0"), "too_wide"),
    (raw("::/0"), "too_wide"),
    (raw("198.18.0.0/23"), "too_wide"),
    (raw("2001:db8::/47"), "too_wide"),
    (raw(seconds=str(10 * 365 * 86400)), "too_long"),
    (raw(seconds="0"), "malformed"),
    (raw(seconds="-5"), "malformed"),
    (raw(seconds="1e9"), "malformed"),
    (raw("not-an-address"), "malformed"),
    (raw("::ffff:198.51.100.0/120"), "malformed"),
    (raw(rule="a b"), "malformed"),
    (raw(origin="../../etc"), "malformed"),
    (raw(version="2"), "malformed"),
    ({b"t": b"198.51.100.7"}, "malformed"),
    ({b"v": b"1", b"t": b"\xff", b"s": b"60", b"r": b"x", b"o": b"mx1"}, "malformed"),
])
def test_hostile_entries_are_refused_with_a_reason(fields: dict[bytes, bytes],
                                                   reason: str) -> None:
    got = parse_entry(fields, 0, SETTINGS)
    assert isinstance(got, Refusal) and got.reason == reason, got


def test_snapshot_rows_get_the_same_checks() -> None:
    now = 5_000_000
    good = parse_snapshot_member(b"198.51.100.7|spamhaus|mx1", now + 60_000, now, SETTINGS)
    assert good == ForeignBan("198.51.100.7", now + 60_000, "spamhaus", "mx1")
    assert parse_snapshot_member(b"198.51.100.7|spamhaus|mx2", now + 60_000, now,
                                 SETTINGS) is None
    assert parse_snapshot_member(b"0.0.0.0/0|x|mx1", now + 60_000, now,
                                 SETTINGS).reason == "too_wide"
    assert parse_snapshot_member(b"198.51.100.7|x|mx1", now - 1, now,
                                 SETTINGS).reason == "expired"
    assert parse_snapshot_member(b"garbage", now + 1, now, SETTINGS).reason == "malformed"


def test_stream_ids_and_targets() -> None:
    assert parse_id(b"1700000000123-4") == (1700000000123, 4)
    assert parse_id("5") == (5, 0)
    assert parse_id(b"x-1") is None and parse_id("1-x") is None
    assert canonical_target("198.51.100.7/32") == "198.51.100.7"
    assert canonical_target("nonsense") is None


def test_an_origin_over_its_cap_is_quarantined_then_obeyed_again() -> None:
    guard = OriginGuard(rate=10_000, quarantine=60)
    # a legitimate wave: 5,000 a second for 20 s (100,000 bans) all pass
    assert all(guard.admit("mx1", i // 5) is None for i in range(100_000))
    # a flood: 50,000 in one second
    verdicts = [guard.admit("mx3", 1000 + i // 50) for i in range(50_000)]
    assert verdicts.count("rate") == 1 and verdicts.count(None) < 20_000
    assert verdicts[-1] == "quarantined" and guard.is_quarantined("mx3", 2000)
    assert guard.admit("mx1", 20_000) is None  # others unaffected
    assert guard.active(2000)["mx3"] <= 2000 + 60_000
    assert guard.admit("mx3", 2000 + 60_000) is None  # the quarantine ended
    assert guard.active(2000 + 60_000) == {}
