"""The fleet link against a real redis-server (unix socket, own directory): publish,
read, no echo, hostile entries, the hub down and back, catch-up from the snapshot."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from rblguard.fleet.entries import snapshot_member, stream_fields
from rblguard.fleet.link import Delivery, Link, status_of
from rblguard.fleet.metrics import FleetMetrics
from rblguard.fleet.settings import FleetSettings
from rblguard.model import Ban
from tests.daemon_harness import wait_for
from tests.redis_hub import RedisHub, redis_hub
from tests.test_metrics import free_port


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[RedisHub]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("needs redis-server: CI must run this test (run-tests.sh installs it)")
        pytest.skip("needs redis-server")
    with redis_hub(tmp_path / "redis") as h:
        yield h


class Member:
    """One Link with its deliveries in a queue, as the daemon loop would get them."""

    def __init__(self, url: str | None, name: str, cursor: str | None = "0-0",
                 **settings) -> None:
        self.deliveries: queue.Queue[Delivery] = queue.Queue()
        self.registry = CollectorRegistry()
        self.link = Link(FleetSettings(redis=url, name=name, **settings), cursor,
                         self.deliveries.put, FleetMetrics(self.registry))
        self.link.start()

    def bans(self, n: int, timeout: float = 10) -> list:
        """The next ``n`` foreign bans delivered (AssertionError after ``timeout``)."""
        got: list = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(got)} of {n} bans delivered"
            try:
                got += self.deliveries.get(timeout=left).bans
            except queue.Empty:
                continue
        return got

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def stop(self) -> None:
        self.link.stop()


# 50,000 entries from one origin, written by Redis itself (as fast as a hostile writer)
FLOOD = """
for i = 0, tonumber(ARGV[1]) - 1 do
  redis.call('XADD', KEYS[1], '*', 'v', '1', 't',
             '198.18.' .. (math.floor(i / 256) % 256) .. '.' .. (i % 256),
             's', '3600', 'r', 'x', 'o', ARGV[2])
