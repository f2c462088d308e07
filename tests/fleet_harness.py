"""Fleets of real daemons for the tests and benchmarks/fleet.py: each member in its own
network namespace with its own nftables table, joined to a real redis-server in a hub
namespace by veth links (hub 198.18.10i.1, member i 198.18.10i.2); everything made
here is deleted afterwards, even on failure."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.daemon_harness import (
    DaemonHarness,
    daemon_namespace,
    reject_message,
    tai64n,
    wait_for,
)
from tests.netns import delete_netns, require_root_tools, run
from tests.redis_hub import RedisHub


class Fleet:
    """The hub's namespace, its redis-server and one daemon per member."""

    def __init__(self, hub: RedisHub, members: list[DaemonHarness]) -> None:
        self.hub = hub
        self.members = members

    def reject(self, member: int, *addresses: str) -> float:
        """rblsmtpd rejects in member's log; the time just before they were written."""
        written = time.time()
        with open(self.members[member].workdir / "log" / "current", "a") as f:
            f.write("".join(tai64n() + reject_message(a) for a in addresses))
        return written

    def link(self, member: int, up: bool) -> None:
        h = self.members[member]
        run(["ip", "-n", h.ns, "link", "set", f"vm{member}", "up" if up else "down"])

    def fleet_status(self, member: int) -> dict:
        return self.members[member].cli("status", "--json")["fleet"]

    def wait_up(self, *members: int) -> None:
        """Until each member's link is up (all members if none is named)."""
        for i in members or range(len(self.members)):
            wait_for(lambda i=i: self.fleet_status(i)["state"] == "up", 15,
                     f"mx{i}'s link")


@contextlib.contextmanager
def fleet_of(tmp_path: Path, n: int = 3, allowlists: dict[int, list[str]] | None = None,
             start: bool = True) -> Iterator[Fleet]:
    require_root_tools("nft", "redis-server")
    hub_ns = f"rgh-{uuid.uuid4().hex[:6]}"
    run(["ip", "netns", "add", hub_ns])
    try:
        run(["ip", "-n", hub_ns, "link", "set", "lo", "up"])
        with contextlib.ExitStack() as stack:
            for i in range(n):
                (tmp_path / f"mx{i}").mkdir()
            members = [stack.enter_context(daemon_namespace(tmp_path / f"mx{i}"))
                       for i in range(n)]
            for i, h in enumerate(members):  # hub 198.18.10i.1 <-> member 198.18.10i.2
                run(["ip", "link", "add", f"vh{i}", "netns", hub_ns, "type", "veth",
                     "peer", "name", f"vm{i}", "netns", h.ns])
                for ns, dev, addr in ((hub_ns, f"vh{i}", f"198.18.{100 + i}.1/24"),
                                      (h.ns, f"vm{i}", f"198.18.{100 + i}.2/24")):
                    run(["ip", "-n", ns, "-batch", "-"],
                        input=f"link set {dev} up\naddress add {addr} dev {dev}\n")
            hub = RedisHub(tmp_path / "hub", ns=hub_ns, bind="0.0.0.0")
            hub.start()
            stack.callback(hub.kill)
            for i, h in enumerate(members):
                (h.workdir / "log").mkdir()
                h.write_config(fleet={"redis": f"redis://198.18.{100 + i}.1:6379/0",
                                      "name": f"mx{i}", "timeout": 1},
                               allowlist=(allowlists or {}).get(i, []))
                if start:
                    h.start()
            yield Fleet(hub, members)
    finally:
        delete_netns(hub_ns)
