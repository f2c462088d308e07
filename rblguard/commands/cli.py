"""The ``rblguard`` command line: every word and option is declared here, once.

Each sub-command's work lives in its own module, imported only when that command runs,
so ``rblguard scan`` never pays for the firewall, metrics or inotify libraries.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rblguard import DEFAULT_CONFIG as DEFAULT_PATH
from rblguard import __version__

# command -> "module:function"; the function takes the parsed arguments, returns the exit status
COMMANDS: dict[str, str] = {
    "scan": "rblguard.commands.scan:main",
    "test-rules": "rblguard.commands.testrules:main",
    "simulate": "rblguard.commands.simulate:main",
    "run": "rblguard.commands.run:main",
    "status": "rblguard.commands.client:main",
    "list": "rblguard.commands.client:main",
    "ban": "rblguard.commands.client:main",
    "unban": "rblguard.commands.client:main",
    "reload": "rblguard.commands.client:main",
    "flush": "rblguard.commands.client:main",
    "firewall": "rblguard.commands.firewall:main",
}


def _add_rules_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rules",
        metavar="DIR",
        action="append",
        help="rule directory (repeatable; default: the rules shipped with rblguard)",
    )
    parser.add_argument(
        "--pack", metavar="NAME", action="append", default=[], dest="packs",
        help="turn on a rule pack, as the config's packs: (repeatable: postfix, exim)",
    )


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help=f"config file naming the control socket (default {DEFAULT_PATH})",
    )
    parser.add_argument(
        "--socket", metavar="PATH", help="control socket (default: from the config file)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rblguard",
        description="Ban DNSBL-rejected SMTP clients in the kernel so their retries cost "
        "no DNSBL query.",
    )
    parser.add_argument("--version", action="version", version=f"rblguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("scan", help="read logs from start to end and report RBL rejects")
    _add_rules_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--list", action="store_true", help="print every offending address")
    p.add_argument("--top", type=int, default=10, metavar="N", help="top offenders shown")
    p.add_argument("paths", nargs="+", metavar="PATH", help="log file or multilog directory")

    p = sub.add_parser("test-rules", help="check rule files and their samples, optionally on logs")
    _add_rules_option(p)
    p.add_argument("paths", nargs="*", metavar="PATH", help="logs to try the rules on")

    p = sub.add_parser("simulate", help="predict the DNSBL queries rblguard would save")
    _add_rules_option(p)
    p.add_argument(
        "--ban-time", default="10m,1h,1d", metavar="LIST",
        help="comma-separated ban times to compare (default 10m,1h,1d)",
    )
    p.add_argument(
        "--threshold", default="1/1h", metavar="N/WINDOW",
        help="rejects within WINDOW before a ban (default 1/1h: the first reject bans)",
    )
    p.add_argument(
        "--zones", default="2", metavar="N|LIST",
        help="RBL zones rblsmtpd asks (a count, or names in order; default 2)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("paths", nargs="+", metavar="PATH", help="log file or multilog directory")

    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.add_argument(
        "--config", metavar="FILE", default=None,
        help=f"config file (default {DEFAULT_PATH}; defaults apply when it is absent)",
    )
    p.add_argument(
        "--check", action="store_true", help="check the config and rules, then exit"
    )

    p = sub.add_parser("status", help="show the daemon's sources, rules, bans and health")
    _add_client_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("list", help="list active bans")
    _add_client_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("ban", help="ban an address or network now")
    _add_client_options(p)
    p.add_argument("target", metavar="ADDR|CIDR")
    p.add_argument("--for", dest="duration", metavar="DURATION", help="e.g. 90s, 10m, 1h, 7d")
    p.add_argument("--reason", metavar="TEXT", default="", help="why (kept with the ban)")
    p.add_argument("--force", action="store_true", help="ban even if allowlisted")

    p = sub.add_parser("unban", help="lift a ban")
    _add_client_options(p)
    p.add_argument("target", metavar="ADDR|CIDR")

    p = sub.add_parser("reload", help="re-read config, rules and allowlists")
    _add_client_options(p)

    p = sub.add_parser("flush", help="lift every ban")
    _add_client_options(p)

    p = sub.add_parser("firewall", help="set up, inspect or remove the firewall objects")
    p.add_argument("action", choices=["setup", "status", "remove"])
    p.add_argument("--backend", choices=["nftables", "ipset"], help="default: from config")
    p.add_argument(
        "--config", metavar="FILE", default=None,
        help=f"config file with backend options (default {DEFAULT_PATH})",
    )
    p.add_argument("--json", action="store_true", help="status as one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, _, function_name = COMMANDS[args.command].partition(":")
    handler = getattr(importlib.import_module(module_name), function_name)
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `rblguard scan --list log | head` closes our stdout early: not an error.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
