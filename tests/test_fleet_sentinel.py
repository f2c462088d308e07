"""A Sentinel-managed hub: one primary, one replica and three sentinels, all local
(loopback ports, the test's own directories).  The primary is killed; the link follows
the promotion and the fleet goes on sharing."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_harness import wait_for
from tests.test_fleet_link import Member, ban
from tests.test_metrics import free_port

SERVICE = "rblguard"


class Local:
    """redis-server processes on 127.0.0.1, killed at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[int, subprocess.Popen] = {}

    def server(self, port: int, *args: str) -> int:
        workdir = self.root / str(port)
        workdir.mkdir(parents=True)
        self.procs[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir",
             str(workdir), "--save", "", "--appendonly", "yes", "--logfile",
             str(workdir / "redis.log"), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.ping(port), 10, f"redis on {port}")
        return port

    def sentinel(self, port: int, primary: int) -> int:
        workdir = self.root / str(port)
        workdir.mkdir(parents=True)
        conf = workdir / "sentinel.conf"  # sentinel rewrites its file: one of its own
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                        f"logfile {workdir / 'sentinel.log'}\n"
                        f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                        f"sentinel failover-timeout {SERVICE} 5000\n")
        self.procs[port] = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                            stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        wait_for(lambda: self.ping(port), 10, f"sentinel on {port}")
        return port

    def ping(self, port: int) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(10)

    def close(self) -> None:
        for port in list(self.procs):
            self.kill(port)


@contextlib.contextmanager
def sentinel_hub(root: Path) -> Iterator[tuple[Local, int, int, list[int]]]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("needs redis-server: CI must run this test")
        pytest.skip("needs redis-server")
    local = Local(root)
    try:
        primary = local.server(free_port())
        replica = local.server(free_port(), "--replicaof", "127.0.0.1", str(primary))
        sentinels = [local.sentinel(free_port(), primary) for _ in range(3)]
        yield local, primary, replica, sentinels
    finally:
        local.close()


def primary_of(sentinel: int) -> int:
    import redis

    _host, port = redis.Redis(port=sentinel).sentinel_get_master_addr_by_name(SERVICE)
    return int(port)


def test_the_link_follows_a_promotion_and_goes_on_sharing(tmp_path: Path) -> None:
    with sentinel_hub(tmp_path) as (local, primary, replica, sentinels):
        opts = {"sentinels": tuple(("127.0.0.1", p) for p in sentinels),
                "service": SERVICE, "timeout": 0.5}
        mx1, mx2 = Member(None, "mx1", **opts), Member(None, "mx2", **opts)
        try:
            wait_for(lambda: mx1.link.status.state == mx2.link.status.state == "up", 10,
                     "both links up through the sentinels")
            assert mx1.link.status.hub.startswith("sentinel://127.0.0.1:")
            mx1.link.publish([ban("198.51.100.70")])
            assert [b.target for b in mx2.bans(1)] == ["198.51.100.70"]
            local.kill(primary)
            wait_for(lambda: primary_of(sentinels[0]) == replica, 30,
                     "the sentinels to promote the replica")
            mx1.link.publish([ban("198.51.100.71")])
            assert [b.target for b in mx2.bans(1, timeout=30)] == ["198.51.100.71"]
            wait_for(lambda: mx1.link.status.state == mx2.link.status.state == "up", 15,
                     "both links up on the new primary")
        finally:
            mx1.stop()
            mx2.stop()
