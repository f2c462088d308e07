"""Allowlist: tcprules forms, membership (IPv4, IPv6), overlaps, reasons, host addresses."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import uuid
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from rblguard.config import parse_config
from rblguard.decisions.allowlist import Allowlist, Entry, host_addresses, parse_tcprules, span
from tests.netns import require_root_tools, run

TCP_SMTP = """\
# the server's own users and relays
127.:allow,RELAYCLIENT="",SMTPD_GREETDELAY="0"
10.0.0.5:deny
10.0.0.:allow,RELAYCLIENT="",SMTPD_GREETDELAY="0"
10.0.0.5:allow,RELAYCLIENT=""
192.0.2.10:allow,RELAYCLIENT="",SMTPD_GREETDELAY="0"
192.0.2.11:allow,SMTPD_GREETDELAY="0"
192.0.2.12:deny,RELAYCLIENT=""
198.51.100.7-19:allow,RELAYCLIENT=""
203.0.113.:deny
203.0.113.64:allow,RELAYCLIENT=""
=relay.example.org:allow,RELAYCLIENT=""
=.example.net:allow
2001:db8:1::/48:allow,RELAYCLIENT=""
2001:db8:2::5:allow,RELAYCLIENT=""
2001:db8:3::allow,RELAYCLIENT=""
not-an-address:allow,RELAYCLIENT=""
missing colon
:allow,RELAYCLIENT=""
"""


def _allowlist(tmp_path: Path) -> tuple[Allowlist, list[str]]:
    path = tmp_path / "tcp.smtp"
    path.write_text(TCP_SMTP)
    entries, warnings = parse_tcprules(path)
    return Allowlist(entries, warnings), warnings


def test_tcprules_forms(tmp_path: Path) -> None:
    allow, _ = _allowlist(tmp_path)
    yes = ["127.0.0.1", "127.255.0.9", "10.0.0.1", "10.0.0.255", "192.0.2.10",
           "198.51.100.7", "198.51.100.13", "198.51.100.19", "203.0.113.64",
           "2001:db8:1::1", "2001:db8:1:ffff::9", "2001:db8:2::5", "2001:db8:3::1"]
    no = ["10.0.0.5",  # an earlier :deny for the exact address wins over the later allow
          "10.0.1.1", "192.0.2.11",  # allowed without RELAYCLIENT
          "192.0.2.12",  # RELAYCLIENT on a deny line does not relay
          "198.51.100.6", "198.51.100.20", "203.0.113.63", "2001:db8:2::6", "2001:db8:4::1",
          "198.18.0.1", "8.8.8.8", "::2"]
    assert [a for a in yes if not allow.contains(a)] == []
    assert [a for a in no if allow.contains(a)] == []


def test_tcprules_warnings_name_file_and_line(tmp_path: Path) -> None:
    _, warnings = _allowlist(tmp_path)
    path = tmp_path / "tcp.smtp"
    by_line = {int(w.split(": line ")[1].split(":")[0]): w for w in warnings}
    assert all(w.startswith(f"{path}: line ") for w in warnings)
    assert "host name rule" in by_line[12]
    assert 13 not in by_line  # a name rule without RELAYCLIENT is nothing to allowlist
    assert "not an address, prefix or range" in by_line[17]
    assert "is not ADDRESS:allow|deny" in by_line[18]
    assert "open relay" in by_line[19]
    assert len(warnings) == 4


def test_reason_names_the_source(tmp_path: Path) -> None:
    allow, _ = _allowlist(tmp_path)
    assert allow.reason("198.51.100.9") == f"198.51.100.9/32 from tcprules {tmp_path}" \
        "/tcp.smtp line 9"
    assert allow.reason("198.18.0.1") is None
    assert allow.reason("10.0.0.0/24") is not None


def test_overlaps(tmp_path: Path) -> None:
    allow, _ = _allowlist(tmp_path)
    assert allow.overlaps("198.51.100.0/24")
    assert allow.overlaps(ipaddress.ip_network("2001:db8::/32"))
    assert not allow.overlaps("198.18.0.0/24")
    assert not allow.overlaps("2001:db8:5::/64")
    assert allow.overlaps("198.51.100.0/29")  # .0-.7: holds the allowlisted .7
    assert not allow.overlaps("198.51.100.0/30")


def test_overlapping_picks_the_bans_an_allowlist_holds(tmp_path: Path) -> None:
    allow, _ = _allowlist(tmp_path)
    targets = ["198.51.100.7", "198.51.100.0/24", "198.51.100.0/30", "198.18.0.1",
               "2001:db8::/32", "2001:db8:5::/64", "not an address", "198.51.100.0/33"]
    assert allow.overlapping(targets) == ["198.51.100.7", "198.51.100.0/24",
                                          "2001:db8::/32"]
    assert allow.overlapping(iter(targets)) == allow.overlapping(targets)  # any iterable
    assert span("198.51.100.0/24") == (4, int(ipaddress.IPv4Address("198.51.100.0")),
                                       int(ipaddress.IPv4Address("198.51.100.255")))
    one = int(ipaddress.IPv6Address("2001:db8::1"))
    assert span("2001:db8::1") == (6, one, one)


def test_from_config_adds_loopback_host_and_tcprules(tmp_path: Path) -> None:
    (tmp_path / "tcp.smtp").write_text("192.0.2.10:allow,RELAYCLIENT=\"\"\n")
    cfg = parse_config(f"allowlist: [198.18.7.0/24, '2001:db8:aa::1']\n"
                       f"tcprules: {tmp_path / 'tcp.smtp'}\n")
    allow = Allowlist.from_config(cfg)
    for addr in ["127.0.0.1", "::1", "198.18.7.200", "2001:db8:aa::1", "192.0.2.10"]:
        assert allow.contains(addr), addr
    assert not allow.contains("198.18.8.1") and not allow.contains("2001:db8:aa::2")
    assert allow.reason("198.18.7.1") == "198.18.7.0/24 from config"


def test_missing_tcprules_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    cfg = parse_config(f"tcprules: {tmp_path / 'absent'}\n")
    allow = Allowlist.from_config(cfg, host=False)
    assert "cannot read" in allow.warnings[0] and str(tmp_path / "absent") in allow.warnings[0]
    assert allow.contains("127.0.0.1")


def test_private_and_reserved_are_not_exempt() -> None:
    allow = Allowlist([])
    for addr in ["10.1.2.3", "192.168.1.1", "198.18.0.1", "fd00::1", "fe80::1", "0.0.0.0"]:
        assert not allow.contains(addr)


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)), max_size=12),
       st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=30))
def test_membership_agrees_with_ipaddress(nets: list[tuple[int, int]],
                                          probes: list[int]) -> None:
    """Bisect over merged ranges says what a plain scan with ipaddress says."""
    networks = [ipaddress.IPv4Network((value, plen), strict=False) for value, plen in nets]
    allow = Allowlist([Entry(n, "test") for n in networks])
    for value in probes + [int(n.broadcast_address) for n in networks]:
        addr = ipaddress.IPv4Address(value)
        assert allow.contains(str(addr)) == any(addr in n for n in networks)
        probe = ipaddress.IPv4Network((value, 28), strict=False)
        assert allow.overlaps(probe) == any(probe.overlaps(n) for n in networks)
        assert bool(allow.overlapping([str(probe)])) == allow.overlaps(probe)
        assert bool(allow.overlapping([str(addr)])) == allow.contains(str(addr))
    # all at once, as a start checks its saved bans: the same answer, in their order
    texts = [str(ipaddress.IPv4Address(v)) for v in probes] + ["2001:db8::1", "198.18.0.0/8"]
    assert allow.overlapping(texts) == [t for t in texts if allow.overlaps(t)]


def test_host_addresses_in_a_namespace() -> None:
    """The addresses of the namespace the daemon runs in, read over netlink."""
    require_root_tools("ip")
    ns = f"rga-{uuid.uuid4().hex[:6]}"
    run(["ip", "netns", "add", ns])
    try:
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1"])
        run(["ip", "-n", ns, "addr", "add", "203.0.113.5/24", "dev", "d0"])
        run(["ip", "-n", ns, "addr", "add", "2001:db8:77::5/64", "dev", "d0", "nodad"])
        code = ("import json; from rblguard.decisions.allowlist import host_addresses; "
                "print(json.dumps([str(n) for n in host_addresses()]))")
        out = run(["ip", "netns", "exec", ns, sys.executable, "-c", code]).stdout
        found = set(json.loads(out))
        assert {"127.0.0.1/32", "203.0.113.5/32", "2001:db8:77::5/128"} <= found
        assert "203.0.113.6/32" not in found
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_host_addresses_here() -> None:
    assert all(n.prefixlen == n.max_prefixlen for n in host_addresses())
