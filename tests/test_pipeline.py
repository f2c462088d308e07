"""The daemon's core without root: pipeline and journal with a fake kernel and real SQLite.

FakeKernel is a Backend (the seam every real backend implements) that keeps its
elements in a dict and can be told to refuse: a whole batch, or single targets.  The
state is a real State in a temporary directory.  Each test states one promise of the
core: batching, a refused batch retried, a crash between kernel and commit, held-back
saves, restore.
"""

from __future__ import annotations

import ipaddress
import math
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rblguard.config import Config
from rblguard.daemon.metrics import Metrics
from rblguard.daemon.pipeline import Pipeline, lift_allowlisted
from rblguard.decisions.allowlist import Allowlist
from rblguard.decisions.allowlist import Entry as AllowEntry
from rblguard.decisions.decider import Decider, DecisionSettings
from rblguard.firewall.base import (
    Backend,
    BatchResult,
    Counters,
    Entry,
    FirewallError,
    Health,
    Listed,
)
from rblguard.firewall.sync import restore_batches
from rblguard.model import Ban, BanPolicy, ChunkResult, Match, SourcePosition
from rblguard.store.journal import Journal
from rblguard.store.state import State


class FakeKernel(Backend):
    """Elements in a dict; ``refuse_batches`` whole batches refused, ``refuse`` targets."""

    name = "fake"

    def __init__(self) -> None:
        self.elements: dict[str, int] = {}
        self.batches: list[list[Entry]] = []
        self.refuse_batches = 0
        self.refuse: set[str] = set()
        self.ensured = 0

    def ensure(self) -> None:
        self.ensured += 1

    def ban(self, entries: Sequence[Entry]) -> BatchResult:
        if self.refuse_batches:
            self.refuse_batches -= 1
            raise FirewallError("table rblguard: No such file or directory")
        self.batches.append(list(entries))
        result = BatchResult()
        for entry in entries:
            if entry.target in self.refuse:
                result.refuse(entry.target, "refused by the test", "set_full")
            else:
                self.elements[entry.target] = entry.timeout
                result.done += 1
        return result

    def unban(self, targets: Sequence[str]) -> BatchResult:
        for target in targets:
            self.elements.pop(target, None)
        return BatchResult(done=len(targets))

    def list(self) -> list[Listed]:
        return [Listed(t, s) for t, s in self.elements.items()]

    def flush(self) -> None:
        self.elements.clear()

    def remove(self) -> None:
        self.elements.clear()

    def counters(self) -> dict[int, Counters]:
        return {4: Counters(), 6: Counters()}

    def health(self) -> Health:
        return Health(True)


def _core(state_dir: Path, allow: Sequence[str] = ()) -> tuple[Pipeline, FakeKernel]:
    allowlist = Allowlist([AllowEntry(ipaddress.ip_network(n), "test") for n in allow])
    decider = Decider(DecisionSettings.from_config(Config()), allowlist)
    journal = Journal(State(state_dir), lambda t: decider.until(t) is not None,
                      decider.history_updates)
    kernel = FakeKernel()
    pipeline = Pipeline(decider, kernel, journal, Metrics())
    pipeline.load(time.time())  # as the daemon's start-up does
    return pipeline, kernel


def _matches(*addresses: str, offset: int = 100) -> ChunkResult:
    result = ChunkResult()
    result.events = [Match("rbl", a, time.time(), f"rblsmtpd: {a} pid 1: 451 listed", offset)
                     for a in addresses]
    return result


def _position(offset: int) -> SourcePosition:
    return SourcePosition("log", "log/current", 1, 2, offset, "0:")


def _saved(state_dir: Path) -> tuple[set[str], dict[str, int]]:
    with State(state_dir) as state:
        bans = {b.target for b in state.load_bans(time.time())}
        return bans, {s: p.offset for s, p in state.load_positions().items()}


def _policy(_rule: str) -> BanPolicy:
    return BanPolicy()


