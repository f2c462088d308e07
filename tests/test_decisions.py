"""Decider: thresholds, escalation, refresh, backlog, prefixes, subnets, storms, allowlist."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from rblguard.config import Config, RepeatSettings, StormSettings, SubnetSettings, parse_config
from rblguard.decisions.allowlist import Allowlist, Entry
from rblguard.decisions.decider import Decider, DecisionSettings
from rblguard.model import Ban, BanPolicy, Match, Offender

T0 = 1_700_000_000.0
H = 3600.0
ONE = BanPolicy()


def _allow(*nets: str) -> Allowlist:
    import ipaddress

    return Allowlist([Entry(ipaddress.ip_network(n), "test") for n in nets])


def _decider(allow: Allowlist | None = None, **changes: object) -> Decider:
    settings = dataclasses.replace(DecisionSettings.from_config(Config()), **changes)
    return Decider(settings, allow or _allow())


def _m(address: str, time: float | None = T0, rule: str = "rbl") -> Match:
    return Match(rule, address, time, f"rblsmtpd: {address} pid 1: 451 listed", 0)


def test_from_config() -> None:
    cfg = parse_config("ban_time: 2h\nrepeat: off\nipv6_prefix: 128\n"
                       "ipv4_subnet: {after: 3}\nstorm: {max_active: 5}\n")
    s = DecisionSettings.from_config(cfg)
    assert (s.ban_time, s.repeat, s.ipv6_prefix) == (7200.0, None, 128)
    assert s.ipv4_subnet == SubnetSettings(3, 24) and s.storm.max_active == 5


def test_first_reject_bans_until_log_time_plus_ban_time() -> None:
    d = _decider()
    v = d.on_match(_m("198.51.100.7"), ONE, T0 + 5)
    assert v.bans == [Ban("198.51.100.7", T0 + H, "rbl", _m("198.51.100.7").line)]
    assert not (v.refused or v.pending or v.stale or v.refreshed)
    assert d.active_counts() == {4: 1, 6: 0}
    # unstamped logs: the wall clock stands in
    assert d.on_match(_m("198.51.100.8", None), ONE, T0 + 5).bans[0].until == T0 + 5 + H


def test_threshold_counts_within_the_window_per_rule() -> None:
    d = _decider()
    policy = BanPolicy(count=3, window=600)
    assert d.on_match(_m("192.0.2.1", T0), policy, T0).pending
    assert d.on_match(_m("192.0.2.1", T0 + 100, rule="other"), policy, T0).pending
    assert d.on_match(_m("192.0.2.1", T0 + 700), policy, T0 + 700).pending  # T0 aged out
    assert d.on_match(_m("192.0.2.1", T0 + 800), policy, T0 + 800).pending
    v = d.on_match(_m("192.0.2.1", T0 + 900), policy, T0 + 900)
    assert [b.until for b in v.bans] == [T0 + 900 + H]


def test_repeat_offenders_escalate_and_are_capped_and_forgotten() -> None:
    d = _decider(repeat=RepeatSettings(factor=2, max=5 * H, forget_after=10 * 86400))
    durations = []
    t = T0
    for _ in range(5):
        v = d.on_match(_m("203.0.113.9", t), ONE, t)
        durations.append(v.bans[0].until - t)
        t = v.bans[0].until + 1  # the previous ban has expired at log time
        d.expire(t)
    assert durations == [H, 2 * H, 4 * H, 5 * H, 5 * H]
    assert d.history_of("203.0.113.9") == 5
    t += 11 * 86400  # quiet for longer than forget_after
    assert d.on_match(_m("203.0.113.9", t), ONE, t).bans[0].until - t == H
    assert d.history_of("203.0.113.9") == 1


def test_repeat_off_and_rule_duration() -> None:
    d = _decider(repeat=None)
    assert d.on_match(_m("203.0.113.1"), ONE, T0).bans[0].until == T0 + H
    d.flush()
    assert d.on_match(_m("203.0.113.1"), ONE, T0).bans[0].until == T0 + H
    policy = BanPolicy(duration=60)
    assert d.on_match(_m("203.0.113.2"), policy, T0).bans[0].until == T0 + 60


def test_refresh_extends_never_shortens_and_does_not_escalate() -> None:
    d = _decider()
    d.on_match(_m("198.18.1.1", T0), ONE, T0)
    v = d.on_match(_m("198.18.1.1", T0 + 600), ONE, T0 + 600)
    assert v.refreshed and [b.until for b in v.bans] == [T0 + 600 + H]
    assert d.history_of("198.18.1.1") == 1
    d.on_manual("198.18.1.2", "1d", "by hand", False, T0)
    v = d.on_match(_m("198.18.1.2", T0 + 10), ONE, T0 + 10)
    assert v.bans == [] and not v.refreshed and d.until("198.18.1.2") == T0 + 86400


def test_backlog_skips_bans_already_over() -> None:
    d = _decider()
    v = d.on_match(_m("198.18.2.2", T0 - 2 * H), ONE, T0)
    assert v.stale and v.bans == [] and len(d) == 0
    v = d.on_match(_m("198.18.2.3", T0 - H / 2), ONE, T0)
    assert [b.until for b in v.bans] == [T0 + H / 2]


def test_ipv6_prefix_bans() -> None:
    d = _decider()
    assert d.on_match(_m("2001:db8:1:2::17"), ONE, T0).bans[0].target == "2001:db8:1:2::/64"
    v = d.on_match(_m("2001:db8:1:2:ffff::1", T0 + 60), ONE, T0 + 60)
    assert v.refreshed and v.bans[0].target == "2001:db8:1:2::/64"
    assert d.active_counts() == {4: 0, 6: 1}
    single = _decider(ipv6_prefix=128)
    assert single.on_match(_m("2001:db8:1:2::17"), ONE, T0).bans[0].target == \
        "2001:db8:1:2::17"
    # a /64 that holds an allowlisted address: only the offender itself is banned
    friendly = _decider(_allow("2001:db8:9:9::25/128"))
    assert friendly.on_match(_m("2001:db8:9:9::66"), ONE, T0).bans[0].target == \
        "2001:db8:9:9::66"


def test_ipv4_subnet_after_k_addresses_keeps_singles() -> None:
    d = _decider(ipv4_subnet=SubnetSettings(after=3))
    assert len(d.on_match(_m("198.51.100.1"), ONE, T0).bans) == 1
    assert len(d.on_match(_m("198.51.100.2"), ONE, T0).bans) == 1
    v = d.on_match(_m("198.51.100.3"), ONE, T0)
    assert [b.target for b in v.bans] == ["198.51.100.3", "198.51.100.0/24"]
    assert d.until("198.51.100.1") is not None  # singles are kept
    v = d.on_match(_m("198.51.100.4", T0 + 60), ONE, T0 + 60)
    assert [b.target for b in v.bans] == ["198.51.100.0/24"] and v.refreshed
    assert d.on_match(_m("198.51.101.1"), ONE, T0).bans[0].target == "198.51.101.1"
    # a subnet with an allowlisted address is never banned whole
    guarded = _decider(_allow("203.0.113.200/32"), ipv4_subnet=SubnetSettings(after=2))
    guarded.on_match(_m("203.0.113.1"), ONE, T0)
    assert [b.target for b in guarded.on_match(_m("203.0.113.2"), ONE, T0).bans] == \
        ["203.0.113.2"]
    # expiry of singles lowers the count: the subnet needs `after` active ones again
    d2 = _decider(ipv4_subnet=SubnetSettings(after=2))
    d2.on_match(_m("192.0.2.1"), ONE, T0)
    d2.expire(T0 + H)
    assert len(d2.on_match(_m("192.0.2.2", T0 + H), ONE, T0 + H).bans) == 1


def test_allowlist_refuses_and_counts() -> None:
    d = _decider(_allow("192.0.2.0/24"))
    v = d.on_match(_m("192.0.2.44"), ONE, T0)
    assert v.refused == "allowlist" and v.bans == [] and "192.0.2.0/24" in (v.message or "")
    assert d.refusals == {"allowlist": 1} and len(d) == 0


def test_storm_guard_rate_and_active() -> None:
    d = _decider(storm=StormSettings(max_active=1_000_000, max_per_second=100))
    outcomes = [d.on_match(_m(f"198.18.3.{i}"), ONE, T0) for i in range(150)]
    assert sum(1 for v in outcomes if v.bans) == 100
    assert {v.refused for v in outcomes if not v.bans} == {"storm_rate"}
    assert d.on_match(_m("198.18.4.1", T0 + 0.5), ONE, T0 + 0.5).bans  # it refills
    small = _decider(storm=StormSettings(max_active=3, max_per_second=1000))
    results = [small.on_match(_m(f"198.18.5.{i}"), ONE, T0) for i in range(5)]
    assert [v.refused for v in results] == [None, None, None, "storm_active", "storm_active"]
    assert small.refusals == {"storm_active": 2} and len(small) == 3
    # refreshing a ban already there is not a new ban: allowed at the limit
    assert small.on_match(_m("198.18.5.0", T0 + 5), ONE, T0 + 5).refreshed


def test_storm_rate_runs_on_log_time_so_a_backlog_is_banned_in_full() -> None:
    """After downtime, an hour of log with 20 new offenders a second is read in one go:
    every one of them is banned (the old wall-clock bucket refused all but 100)."""
    d = _decider(storm=StormSettings(max_active=1_000_000, max_per_second=100))
    now = T0 + 3600  # the wall clock: everything below is read at this one instant
    results = [d.on_match(_m(f"198.18.{i >> 8}.{i & 255}", T0 + i / 20), ONE, now, "log")
               for i in range(20 * 3000)]
    assert all(v.bans for v in results if not v.stale)
    assert sum(1 for v in results if v.bans) > 50_000 and "storm_rate" not in d.refusals
    # a flood in log time (1,000 new offenders within one second of log) is still refused
    flood = [d.on_match(_m(f"198.19.{i >> 8}.{i & 255}", now + i / 1000), ONE, now, "log")
             for i in range(1000)]
    assert sum(1 for v in flood if v.bans) < 250
    assert {v.refused for v in flood if not v.bans} == {"storm_rate"}


def test_storm_rate_bucket_per_source_and_a_bogus_stamp_does_not_stop_banning() -> None:
    d = _decider(storm=StormSettings(max_active=1_000_000, max_per_second=10))
    # a stamp far in the future, then the real time again: banning goes on
    assert d.on_match(_m("198.18.8.1", T0 + 10**9), ONE, T0, "a").bans
    got = [d.on_match(_m(f"198.18.9.{i}", T0 + i), ONE, T0, "a").bans for i in range(30)]
    assert all(got)
    # one source catching up on old lines does not eat another's budget, nor the reverse
    live = [d.on_match(_m(f"198.18.10.{i}", T0 + 100 + i / 10), ONE, T0 + 100, "b")
            for i in range(10)]
    old = [d.on_match(_m(f"198.18.11.{i}", T0 + 50 + i / 10), ONE, T0 + 100, "c")
           for i in range(10)]
    assert all(v.bans for v in live + old)


def test_defaults_let_a_wave_of_1000_bans_a_second_through() -> None:
    d = _decider()
    results = [d.on_match(_m(f"198.18.{i >> 8}.{i & 255}", T0 + i / 1000), ONE,
                          T0 + i / 1000) for i in range(3000)]
    assert all(v.bans for v in results)


def test_manual_ban_unban_flush() -> None:
    d = _decider(_allow("192.0.2.0/28"))
    v = d.on_manual("198.51.100.0/24", "10m", "spam wave", False, T0)
    assert v.bans == [Ban("198.51.100.0/24", T0 + 600, "manual", "spam wave")]
    v = d.on_manual("192.0.2.0/24", None, "", False, T0)
    assert v.refused == "allowlist" and "--force" in (v.message or "")
    v = d.on_manual("192.0.2.5", 60, "", True, T0)
    assert v.bans[0].until == T0 + 60
    assert d.on_manual("nonsense", None, "", False, T0).refused == "invalid"
    assert d.on_manual("198.51.100.9", "soon", "", False, T0).refused == "invalid"
    v = d.on_manual("198.51.100.0/24", "1m", "", False, T0)
    assert v.refreshed and d.until("198.51.100.0/24") == T0 + 60  # admin may shorten
    assert d.unban("198.51.100.0/24") and not d.unban("198.51.100.0/24")
    d.flush()
    assert d.active_counts() == {4: 0, 6: 0}


def test_expire_load_and_history_updates() -> None:
    d = _decider()
    d.load([Ban("198.18.6.1", T0 + 10, "rbl", "x"), Ban("2001:db8::/64", T0 + 20, "r", "y")],
           [Offender("198.18.6.1", 2, T0 - 100)])
    assert d.history_of("198.18.6.1") == 2 and d.active_counts() == {4: 1, 6: 1}
    assert d.expire(T0 + 5) == []
    assert d.expire(T0 + 10) == ["198.18.6.1"]
    v = d.on_match(_m("198.18.6.1", T0 + 11), ONE, T0 + 11)
    assert v.bans[0].until == T0 + 11 + 4 * H  # two earlier bans: factor 2 twice
    assert d.history_updates(v.bans) == [Offender("198.18.6.1", 3, float(int(T0 + 11)))]
    assert sorted(d.active_items()) == [("198.18.6.1", T0 + 11 + 4 * H),
                                        ("2001:db8::/64", T0 + 20)]


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 20_000)), max_size=60))
def test_active_bans_never_shorten_and_match_the_kernel_view(
        events: list[tuple[int, int]]) -> None:
    """Whatever the order of matches: a ban's until only grows, and what the Decider
    says is active is exactly what its verdicts put there and has not yet expired."""
    d = _decider(storm=StormSettings(max_active=30, max_per_second=10**6))
    kernel: dict[str, float] = {}
    for host, dt in sorted(events, key=lambda e: e[1]):
        now = T0 + dt
        d.expire(now)
        kernel = {t: u for t, u in kernel.items() if u > now}
        v = d.on_match(_m(f"198.18.7.{host}", now), ONE, now)
        for ban in v.bans:
            assert ban.until > kernel.get(ban.target, 0.0)
            kernel[ban.target] = ban.until
        assert dict(d.active_items()) == kernel
        assert len(kernel) <= 30


def test_overlapping_finds_every_ban_that_blocks_an_address_or_network() -> None:
    d = _decider(ipv4_subnet=SubnetSettings(after=2))
    d.on_match(_m("2001:db8:1:2::7"), ONE, T0)  # banned as its /64
    d.on_manual("2001:db8:1::/48", "1h", "", False, T0)
    d.on_manual("2001:db8:1:2::7", "1h", "", False, T0)
    assert sorted(d.overlapping("2001:db8:1:2::7")) == [
        "2001:db8:1:2::/64", "2001:db8:1:2::7", "2001:db8:1::/48"]
    assert d.overlapping("2001:db8:1:3::1") == ["2001:db8:1::/48"]
    d.on_match(_m("198.51.100.1"), ONE, T0)
    d.on_match(_m("198.51.100.2"), ONE, T0)  # and the /24 with it
    assert sorted(d.overlapping("198.51.100.2")) == ["198.51.100.0/24", "198.51.100.2"]
    assert d.overlapping("198.51.100.3") == ["198.51.100.0/24"]
    # a network: the bans covering it and the bans inside it
    assert sorted(d.overlapping("198.51.100.0/25")) == [
        "198.51.100.0/24", "198.51.100.1", "198.51.100.2"]
    assert d.overlapping("192.0.2.1") == []


def test_restore_puts_back_what_a_refused_manual_ban_replaced() -> None:
    d = _decider()
    d.on_manual("198.18.1.1", "1h", "", False, T0)
    d.on_manual("198.18.1.1", "5m", "", False, T0)
    d.restore("198.18.1.1", T0 + H)
    assert d.until("198.18.1.1") == T0 + H
    d.on_manual("198.18.1.2", "5m", "", False, T0)
    d.restore("198.18.1.2", None)
    assert d.until("198.18.1.2") is None and len(d) == 1


def test_durations_are_finite_everywhere() -> None:
    d = _decider()
    for bad in (float("inf"), float("nan"), 1e300, -1, 0, "400d"):
        v = d.on_manual("198.18.2.1", bad, "", False, T0)  # type: ignore[arg-type]
        assert v.refused == "invalid" and not v.bans, bad
    # an escalation that would overflow a float is cut at repeat.max, never raises
    huge = _decider(repeat=RepeatSettings(factor=1e200, max=7 * 86400, forget_after=1e6))
    huge.load([], [Offender("198.18.2.2", 200, T0 - 10)])
    assert huge.on_match(_m("198.18.2.2"), ONE, T0).bans[0].until == T0 + 7 * 86400


def test_history_is_forgotten_with_repeat_off_too() -> None:
    d = _decider(repeat=None)
    d.load([], [Offender("198.18.3.1", 2, T0 - 40 * 86400)])
    d.on_match(_m("198.18.3.2"), ONE, T0)
    d.expire(T0 + H)
    assert d.history_of("198.18.3.1") == 0 and d.history_of("198.18.3.2") == 1
