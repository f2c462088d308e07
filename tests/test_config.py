"""Config: defaults, every key's parsing, and errors that name file, line, key and problem."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml

from rblguard.config import (
    Config,
    ConfigError,
    ListenAddress,
    RepeatSettings,
    SubnetSettings,
    load_config,
    parse_config,
)
from rblguard.firewall.base import FirewallOptions

EXAMPLE = Path(__file__).resolve().parent.parent / "rblguard.example.yaml"


def test_missing_file_means_defaults_unless_it_must_exist(tmp_path: Path) -> None:
    cfg = load_config(tmp_path / "absent.yaml", must_exist=False)  # as the default path
    assert cfg == Config()
    assert cfg.ban_time == 3600.0
    assert cfg.backend == FirewallOptions()
    assert cfg.metrics == ListenAddress("127.0.0.1", 9731)
    assert cfg.storm.max_active >= 1_000_000 and cfg.storm.max_per_second >= 1000
    with pytest.raises(ConfigError, match=r"absent\.yaml: no such file"):
        load_config(tmp_path / "absent.yaml")  # a path the admin named must exist


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("# nothing yet\n")
    assert load_config(tmp_path / "c.yaml") == Config()


def test_every_key(tmp_path: Path) -> None:
    text = """
sources:
  - path: /var/log/qmail/smtpd
  - {path: logs/current}
rules_dirs: [rules.d]
shipped_rules: false
backend: {type: ipset, ports: [587, 25, 25], set_v4: bad4, set_v6: bad6, maxelem: 200000,
          mode: set-only, chain: RG}