def test_a_burst_is_one_kernel_batch_and_one_commit(tmp_path: Path) -> None:
    pipe, kernel = _core(tmp_path)
    pipe.decide("log", _matches("192.0.2.1", "192.0.2.2", "198.51.100.3"), _policy, time.time())
    pipe.read(_position(300))
    assert pipe.flush() == {}
    assert [sorted(e.target for e in b) for b in kernel.batches] == [
        ["192.0.2.1", "192.0.2.2", "198.51.100.3"]]
    assert all(not e.refresh for e in kernel.batches[0]), "new elements need no refresh"
    assert _saved(tmp_path) == ({"192.0.2.1", "192.0.2.2", "198.51.100.3"}, {"log": 300})


def test_a_refused_batch_is_retried_and_no_position_gets_ahead_of_it(tmp_path: Path) -> None:
    pipe, kernel = _core(tmp_path)
    kernel.refuse_batches = 2  # the batch and its retry after a repair
    pipe.decide("log", _matches("192.0.2.1"), _policy, time.time())
    pipe.read(_position(100))
    assert pipe.flush() is None
    assert kernel.ensured == 1, "a refused batch is repaired and tried once more"
    assert pipe.commit() == [] and _saved(tmp_path) == (set(), {}), \
        "nothing saved while a ban is not in the kernel"
    assert pipe.flush() == {}
    assert kernel.elements.keys() == {"192.0.2.1"}
    assert _saved(tmp_path) == ({"192.0.2.1"}, {"log": 100})


def test_a_target_the_kernel_refuses_is_neither_saved_nor_announced(tmp_path: Path) -> None:
    pipe, kernel = _core(tmp_path)
    kernel.refuse = {"192.0.2.2"}
    pipe.decide("log", _matches("192.0.2.1", "192.0.2.2"), _policy, time.time())
    pipe.read(_position(200))
    assert pipe.flush() == {"192.0.2.2": "refused by the test"}
    assert _saved(tmp_path) == ({"192.0.2.1"}, {"log": 200})
    assert pipe.metrics.registry.get_sample_value(
        "rblguard_bans_refused_total", {"reason": "set_full"}) == 1


def test_a_crash_between_kernel_and_commit_reads_the_lines_again(tmp_path: Path) -> None:
    pipe, kernel = _core(tmp_path)
    pipe.decide("log", _matches("192.0.2.1"), _policy, time.time())
    pipe.read(_position(100))
    pipe.flush(save=False)  # in the kernel; the process dies before the commit
    assert kernel.elements.keys() == {"192.0.2.1"}
    assert _saved(tmp_path) == (set(), {}), "the position is not ahead of its ban"
    again, _ = _core(tmp_path)  # the restart reads the same line again
    again.decide("log", _matches("192.0.2.1"), _policy, time.time())
    again.read(_position(100))
    again.flush()
    assert _saved(tmp_path) == ({"192.0.2.1"}, {"log": 100})


def test_held_back_saves_are_carried_by_the_next_commit(tmp_path: Path) -> None:
    pipe, _kernel = _core(tmp_path)
    db = tmp_path / "state.db"
    pipe.decide("log", _matches("192.0.2.1", "192.0.2.2"), _policy, time.time())
    pipe.read(_position(200))
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # every write fails: as good as a full disk
    pipe.journal.state.db.execute("PRAGMA busy_timeout=0")
    pipe.flush()
    assert set(pipe.journal.unsaved_bans) == {"192.0.2.1", "192.0.2.2"}
    pipe.unban(["192.0.2.2"], "manual")  # lifted while held back
    blocker.execute("ROLLBACK")
    blocker.close()
    pipe.decide("log", _matches("198.51.100.9"), _policy, time.time())
    pipe.read(_position(300))
    pipe.flush()
    assert _saved(tmp_path) == ({"192.0.2.1", "198.51.100.9"}, {"log": 300})
    assert not pipe.journal.unsaved_bans and not pipe.journal.unsaved_unbans


