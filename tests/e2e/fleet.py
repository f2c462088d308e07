"""Two real qmail front ends sharing their bans through a real Redis hub.

Each front end is tests/e2e/frontend.py's (its own pair of namespaces, its own dnsmasq
answering the same DNSBL zones for the same listed clients: together, one DNSBL whose
queries are the sum of both counters), with rblguard beside it; with ``sharing`` the two
daemons are members of one fleet, their server namespaces joined to a redis-server
namespace by veth links (hub 198.18.20i.1, member i 198.18.20i.2: clear of the client
populations' networks).  One spammer population hits both: each connection of a plan
goes to one MX or the other, as a sender's MX fallback spreads its retries.
"""

from __future__ import annotations

import contextlib
import random
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.daemon_harness import wait_for
from tests.e2e.frontend import Frontend, Measured, Population, ideal_queries
from tests.e2e.load import Outcome, Planned
from tests.netns import delete_netns, netns_pair, run
from tests.redis_hub import RedisHub


def split(plan: list[Planned], hosts: int, seed: int) -> list[list[Planned]]:
    """Each connection to one of ``hosts`` front ends, at random (seeded)."""
    rng = random.Random(seed)
    parts: list[list[Planned]] = [[] for _ in range(hosts)]
    for planned in plan:
        parts[rng.randrange(hosts)].append(planned)
    return parts


def fleet_ideal(plan: list[Planned], population: Population) -> int:
    """The fleet's ideal: one lookup per spammer for the whole fleet, plus every
    legitimate connection's (the plan before it was split)."""
    return ideal_queries(plan, population)


@contextlib.contextmanager
def _hub(workdir: Path, servers: list[str]) -> Iterator[RedisHub]:
    ns = f"e2eh-{uuid.uuid4().hex[:6]}"
    run(["ip", "netns", "add", ns])
    hub = RedisHub(workdir / "hub", ns=ns, bind="0.0.0.0")
    try:
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for i, server in enumerate(servers):
            run(["ip", "link", "add", f"vh{i}", "netns", ns, "type", "veth", "peer",
                 "name", f"vm{i}", "netns", server])
            for where, dev, addr in ((ns, f"vh{i}", f"198.18.{200 + i}.1/24"),
                                     (server, f"vm{i}", f"198.18.{200 + i}.2/24")):
                run(["ip", "-n", where, "-batch", "-"],
                    input=f"link set {dev} up\naddress add {addr} dev {dev}\n")
        hub.start()
        yield hub
    finally:
        hub.kill()
        delete_netns(ns)


@contextlib.contextmanager
def frontends(workdir: Path, population: Population, sharing: bool,
              hosts: int = 2) -> Iterator[list[Frontend]]:
    """``hosts`` started front ends with rblguard, members of one fleet if ``sharing``;
    all torn down afterwards, even on failure."""
    with contextlib.ExitStack() as stack:
        pairs = [stack.enter_context(netns_pair(f"e2f{i}")) for i in range(hosts)]
        if sharing:
            stack.enter_context(_hub(workdir, [p.server for p in pairs]))
        fes = []
        for i, pair in enumerate(pairs):
            fleet = ({"redis": f"redis://198.18.{200 + i}.1:6379/0", "name": f"mx{i}"}
                     if sharing else None)
            fe = Frontend(pair, workdir / f"mx{i}", population, log_size=99999,
                          fleet=fleet)
            stack.callback(fe.close)
            fe.start()
            fes.append(fe)
        for fe in fes if sharing else ():
            daemon = fe.daemon
            assert daemon is not None
            wait_for(lambda d=daemon: d.cli("status", "--json")["fleet"]["state"] == "up",
                     20, "the fleet links")
        yield fes


def play(fes: list[Frontend], parts: list[list[Planned]]) -> list[Measured]:
    """Every front end's part of the plan at once (threads), then each one measured."""
    outcomes: list[list[Outcome]] = [[] for _ in fes]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            outcomes[i] = fes[i].play(parts[i], lead=2.0)
        except BaseException as exc:  # raised in the caller's thread below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(fes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [fe.measure(part, out) for fe, part, out in zip(fes, parts, outcomes,
                                                             strict=True)]