end
"""


def ban(target: str, seconds: float = 3600, rule: str = "spamhaus") -> Ban:
    return Ban(target, time.time() + seconds, rule, "553 listed")


def test_a_ban_published_by_one_member_reaches_the_other_and_never_echoes(hub) -> None:
    mx1, mx2 = Member(hub.url, "mx1"), Member(hub.url, "mx2")
    try:
        wait_for(lambda: mx1.link.status.state == mx2.link.status.state == "up", 10,
                 "both links up")
        started = time.monotonic()
        mx1.link.publish([ban("198.51.100.7"), ban("2001:db8:1:2::/64", 60)])
        got = {b.target: b for b in mx2.bans(2)}
        took = time.monotonic() - started
        assert set(got) == {"198.51.100.7", "2001:db8:1:2::/64"}
        b = got["198.51.100.7"]
        assert b.origin == "mx1" and b.rule == "spamhaus"
        assert 3_598_000 <= b.expires_ms - b.written_ms <= 3_600_000  # its remaining time
        assert took < 1.0, took
        # mx1 reads its own entries too, and never hands them back: no echo
        wait_for(lambda: mx1.link.cursor == mx2.link.cursor, 5, "mx1 to read on")
        echoed = []
        while not mx1.deliveries.empty():
            echoed += mx1.deliveries.get().bans
        assert echoed == []
        # counted by mx1's publisher once the hub answered: on a busy machine, after
        # mx2 and mx1's own reader may already have read the entries
        wait_for(lambda: mx1.metric("rblguard_fleet_published_total") >= 2, 5,
                 "mx1 to count what it published")
        assert mx1.metric("rblguard_fleet_published_total") == 2
        assert mx1.metric("rblguard_fleet_link_up") == 1
        status = status_of(mx2.link)
        assert status["state"] == "up" and status["hub"] == hub.url
        assert status["lag_s"] is not None and status["lag_s"] < 1
        assert hub.client().zcard("rblguard:active") == 2  # the snapshot, for resyncs
    finally:
        mx1.stop()
        mx2.stop()


def test_hostile_entries_are_refused_and_counted_and_nothing_else_breaks(hub) -> None:
    mx2 = Member(hub.url, "mx2", quarantine=3600)
    r = hub.client()
    try:
        wait_for(lambda: mx2.link.status.state == "up", 10, "link up")
        for fields in ({"v": "1", "t": "0.0.0.0/0", "s": "60", "r": "x", "o": "evil"},
                       {"v": "1", "t": "::/0", "s": "60", "r": "x", "o": "evil"},
                       {"v": "1", "t": "198.51.100.8", "s": str(10 * 365 * 86400),
                        "r": "x", "o": "evil"},
                       {"t": "198.51.100.9"}, {"v": "1", "t": "198.51.100.9", "s": "60",
                                               "r": "x", "o": "bad name"}):
            r.xadd("rblguard:bans", fields)
        started = time.monotonic()
        r.eval(FLOOD, 1, "rblguard:bans", 50_000, "flood")  # inside Redis: a real flood
        writing = time.monotonic() - started
        r.xadd("rblguard:bans", stream_fields("203.0.113.5", 600, "spamhaus", "mx1"))
        got = mx2.bans(1, timeout=30)
        while got[-1].target != "203.0.113.5":
            got += mx2.bans(1, timeout=30)
        from_flood = [b for b in got if b.origin == "flood"]
        # at most the cap (10,000 a second) for as long as the flood took, then none
        assert writing < 1.5, writing
        assert len(from_flood) <= 10_000 * (1 + writing) < 50_000 / 2, len(from_flood)
        assert {b.origin for b in got} <= {"flood", "mx1"}
        assert mx2.metric("rblguard_fleet_refused_total", reason="too_wide") == 2
        assert mx2.metric("rblguard_fleet_refused_total", reason="too_long") == 1
        assert mx2.metric("rblguard_fleet_refused_total", reason="malformed") == 2
        assert mx2.metric("rblguard_fleet_refused_total", reason="rate") == 1
        quarantined = mx2.metric("rblguard_fleet_refused_total", reason="quarantined")
        assert len(from_flood) + 1 + quarantined == 50_000  # every one obeyed or counted
        assert mx2.metric("rblguard_fleet_quarantined_origins") == 1
        assert status_of(mx2.link)["quarantined"] == ["flood"]
        assert mx2.link.status.state == "up"
    finally:
        mx2.stop()


def test_bans_made_while_the_hub_is_down_reach_the_others_when_it_returns(hub) -> None:
    mx1 = Member(hub.url, "mx1")
    try:
        wait_for(lambda: mx1.link.status.state == "up", 10, "link up")
        hub.kill()
        mx1.link.publish([ban("198.51.100.20")])
        mx1.link.publish([ban("198.51.100.21"), ban("198.51.100.22")])  # never waits
        wait_for(lambda: mx1.link.status.state == "down", 10, "the link to see it down")
        assert mx1.link.status.last_error
        assert mx1.metric("rblguard_fleet_link_up") == 0
        assert mx1.link.queued == 3 and mx1.metric("rblguard_fleet_queue_length") == 3
        hub.start()  # its AOF brings the stream back
        mx2 = Member(hub.url, "mx2")
        try:
            got = {b.target for b in mx2.bans(3, timeout=30)}
            assert got == {"198.51.100.20", "198.51.100.21", "198.51.100.22"}
            # mx2 may read the entries before mx1's publisher has counted them sent
            wait_for(lambda: mx1.link.queued == 0, 5, "mx1's queue emptied")
            wait_for(lambda: mx1.link.status.state == "up", 15, "mx1's reader back too")
        finally:
            mx2.stop()
    finally:
        mx1.stop()


def test_a_hub_that_lost_its_data_is_resynchronised_and_told_again(hub) -> None:
    mx1, mx2 = Member(hub.url, "mx1"), Member(hub.url, "mx2")
    try:
        mx1.link.publish([ban("198.51.100.40")])
        assert [b.target for b in mx2.bans(1)] == ["198.51.100.40"]
        wait_for(lambda: mx2.link.cursor == mx1.link.cursor != "0-0", 5, "both read it")
        while not mx2.deliveries.empty():
            mx2.deliveries.get()
        hub.kill()
        shutil.rmtree(hub.workdir)  # a new, empty Redis at the same address
        hub.start()
        deliveries = []
        wait_for(lambda: deliveries.append(mx2.deliveries.get(timeout=20)) or
                 deliveries[-1].lost, 30, "mx2 to see the loss")
        assert deliveries[-1].resync and deliveries[-1].cursor == "0-0"
        assert mx2.metric("rblguard_fleet_resyncs_total") == 1
    finally:
        mx1.stop()
        mx2.stop()


def test_the_queue_is_bounded_and_counts_what_it_drops(hub) -> None:
    hub.kill()
    mx1 = Member(hub.url, "mx1", queue_max=100)
    try:
        for i in range(15):
            mx1.link.publish([ban(f"198.51.100.{10 * i + j}") for j in range(10)])
        assert mx1.link.queued == 100
        assert mx1.metric("rblguard_fleet_queue_dropped_total") == 50
        assert status_of(mx1.link)["dropped"] == 50
    finally:
        mx1.stop()


def test_a_new_member_gets_every_active_ban_from_the_snapshot(hub) -> None:
    r = hub.client()
    now_ms = int(time.time() * 1000)
    pipe = r.pipeline(transaction=False)
    members = {snapshot_member(f"198.{18 + (i >> 16)}.{i >> 8 & 255}.{i & 255}", "x", "mx1"):
               now_ms + 3_600_000 for i in range(100_000)}
    pipe.zadd("rblguard:active", members)
    pipe.zadd("rblguard:active", {snapshot_member("198.51.100.1", "x", "mx1"): now_ms - 1,
                                  snapshot_member("0.0.0.0/0", "x", "mx1"): now_ms + 60_000})
    pipe.xadd("rblguard:bans", stream_fields("198.18.0.0", 3600, "x", "mx1"))
    pipe.execute()
    started = time.monotonic()
    mx3 = Member(hub.url, "mx3", cursor=None)
    try:
        got = mx3.bans(100_000, timeout=30)
        took = time.monotonic() - started
        assert len({b.target for b in got}) == 100_000
        assert mx3.metric("rblguard_fleet_resyncs_total") == 1
        assert mx3.metric("rblguard_fleet_refused_total", reason="too_wide") == 1
        print(f"catch-up of 100,000 bans from the snapshot: {took:.2f} s")
        assert took < 10, took
    finally:
        mx3.stop()


# What docs/fleet.md gives the fleet's ACL user: its keys and the commands it uses.
ACL = ["on", ">s3cret", "resetkeys", "~rblguard:*", "resetchannels", "-@all", "+xadd",
       "+zadd", "+zremrangebyscore", "+xread", "+xrange", "+xrevrange", "+zrangebyscore",
       "+time", "+ping", "+client|setname"]


def test_an_acl_user_restricted_to_the_prefix_and_the_commands_is_enough(
        hub, tmp_path: Path) -> None:
    hub.client().execute_command("ACL", "SETUSER", "rblguard", *ACL)
    (tmp_path / "pw").write_text("s3cret\n")
    opts = {"username": "rblguard", "password_file": str(tmp_path / "pw")}
    mx1, mx2 = Member(hub.url, "mx1", **opts), Member(hub.url, "mx2", cursor=None, **opts)
    try:
        wait_for(lambda: mx1.link.status.state == mx2.link.status.state == "up", 10,
                 "both links up as the ACL user")
        mx1.link.publish([ban("198.51.100.30")])
        assert [b.target for b in mx2.bans(1)] == ["198.51.100.30"]
        wait_for(lambda: mx1.link.status.published == 1, 5, "the publish")
        assert mx1.link.status.last_error is None
    finally:
        mx1.stop()
        mx2.stop()
    import redis

    limited = redis.Redis(unix_socket_path=hub.socket, username="rblguard",
                          password="s3cret")
    with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions"):
        limited.get("rblguard:bans")  # and the user can do no more
    with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions"):
        limited.xadd("other:bans", {"a": "b"})


def make_certificates(d: Path) -> None:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
            "/CN=fleet test CA", "-keyout", "ca.key", "-out", "ca.pem")
    for name, san in (("server", "IP:127.0.0.1"), ("client", "DNS:mx1")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext",
                "-out", f"{name}.pem")


def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("needs openssl and redis-server: CI must run this test")
        pytest.skip("needs openssl and redis-server")
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certificates(certs)
    port = free_port()
    tls = ("--tls-port", str(port), "--tls-cert-file", str(certs / "server.pem"),
           "--tls-key-file", str(certs / "server.key"), "--tls-ca-cert-file",
           str(certs / "ca.pem"), "--tls-auth-clients", "yes")
    with redis_hub(tmp_path / "redis", extra=tls) as hub:
        from rblguard.fleet.settings import TlsSettings

        url = f"rediss://127.0.0.1:{port}/0"
        good = TlsSettings(ca=str(certs / "ca.pem"), cert=str(certs / "client.pem"),
                           key=str(certs / "client.key"))
        mx1 = Member(url, "mx1", tls=good)
        mx2 = Member(url, "mx2", tls=good)
        stranger = Member(url, "mx9", tls=TlsSettings(ca=str(certs / "ca.pem")))
        try:
            mx1.link.publish([ban("198.51.100.80")])
            assert [b.target for b in mx2.bans(1)] == ["198.51.100.80"]
            # no client certificate: the hub refuses the connection
            wait_for(lambda: stranger.link.status.last_error is not None, 10, "refusal")
            assert stranger.link.status.state != "up"
            # TLS 1.3 reports it as the alert or as an EOF, depending on timing
            assert "ssl" in stranger.link.status.last_error.lower()
            assert stranger.metric("rblguard_fleet_link_up") == 0
        finally:
            for m in (mx1, mx2, stranger):
                m.stop()
        assert hub.answers()
