"""``rblguard firewall setup|status|remove``: the kernel objects, without the daemon.

An admin runs ``setup`` once (or lets the daemon do it), ``status`` to see whether the
objects are intact and how much they drop, and ``remove`` to leave nothing behind.  In
ipset ``set-only`` mode rblguard does not touch the firewall's rules, so ``setup`` and
``status`` print the lines the admin adds to shorewall or iptables to use the sets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from rblguard.config import ConfigError, load_config
from rblguard.firewall.base import Backend, FirewallError, FirewallOptions

MULTIPORT_MAX = 15


def admin_lines(options: FirewallOptions) -> list[str]:
    """What an admin adds to use the sets in set-only mode: NEW connections only.

    Only new connections are dropped: a session cut in the middle would leave rblsmtpd
    waiting on a silent peer, holding one of tcpserver's few slots until it times out.
    """
    ports = options.ports
    sw_ports = ",".join(map(str, ports)) if ports else "-"
    lines = [
        "# shorewall: /etc/shorewall/rules (and /etc/shorewall6/rules with "
        f"+{options.set_v6}),",
        "# in the NEW section, so established sessions are never cut:",
        "?SECTION NEW",
        f"DROP    net:+{options.set_v4}    $FW    tcp    {sw_ports}",
        "# or in /etc/shorewall/blrules, with BLACKLIST=\"NEW,INVALID,UNTRACKED\" "
        "(BLACKLISTNEWONLY=Yes before 4.5.13) in shorewall.conf:",
        f"DROP    net:+{options.set_v4}    $FW    tcp    {sw_ports}",
        "# iptables / ip6tables:",
    ]
    if ports is None:
        port_matches = [""]
    else:
        port_matches = [
            "-m multiport --dports " + ",".join(map(str, ports[i:i + MULTIPORT_MAX])) + " "
            for i in range(0, len(ports), MULTIPORT_MAX)]
    for tool, name in (("iptables", options.set_v4), ("ip6tables", options.set_v6)):
        for match in port_matches:
            lines.append(f"{tool} -I INPUT -p tcp {match}-m conntrack --ctstate NEW "
                         f"-m set --match-set {name} src -j DROP")
    return lines


def _daemon_counts(backend: Backend, control_socket: str) -> dict[str, int] | None:
    """The running daemon's active bans per family, if it uses this backend."""
    from rblguard.daemon.control import ControlError, request

    try:
        answer = request(control_socket, {"cmd": "status"}, timeout=10)
    except (ControlError, OSError):
        return None
    if answer.get("backend", {}).get("name") != backend.name:
        return None
    bans = answer.get("active_bans", {})
    return {"ipv4": int(bans.get("ipv4", 0)), "ipv6": int(bans.get("ipv6", 0))}


def _status(backend: Backend, control_socket: str | None = None) -> dict:
    """Everything ``status`` shows, as the one JSON object ``--json`` prints.

    Entries come from the kernel's own count where it keeps one (ipset), else from the
    running daemon's count of its bans (nftables), else they are not counted (null):
    status never reads every element (about a minute for 1,000,000 in nftables)."""
    health = backend.health()
    entries: dict[str, int] | None = {"ipv4": 0, "ipv6": 0}
    entries_from = "kernel"
    counters = {"ipv4": {"packets": 0, "connections": 0},
                "ipv6": {"packets": 0, "connections": 0}}
    problems = list(health.problems)
    try:
        counts = backend.entry_counts()
    except FirewallError as exc:
        problems.append(f"cannot count the entries: {exc}")
        counts = {}
    if counts is not None:
        entries = {"ipv4": counts.get(4, 0), "ipv6": counts.get(6, 0)}
    else:
        entries = _daemon_counts(backend, control_socket) if control_socket else None
        entries_from = "daemon" if entries is not None else None
    try:
        for family, c in backend.counters().items():
            counters[f"ipv{family}"] = {"packets": c.packets, "connections": c.connections}
    except FirewallError as exc:
        problems.append(f"cannot read the counters: {exc}")
    return {"backend": backend.name, "healthy": health.ok and not problems,
            "problems": problems, "entries": entries, "entries_from": entries_from,
            "counters": counters}


def _print_status(report: dict, options: FirewallOptions) -> None:
    print(f"backend: {report['backend']}")
    if report["healthy"]:
        print("objects: healthy")
    else:
        print("objects: PROBLEMS")
        for problem in report["problems"]:
            print(f"  - {problem}")
    entries = report["entries"]
    for fam in ("ipv4", "ipv6"):
        c = report["counters"][fam]
        count = f"{entries[fam]} entries" if entries is not None else "entries not counted"
        print(f"{fam}: {count}, {c['packets']} packets and "
              f"{c['connections']} connections dropped")
    if report["entries_from"] == "daemon":
        print("(entries: the running daemon's active bans)")
    elif entries is None:
        print("(entries: nftables keeps no count, and status does not read every element;"
              " `rblguard status` shows the daemon's active bans)")
    if report["backend"] == "ipset" and options.mode == "set-only":
        print("(set-only: the drops happen in your own rules; these counters stay 0)")


def _set_only(options: FirewallOptions) -> bool:
    return options.backend == "ipset" and options.mode == "set-only"


def main(args: argparse.Namespace) -> int:
    """Exit 0 ok, 1 unhealthy or a firewall failure, 2 a config or usage error."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"rblguard firewall: {exc}", file=sys.stderr)
        return 2
    options = config.backend
    if args.backend:
        options = dataclasses.replace(options, backend=args.backend)
    from rblguard.firewall import make_backend

    try:
        backend = make_backend(options)
    except FirewallError as exc:
        print(f"rblguard firewall: {exc}", file=sys.stderr)
        return 2
    try:
        if args.action == "setup":
            backend.ensure()
            health = backend.health()
            if not args.json:
                print(f"{backend.name}: objects "
                      + ("in place" if health.ok else "set up with problems"))
                for problem in health.problems:
                    print(f"  - {problem}")
                if _set_only(options):
                    print("\n".join(admin_lines(options)))
            else:
                print(json.dumps({"backend": backend.name, "healthy": health.ok,
                                  "problems": health.problems}))
            return 0 if health.ok else 1
        if args.action == "remove":
            backend.remove()
            if not args.json:
                print(f"{backend.name}: objects removed")
            return 0
        report = _status(backend, config.control_socket)
        if args.json:
            print(json.dumps(report))
        else:
            _print_status(report, options)
            if _set_only(options):
                print("the admin's firewall must use the sets, e.g.:")
                print("\n".join(admin_lines(options)))
        return 0 if report["healthy"] else 1
    except FirewallError as exc:
        print(f"rblguard firewall {args.action}: {exc}", file=sys.stderr)
        return 1
    finally:
        backend.close()