ban_time: 90m
repeat: {factor: 3, max: 2d, forget_after: 10d}
ipv6_prefix: 56
ipv4_subnet: {after: 5}
storm: {max_active: 1000, max_per_second: 10}
allowlist: [192.0.2.10, "198.51.100.0/24", "2001:db8::/48"]
tcprules: /home/vpopmail/etc/tcp.smtp
state_dir: state
control_socket: /run/rg.sock
metrics: "[::1]:9100"
dnsbl: {zones: 3, connections_per_day: 50000, queries_per_day: 150000}
log_level: DEBUG
"""
    path = tmp_path / "rblguard.yaml"
    path.write_text(text)
    cfg = load_config(path, must_exist=True)
    assert cfg.sources == ("/var/log/qmail/smtpd", str(tmp_path / "logs/current"))
    assert cfg.source_paths == list(cfg.sources)
    assert cfg.rules_dirs == (str(tmp_path / "rules.d"),)
    assert cfg.shipped_rules is False
    assert cfg.backend == FirewallOptions(backend="ipset", ports=(25, 587), set_v4="bad4",
                                           set_v6="bad6", maxelem=200000, mode="set-only",
                                           chain="RG")
    assert cfg.ban_time == 5400.0
    assert cfg.repeat == RepeatSettings(3.0, 2 * 86400.0, 10 * 86400.0)
    assert cfg.ipv6_prefix == 56
    assert cfg.ipv4_subnet == SubnetSettings(after=5, prefix=24)
    assert (cfg.storm.max_active, cfg.storm.max_per_second) == (1000, 10.0)
    assert cfg.allowlist[1] == ipaddress.ip_network("198.51.100.0/24")
    assert cfg.tcprules == "/home/vpopmail/etc/tcp.smtp"
    assert cfg.state_dir == str(tmp_path / "state")
    assert cfg.metrics == ListenAddress("::1", 9100) and str(cfg.metrics) == "[::1]:9100"
    assert (cfg.dnsbl.zones, cfg.dnsbl.queries_per_day) == (3, 150000)
    assert cfg.log_level == "debug"


def test_off_values_and_shorthands() -> None:
    cfg = parse_config("backend: ipset\nrepeat: off\nmetrics: off\nipv4_subnet: off\n"
                       "backend: {ports: all}\n")
    assert cfg.backend.ports is None and cfg.backend.backend == "nftables"
    assert cfg.repeat is None and cfg.metrics is None and cfg.ipv4_subnet is None
    assert parse_config("backend: ipset").backend.backend == "ipset"


def test_equality_tells_a_reload_what_changed() -> None:
    a = parse_config("ban_time: 1h\nallowlist: [192.0.2.1]\n", "/a.yaml")
    b = parse_config("ban_time: 60m\nallowlist: [192.0.2.1]\n", "/b.yaml")
    c = parse_config("ban_time: 2h\nallowlist: [192.0.2.2]\n")
    assert a == b  # same meaning, different spelling and file
    assert a.changed(c) == ["ban_time", "allowlist"]
    assert {a, b, c} == {a, c}  # hashable: frozen all the way down


@pytest.mark.parametrize(("text", "expected"), [
    ("bakend: ipset\n", r"line 1: bakend: unknown key .*did you mean 'backend'"),
    ("backend:\n  type: nftables\n  ports: [25, 70000]\n",
     r"line 3: backend.ports\[1\]: must be between 1 and 65535, not 70000"),
    ("backend:\n  port: [25]\n", r"line 2: backend.port: unknown key.*did you mean 'ports'"),
    ("backend: iptables\n", r"line 1: backend: must be nftables or ipset, not 'iptables'"),
    ("backend: {table: 'bad name'}\n", r"backend.table: 'bad name' is not a valid name"),
    ("backend: {mode: all}\n", r"backend.mode: must be rules or set-only"),
    ("backend: {set_v4: same, set_v6: same}\n", r"backend.set_v6: must differ"),
    ("ban_time: soon\n", r"line 1: ban_time: 'soon' is not a duration"),
    ("ban_time: 0\n", r"ban_time: .*greater than zero"),
    ("repeat: {factor: 0.5}\n", r"repeat.factor: must be at least 1.0"),
    ("repeat: {max: forever}\n", r"repeat.max: 'forever' is not a duration"),
    # durations are finite, positive and at most 365d: .inf once crashed the daemon
    ("ban_time: .inf\n", r"line 1: ban_time: inf: a duration must be finite"),
    ("ban_time: .nan\n", r"line 1: ban_time: nan is not a duration"),
    ("ban_time: -.inf\n", r"ban_time: -inf: a duration must be greater than zero"),
    ("ban_time: 1.0e+300\n", r"ban_time: .*must be finite and at most 365d"),
    ("ban_time: 400d\n", r"ban_time: '400d': a duration must be finite and at most 365d"),
    ("ban_time: " + "9" * 400 + "w\n", r"ban_time: .*must be finite and at most 365d"),
    ("repeat:\n  forget_after: .inf\n", r"line 2: repeat.forget_after: inf: .*finite"),
    ("repeat:\n  max: .nan\n", r"line 2: repeat.max: nan is not a duration"),
    ("repeat: {factor: .inf}\n", r"repeat.factor: must be a finite number, not inf"),
    ("repeat: {factor: .nan}\n", r"repeat.factor: must be a finite number, not nan"),
    ("repeat: {factor: 1.0e+6}\n", r"repeat.factor: must be at most 1000"),
    ("storm: {max_per_second: .nan}\n", r"storm.max_per_second: must be a finite number"),
    ("storm: {max_per_second: .inf}\n", r"storm.max_per_second: must be a finite number"),
    ("ipv6_prefix: 129\n", r"ipv6_prefix: must be between 32 and 128, not 129"),
    ("ipv6_prefix: '64'\n", r"ipv6_prefix: must be a whole number"),
    ("ipv4_subnet: {prefix: 24}\n", r"ipv4_subnet: needs after"),
    ("storm: {max_active: 0}\n", r"storm.max_active: must be between 1"),
    ("allowlist:\n  - 192.0.2.1\n  - 192.0.2.300\n",
     r"line 3: allowlist\[1\]: '192.0.2.300' is not an address or CIDR network"),
    ("sources: []\n", r"sources: needs at least one source"),
    ("sources:\n  - {pth: x}\n", r"line 2: sources\[0\].pth: unknown key.*did you mean 'path'"),
    ("sources:\n  - {}\n", r"sources\[0\]: needs a path"),
    ("sources: [{path: a}, {path: a}]\n", r"sources: names the same path twice"),
    ("metrics: localhost\n", r"metrics: 'localhost' must be host:port"),
    ("metrics: '[nonsense]:80'\n", r"metrics: 'nonsense' is not|must be host:port"),
    ("metrics: 127.0.0.1:99999\n", r"metrics: port 99999 must be between"),
    ("dnsbl: {zones: -1}\n", r"dnsbl.zones: must be between 1 and 64"),
    ("log_level: loud\n", r"log_level: must be one of debug, info, warning, error"),
    ("shipped_rules: maybe\n", r"shipped_rules: must be true or false"),
    ("- just\n- a list\n", r"the config must be a mapping"),
    ("ban_time: [1h\n", r"line 2: not valid YAML"),
    ("a:\n\tb: 1\n", r"line 2: not valid YAML"),
])
def test_errors_name_file_line_key_and_problem(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        parse_config(text, "/etc/rblguard/rblguard.yaml")
    assert str(info.value).startswith("/etc/rblguard/rblguard.yaml")


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"bin\.yaml:1: not UTF-8 \(byte 0xff at column 1\)"):
        load_config(tmp_path / "bin.yaml")


def test_example_config_loads_and_states_the_defaults() -> None:
    """The shipped example is valid and, where it sets a key, sets the documented default."""
    cfg = load_config(EXAMPLE, must_exist=True)
    data = yaml.safe_load(EXAMPLE.read_text())
    defaults = Config()
    assert cfg.backend == defaults.backend
    assert cfg.ban_time == defaults.ban_time and cfg.repeat == defaults.repeat
    assert cfg.storm == defaults.storm and cfg.dnsbl == defaults.dnsbl
    assert cfg.metrics == defaults.metrics and cfg.state_dir == defaults.state_dir
    assert cfg.sources == defaults.sources and cfg.ipv6_prefix == defaults.ipv6_prefix
    assert set(data) >= {"sources", "backend", "ban_time", "repeat", "allowlist", "storm"}


@pytest.mark.parametrize("command", [["run", "--check"], ["status"], ["list"], ["reload"],
                                     ["flush"], ["ban", "192.0.2.1"], ["unban", "192.0.2.1"],
                                     ["firewall", "status"], ["firewall", "remove"]])
def test_a_named_config_that_is_missing_is_an_error_in_every_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    from rblguard.commands.cli import main

    missing = tmp_path / "typo.yaml"
    assert main([*command, "--config", str(missing)]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err
