"""Each producer's fixture log (tests/fixtures/producers, from verbatim published lines and
the producers' own format strings, addresses swapped for documentation ranges) scanned
with the exact bans, errors and never-bans expected; and client-controlled fields
filled with reject-looking text never ban anyone.

Exact figures, because a rule that bans one address too many, or counts a DNSBL error
reply as a listing, firewalls legitimate mail."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rblguard.commands.scan import scan_paths
from rblguard.commands.simulate import simulate
from rblguard.matching.rules import load_rules
from rblguard.matching.scanner import Scanner
from rblguard.model import Match
from rblguard.sources.stamps import EXIM, NONE, RFC3164

LOGS = Path(__file__).parent / "fixtures" / "producers"
RULES = load_rules(packs=("postfix", "exim"))

# file -> (banned addresses, lookup errors, DNSBL errors, connections).  Postfix's logs
# have postscreen in front: its CONNECT lines are the connections, and smtpd's "connect
# from" lines after a PASS are the same connections passed on, not counted again.
EXPECTED = {
    "postfix-syslog.log": ({"198.18.5.126", "198.18.5.124"}, 1, 2, 3),
    "postfix-journal-short-iso.log": ({"198.18.5.126", "198.18.5.124"}, 1, 2, 3),
    "exim-mainlog.log": ({"198.18.5.124"}, 1, 1, 1),
    "qmail-splogger.log": ({"198.51.100.8"}, 1, 0, 3),
    "qmail-smtpd-rbl.log": ({"198.18.5.124"}, 1, 1, 4),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_producers_log_gives_exactly_its_bans_and_errors(name: str) -> None:
    bans, lookup_errors, dnsbl_errors, connections = EXPECTED[name]
    report = scan_paths([str(LOGS / name)], RULES).as_json(top=100, with_list=True)
    assert {t["address"] for t in report["top"]} == bans
    assert report["matches"] == len(bans)
    assert (report["lookup_errors"], report["dnsbl_errors"]) == (lookup_errors, dnsbl_errors)
    assert report["parse_errors"] == 0
    # every DNSBL error reply names its DNSBL, for the alert: dnsblog's by its zone
    assert report["dnsbl_errors_by_zone"] == ({"spamhaus.org": dnsbl_errors} if dnsbl_errors
                                              else {})
    replayed = simulate([str(LOGS / name)], [3600], (1, 3600), 1, [], packs=("postfix", "exim"))
    assert replayed["connections"] == connections


# One client history (second, address, DNSBL operator or "" for a clean client), as each
# producer logs it: every producer must give the same savings figures as rblsmtpd.
HISTORY = sorted([(t, "198.18.0.1", "spamhaus") for t in (0, 30, 60, 700, 4000)]
                 + [(t, "198.18.0.2", "spamcop") for t in (10, 20)]
                 + [(t, "2001:db8::7", "") for t in (5, 15, 25)])
_ZONE = {"spamhaus": "zen.spamhaus.org", "spamcop": "bl.spamcop.net", "": ""}


def _qmail(n: int, a: str, op: str) -> list[str]:
    tail = [f"rblsmtpd: {a} pid {n}: 553 https://www.{op}.org/query/ip/{a}"] if op else []
    return [f"tcpserver: pid {n} from {a}", *tail, f"tcpserver: end {n} status 0"]


def _smtpd(n: int, a: str, op: str) -> list[str]:
    reject = (f"postfix/smtpd[9]: NOQUEUE: reject: RCPT from unknown[{a}]: 554 5.7.1 "
              f"Service unavailable; Client host [{a}] blocked using {_ZONE[op]}; "
              f"https://www.{op}.org/query/ip/{a}; from=<a@example.net> to=<b@example.org> "
              "proto=ESMTP helo=<x>")
    return [f"postfix/smtpd[9]: connect from unknown[{a}]", *([reject] if op else []),
            f"postfix/smtpd[9]: disconnect from unknown[{a}] ehlo=1 commands=1"]


def _postscreen(n: int, a: str, op: str) -> list[str]:
    head = f"postfix/postscreen[8]: CONNECT from [{a}]:{40000 + n} to [192.0.2.10]:25"
    if op:
        return [head, f"postfix/postscreen[8]: NOQUEUE: reject: RCPT from [{a}]:{40000 + n}: "
                f"550 5.7.1 Service unavailable; client [{a}] blocked using {_ZONE[op]}; "
                "from=<a@example.net>, to=<b@example.org>, proto=ESMTP, helo=<x>"]
    return [head, f"postfix/postscreen[8]: PASS OLD [{a}]:{40000 + n}", *_smtpd(n, a, op)]


def _exim(n: int, a: str, op: str) -> list[str]:
    reject = (f"H=(x) [{a}]:{40000 + n} F=<a@example.net> rejected RCPT <b@example.org>: "
              f"rejected because {a} is in a black list at {_ZONE[op]}")
    return [f"SMTP connection from [{a}]:{40000 + n} (TCP/IP connection count = 1)",
            *([reject] if op else [])]


def _stamped(producer: str, t: int, line: str) -> str:
    if producer == "qmail":
        return f"@{0x4000000065A1D280 + t:016x}00000000 {line}"
    if producer == "exim":
        return time.strftime("%Y-%m-%d %H:%M:%S ", time.gmtime(1700000000 + t)) + line
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00 mail ", time.gmtime(1700000000 + t)) + line


_PRODUCERS = {"qmail": _qmail, "smtpd": _smtpd, "postscreen": _postscreen, "exim": _exim}


@pytest.mark.parametrize("producer", sorted(_PRODUCERS))
def test_every_producer_gives_rblsmtpds_savings_figures(producer: str, tmp_path: Path) -> None:
    """Connections counted from each producer's own lines: 10 connections, the same
    queries without banning and under each ban time as rblsmtpd behind tcpserver."""
    make = _PRODUCERS[producer]
    lines = [_stamped(producer, t, line)
             for n, (t, a, op) in enumerate(HISTORY, 1) for line in make(n, a, op)]
    (tmp_path / "log").write_text("\n".join(lines) + "\n")
    result = simulate([str(tmp_path / "log")], [600, 3600], (1, 3600), 2, [],
                      packs=("postfix", "exim"))
    assert (result["connections"], result["rejects"]) == (10, 7)
    assert result["baseline"]["queries"] == 5 * 1 + 2 * 2 + 3 * 2
    assert [p["queries"] for p in result["policies"]] == [3 + 2 + 6, 2 + 2 + 6]
    assert [p["connections_blocked"] for p in result["policies"]] == [3, 4]


_REJECTS = [
    "rblsmtpd: {a} pid 1: 553 x",
    "qmail-smtpd[1]: rbl: ip={a} query=x result=reject message='x'",
    "NOQUEUE: reject: RCPT from x[{a}]: 554 5.7.1 Service unavailable; Client host [{a}] "
    "blocked using zen.spamhaus.org;",
    "NOQUEUE: reject: RCPT from [{a}]:1: 550 5.7.1 Service unavailable; client [{a}] "
    "blocked using zen.spamhaus.org;",
    "H=(x) [{a}]:1 F=<a@b> rejected RCPT <c@d>: rejected because {a} is in a black list at z",
    "warning: {a}: RBL lookup error: x", "\n", "; from=<", ">: ", ") [", "Error: ",
]
_FAKE = "203.0.113.9"


@st.composite
def _client_text(draw) -> str:
    parts = draw(st.lists(st.one_of(st.sampled_from(_REJECTS),
                                    st.text(st.characters(codec="ascii"), max_size=8)),
                          max_size=6))
    return "".join(parts).replace("{a}", _FAKE).replace("\n", " ")


# Each producer's reject or ordinary line with its client-controlled fields as {h}
# (HELO), {f} (MAIL FROM), {r} (RCPT TO) and {n} (host name).
_TEMPLATES = [
    (RFC3164, "Oct 31 01:28:46 mail postfix/smtpd[1]: NOQUEUE: reject: RCPT from {n}"
     "[192.0.2.32]: 550 5.1.1 <{r}>: Recipient address rejected: User unknown; from=<{f}> "
     "to=<{r}> proto=ESMTP helo=<{h}>"),
    (RFC3164, "Oct 31 01:28:46 mail postfix/postscreen[1]: NOQUEUE: reject: RCPT from "
     "[192.0.2.33]:1: 450 4.3.2 Service currently unavailable; from=<{f}>, to=<{r}>, "
     "proto=ESMTP, helo=<{h}>"),
    (RFC3164, "Oct 31 01:28:46 mail postfix/smtpd[1]: connect from {n}[192.0.2.34]"),
    (EXIM, "2024-01-13 00:00:13 H={n} ({h}) [192.0.2.41]:1 F=<{f}> rejected RCPT <{r}>: "
     "Unrouteable address"),
    (None, "qlogenvelope: result=rejected code=553 reason=nomailbox detail= helo={h} "
     "mailfrom={f} rcptto={r} relay=no rcpthosts= size= authuser= authtype= encrypted= "
     "sslverified= localip=192.0.2.10 localport=25 remoteip=192.0.2.28 remoteport=1 "
     "remotehost={n} qp= pid=1"),
    (None, "qmail-smtpd[1]: badhelo: <{h}> at 192.0.2.29"),
]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(_TEMPLATES), _client_text(), _client_text(), _client_text(),
       _client_text())
def test_client_text_never_bans_another_address(template, helo, sender, rcpt, name) -> None:
    fmt, text = template
    line = text.format(h=helo, f=sender, r=rcpt, n=name).encode("ascii", "replace") + b"\n"
    result = Scanner(RULES).scan(line, 0, fmt or NONE, 0.0)
    assert not [e for e in result.events if isinstance(e, Match) and e.address == _FAKE]
