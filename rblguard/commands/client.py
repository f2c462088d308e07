"""``rblguard status|list|ban|unban|reload|flush``: the admin's side of the control socket.

Arguments are checked here first (an address that does not parse, a duration like
``5x``), so a typo gets a clear answer without a daemon.  Exit status: 0 done, 1 the
daemon refused (allowlisted, ...), 2 a usage error or no daemon running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from rblguard.daemon.control import ControlError, Unreachable, normalise_target, request
from rblguard.durations import format_duration, parse_duration


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    from rblguard.config import ConfigError, load_config

    try:
        return load_config(args.config).control_socket
    except ConfigError as exc:
        raise ControlError(str(exc)) from None


def _build_request(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"cmd": args.command}
    if args.command in ("ban", "unban"):
        body["target"] = normalise_target(args.target)
    if args.command == "ban":
        try:
            body["duration"] = parse_duration(args.duration) if args.duration else None
        except ValueError as exc:
            raise ValueError(f"--for: {exc}") from None
        body["reason"] = args.reason
        body["force"] = args.force
    return body


def _when(t: Any) -> str:
    if not isinstance(t, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _print_status(r: dict[str, Any]) -> None:
    backend = r.get("backend", {})
    health = "healthy" if backend.get("healthy") else "DAMAGED: " + "; ".join(
        backend.get("problems", []))
    print(f"rblguard {r.get('version', '?')}, up {format_duration(r.get('uptime_s', 0) or 1)}")
    print(f"backend:     {backend.get('name', '?')} ({health})")
    active = r.get("active_bans", {})
    print(f"active bans: {active.get('ipv4', 0)} IPv4, {active.get('ipv6', 0)} IPv6")
    for family, c in r.get("counters", {}).items():
        print(f"blocked {family}: {c.get('connections', 0)} connections, "
              f"{c.get('packets', 0)} packets")
    for src in r.get("sources", []):
        where = (f"{src['file']} at {src.get('offset')}" if src.get("file")
                 else "not there yet (followed as soon as it appears)")
        print(f"source {src.get('path')}: {where}, "
              f"lag {src.get('lag_bytes')} bytes, last line {_when(src.get('last_time'))}")
    for rule in r.get("rules", []):
        print(f"rule {rule.get('name')} ({rule.get('file')}): {rule.get('matches', 0)} matches")
    dnsbl = r.get("dnsbl") or {}
    if dnsbl:
        print("DNSBL budget: " + ", ".join(f"{k}={v}" for k, v in dnsbl.items()))


def _print_list(r: dict[str, Any]) -> None:
    bans = r.get("bans", [])
    print(f"{'target':<40} {'remaining':>10}  {'rule':<16} reason")
    for ban in bans:
        remaining = format_duration(max(1, ban.get("remaining_s") or 1))
        print(f"{ban.get('target', '?'):<40} {remaining:>10}  {ban.get('rule') or '-':<16} "
              f"{ban.get('reason') or ''}")
    print(f"{len(bans)} active ban(s)")


def main(args: argparse.Namespace) -> int:
    try:
        body = _build_request(args)
    except ValueError as exc:
        print(f"rblguard {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        path = _socket_path(args)
    except ControlError as exc:  # the config file is bad
        print(f"rblguard {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        result = request(path, body)
    except Unreachable as exc:
        print(f"rblguard {args.command}: {exc}", file=sys.stderr)
        return 2
    except ControlError as exc:  # the daemon answered: no
        print(f"rblguard {args.command}: {exc}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    elif args.command == "status":
        _print_status(result)
    elif args.command == "list":
        _print_list(result)
    elif args.command == "ban":
        refresh = " (refreshed)" if result.get("refreshed") else ""
        print(f"banned {result.get('target')} until {_when(result.get('until'))}{refresh}")
    elif args.command == "unban":
        lifted = result.get("lifted") or []
        if result.get("removed"):
            print(f"unbanned {result.get('target')}: lifted {', '.join(lifted)}"
                  if lifted else f"unbanned {result.get('target')}")
        else:
            print(f"{result.get('target')} was not banned (removed from the kernel anyway)")
    elif args.command == "flush":
        print(f"lifted {result.get('removed', 0)} ban(s)")
    elif args.command == "reload":
        lifted = result.get("lifted") or []
        shown = ", ".join(lifted[:10]) + (" ..." if len(lifted) > 10 else "")
        print(f"reloaded: {result.get('rules')} rule(s)"
              + (f"; lifted {len(lifted)} ban(s) on allowlisted targets: {shown}"
                 if lifted else ""))
    return 0