def test_restore_puts_every_saved_ban_back_without_refreshing(tmp_path: Path) -> None:
    pipe, _ = _core(tmp_path)
    pipe.decide("log", _matches("192.0.2.1", "2001:db8::7"), _policy, time.time())
    pipe.flush()
    again, kernel = _core(tmp_path)
    assert again.restore(time.time()) == 2
    assert kernel.elements.keys() == {"192.0.2.1", "2001:db8::/64"}  # IPv6 by its /64
    assert all(not e.refresh for e in kernel.batches[0])
    assert all(3500 < t <= 3600 for t in kernel.elements.values())


def test_a_ban_that_cannot_be_a_kernel_entry_is_dropped_not_retried(tmp_path: Path) -> None:
    pipe, kernel = _core(tmp_path)
    pipe.ban([Ban("192.0.2.1", math.inf, "rbl", "x"), Ban("192.0.2.2", math.nan, "rbl", "y"),
              Ban("192.0.2.3", time.time() + 3600, "rbl", "z")], refreshed=False)
    failed = pipe.flush()
    assert failed is not None and sorted(failed) == ["192.0.2.1", "192.0.2.2"]
    assert pipe.pending == [] and kernel.elements.keys() == {"192.0.2.3"}


def test_an_admin_ban_the_kernel_refuses_leaves_the_ban_in_force(tmp_path: Path) -> None:
    pipe, kernel = _core(tmp_path)
    verdict = pipe.decider.on_manual("192.0.2.5", 600, "test", False, time.time())
    pipe.ban_now(verdict, None)
    before = pipe.decider.until("192.0.2.5")
    kernel.refuse = {"192.0.2.5"}
    verdict = pipe.decider.on_manual("192.0.2.5", 7200, "longer", False, time.time())
    with pytest.raises(FirewallError, match="the ban already in force is unchanged"):
        pipe.ban_now(verdict, before)
    assert pipe.decider.until("192.0.2.5") == before and pipe.pending == []


def test_allowlisting_lifts_bans_but_keeps_an_admins(tmp_path: Path) -> None:
    pipe, kernel = _core(tmp_path)
    pipe.decide("log", _matches("192.0.2.1"), _policy, time.time())
    pipe.ban_now(pipe.decider.on_manual("192.0.2.9", 600, "", False, time.time()), None)
    pipe.flush()
    allow = Allowlist([AllowEntry(ipaddress.ip_network("192.0.2.0/24"), "ours")])
    assert lift_allowlisted(pipe, allow, allow) == ["192.0.2.1"]
    assert kernel.elements.keys() == {"192.0.2.9"}
    assert _saved(tmp_path)[0] == {"192.0.2.9"}


def test_flush_lifts_everything_and_saves_it(tmp_path: Path) -> None:
    pipe, kernel = _core(tmp_path)
    pipe.decide("log", _matches("192.0.2.1", "192.0.2.2"), _policy, time.time())
    pipe.flush()
    assert pipe.clear() == 2
    assert kernel.elements == {} and _saved(tmp_path)[0] == set()


def test_positions_alone_wait_but_never_past_a_stop(tmp_path: Path) -> None:
    pipe, _ = _core(tmp_path)
    pipe.decide("log", _matches("192.0.2.1"), _policy, time.time())
    pipe.read(_position(100))
    pipe.flush()  # a ban: saved at once, with its position
    assert _saved(tmp_path) == ({"192.0.2.1"}, {"log": 100})
    pipe.read(_position(900))  # lines without a ban: the position may wait ...
    assert pipe.commit() == [] and _saved(tmp_path)[1] == {"log": 100}
    pipe.decide("log", _matches("192.0.2.2"), _policy, time.time())
    pipe.read(_position(1000))
    pipe.flush()  # ... but goes with the next ban
    assert _saved(tmp_path) == ({"192.0.2.1", "192.0.2.2"}, {"log": 1000})
    pipe.read(_position(1200))
    assert [p.offset for p in pipe.commit(force=True)] == [1200]  # a stop saves it
    assert _saved(tmp_path)[1] == {"log": 1200}


