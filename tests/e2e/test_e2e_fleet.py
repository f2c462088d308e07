"""End to end, at fleet scale: two real qmail front ends, one spammer population, their
rblguards sharing bans through a real Redis hub (tests/e2e/fleet.py).  A spammer costs
the fleet one DNSBL lookup, wherever its retries land; without sharing, each front end
pays for it again."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.e2e import fleet
from tests.e2e.frontend import Population
from tests.e2e.load import legit_connections, ordered, spammer_connections
from tests.netns import require_root_tools

pytestmark = pytest.mark.e2e
TOOLS = ("nft", "tcpserver", "rblsmtpd", "tcprules", "multilog", "dnsmasq", "ss",
         "redis-server")


def test_two_front_ends_sharing_bans_pay_the_fleet_ideal(tmp_path: Path) -> None:
    require_root_tools(*TOOLS)
    population = Population.make(5, legit=100, spam=400)
    rng = random.Random(5)
    plan = ordered(legit_connections(rng, population.legit, 20, 20)
                   + spammer_connections(rng, list(population.spam), 0, 16, (2, 5),
                                         (0.5, 2.0)))
    parts = fleet.split(plan, 2, seed=5)
    ideal = fleet.fleet_ideal(plan, population)
    queries = {}
    for sharing in (False, True):
        with fleet.frontends(tmp_path / str(sharing), population, sharing) as fes:
            measured = fleet.play(fes, parts)
        assert [m.legit_failed for m in measured] == [[], []]
        assert not any(m.legit_banned for m in measured)
        queries[sharing] = sum(m.dns_queries for m in measured)
    # with sharing: within 1% of one lookup per spammer for the whole fleet
    assert ideal <= queries[True] <= ideal * 1.01, (queries, ideal)
    # alone, each host learns each spammer it meets by itself: clearly more
    assert queries[False] > ideal * 1.1, (queries, ideal)
