"""End to end on a real Postfix: the Postfix pack bans the listed clients it rejects,
and never a client that Postfix rejected because of a DNSBL error reply.

Debian's Postfix in the server namespace (tests/e2e/postfix.py), the DNSBL and the
clients of the qmail end-to-end test, and rblguard following Postfix's own log file
with ``packs: [postfix]``.  A few clients get Spamhaus' error reply instead of an
answer (127.255.255.254 and its "open resolver" text): Postfix rejects their mail all
the same, as it does in a real cut-off, and rblguard must count and never ban them.
What is checked comes from the parts themselves: dnsmasq's query log (cross-checked
by a kernel packet counter), every client's outcome, Postfix's log, the kernel's set
and rblguard's metrics.  The ideal is an instant ban, with Postfix's own caches counted
as the run used them (PostfixFrontend.ideal_queries): each smtpd process's cache of
its last 100 DNSBL answers replayed, so the bound of 1% over it is a real one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.e2e.frontend import Measured, Population
from tests.e2e.load import Planned, legit_connections, ordered, spammer_connections
from tests.e2e.postfix import postfix_frontend
from tests.netns import require_root_tools

pytestmark = pytest.mark.e2e
TOOLS = ("nft", "postfix", "dnsmasq", "ss", "unshare", "mount")
SECONDS = 15.0


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_root_tools(*TOOLS)


ERRED = [f"198.19.200.{i}" for i in range(1, 21)]  # the DNSBL answers them with an error


def plan_for(population: Population, seed: int) -> list[Planned]:
    """Legitimate mail at 15 connections a second; spammers arriving all along, each
    retrying 2-4 times, 0.5-1.5 s apart; each erred client trying 3 times."""
    rng = random.Random(seed)
    erred = [Planned(round(rng.uniform(0, SECONDS - 3), 4), a, "erred")
             for a in ERRED for _ in range(3)]
    return ordered(legit_connections(rng, population.legit, 15, SECONDS)
                   + spammer_connections(rng, list(population.spam), 0, SECONDS - 4,
                                         (2, 4), (0.5, 1.5)) + erred)


def assert_postfix_promise(m: Measured, plan: list[Planned]) -> None:
    summary = json.dumps(m.summary())
    # every DNS query the server made was a DNSBL query, and the log missed none
    assert m.dns_queries == m.dns_packets, summary
    # the queries an instant banner would have let through, and at most 1% more
    assert m.ideal_queries <= m.dns_queries <= m.ideal_queries * 1.01, summary
    # no legitimate mail lost, no legitimate sender banned
    assert m.legit_failed == [], m.legit_failed[:5]
    assert m.legit_banned == set()
    assert m.outcomes.get("legit/accepted") == sum(p.kind == "legit" for p in plan), summary
    # every listed client was rejected by Postfix and is banned now; what the clients
    # saw agrees with Postfix's log and with the kernel's counter
    spammers = {p.src for p in plan if p.kind == "spam"}
    assert set(m.first_reject) == spammers | set(ERRED), summary
    assert spammers <= m.banned, summary
    # a client rejected because of an error reply is never banned, each try rejected
    assert m.banned.isdisjoint(ERRED), summary
    assert m.outcomes.get("erred/rejected") == 3 * len(ERRED), summary
    assert m.outcomes.get("spam/rejected") + 3 * len(ERRED) == m.rejects_logged, summary
    assert m.outcomes.get("spam/failed", 0) == 0, summary
    assert m.blocked_connections <= m.expected_blocked, summary
    assert m.expected_blocked <= m.blocked_connections + m.listen_drops, summary
    # from the client's refusal to its element in the kernel (clock of one machine)
    p95 = m.latency_quantile(0.95)
    assert len(m.latencies_ms()) == len(spammers) and p95 is not None and p95 <= 10.0, summary


@pytest.mark.parametrize("postscreen", [False, True], ids=["reject_rbl_client", "postscreen"])
def test_postfix_pack_bans_what_postfix_rejects(tmp_path: Path, postscreen: bool) -> None:
    population = Population.make(seed=11, legit=120, spam=200)
    plan = plan_for(population, seed=11)
    with postfix_frontend(tmp_path, population, postscreen=postscreen, erred=ERRED) as fe:
        outcomes = fe.play(plan)
        m = fe.measure(plan, outcomes)
        predicted = fe.simulate()
        # every error reply counted for the cut-off alarm, under its zone and kind;
        # behind postscreen, each reject after one refused as dnsbl_error
        errors = fe.metric("rblguard_dnsbl_error_replies_total", kind="open-resolver",
                           zone="spamhaus.org")
        held = fe.metric("rblguard_bans_refused_total", reason="dnsbl_error")
    print(json.dumps(m.summary()))
    assert_postfix_promise(m, plan)
    # simulate counts the connections from Postfix's own lines, as the log holds them
    assert predicted["connections"] == m.connections_logged
    assert predicted["rejects"] == m.rejects_logged - (0 if postscreen else 3 * len(ERRED))
    assert errors == 3 * len(ERRED)
    assert held == (3 * len(ERRED) if postscreen else 0)