def test_a_reject_after_a_dnsbl_error_reply_for_its_client_never_bans(tmp_path: Path) -> None:
    """postscreen rejects a client its dnsblog got 127.255.255.254 for as if it were
    listed, and its reject line cannot tell: that client is held, a listed one banned."""
    from rblguard.matching.rules import load_rules
    from rblguard.matching.scanner import Scanner
    from rblguard.sources.stamps import RFC3164

    stamp = time.strftime("%b %e %H:%M:%S", time.localtime())  # now: a ban of 1 h runs

    def reject(address: str) -> str:
        return (f"{stamp} mx postfix/postscreen[3]: NOQUEUE: reject: RCPT from "
                f"[{address}]:4000: 550 5.7.1 Service unavailable; client [{address}] blocked "
                "using zen.spamhaus.org; from=<a@example.net>, to=<b@example.org>, "
                "proto=ESMTP, helo=<x>\n")

    log = (f"{stamp} mx postfix/dnsblog[4]: addr 198.18.7.1 listed by domain "
           "zen.spamhaus.org as 127.255.255.254\n"
           f"{stamp} mx postfix/dnsblog[4]: addr 198.18.7.2 listed by domain "
           "zen.spamhaus.org as 127.0.0.4\n" + reject("198.18.7.1") + reject("198.18.7.2"))
    result = Scanner(load_rules(packs=("postfix",))).scan(log.encode(), 0, RFC3164, time.time())
    pipe, kernel = _core(tmp_path)
    pipe.decide("log", result, _policy, time.time())
    pipe.read(_position(len(log)))
    assert pipe.flush() == {}
    assert kernel.elements.keys() == {"198.18.7.2"}
    assert pipe.metrics.registry.get_sample_value(
        "rblguard_bans_refused_total", {"reason": "dnsbl_error"}) == 1
    # the hold ends: the same client's reject 5 minutes later is a ban
    later = ChunkResult()
    later.events = [Match("postscreen-dnsbl", "198.18.7.1", result.events[-1].time + 301,
                          reject("198.18.7.1"), 2000)]
    pipe.decide("log", later, _policy, time.time())
    pipe.read(_position(2000))
    assert pipe.flush() == {}
    assert kernel.elements.keys() == {"198.18.7.1", "198.18.7.2"}


NOW_RESTORE = 1_700_000_000.0
_UNTILS = st.one_of(
    st.floats(-1e6, 1e6).map(lambda s: NOW_RESTORE + s),
    st.sampled_from([None, math.nan, math.inf, -math.inf, 1e300, -1e300,
                     NOW_RESTORE, NOW_RESTORE + 0.5, NOW_RESTORE + 1.0, NOW_RESTORE - 0.5]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_UNTILS, max_size=40), st.integers(1, 7))
def test_restore_batches_give_each_ban_its_remaining_time(untils: list[float | None],
                                                          size: int) -> None:
    """A restart's entries, made in batches of C-level maps where every until is a
    time: each ban its whole remaining seconds, one already past 1 s, an until that is
    no time (None, NaN, infinite, beyond any timeout) left out, in order, at most
    ``size`` a batch, and never a refresh."""
    targets = [f"198.18.0.{i}" for i in range(len(untils))]
    want = [Entry(t, max(1, int(u - NOW_RESTORE)), False) for t, u in zip(targets, untils,
                                                                         strict=True)
            if u is not None and math.isfinite(u) and abs(u - NOW_RESTORE) < 1e15]
    batches = list(restore_batches(targets, untils, NOW_RESTORE, size))
    assert [e for batch in batches for e in batch] == want
    assert all(0 < len(batch) <= size for batch in batches)
    assert all(type(e) is Entry and e.refresh is False for batch in batches for e in batch)
