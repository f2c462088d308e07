"""``rblguard run``: start the daemon in the foreground (systemd runs it so), or
``--check`` the config and the rules and exit."""

from __future__ import annotations

import argparse
import logging
import sys

from rblguard.config import ConfigError, load_config
from rblguard.daemon.control import ControlError
from rblguard.daemon.listen import MetricsAddressError
from rblguard.daemon.loop import Daemon
from rblguard.daemon.reload import ruleset_of
from rblguard.firewall.base import FirewallError
from rblguard.logs import setup_logging
from rblguard.matching.rules import RuleError

log = logging.getLogger("rblguard")


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"rblguard: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    if args.check:
        try:
            ruleset = ruleset_of(config)
        except RuleError as exc:
            print(f"rblguard: {exc}", file=sys.stderr)
            return 2
        print(f"config {config.path or args.config or 'defaults'} OK; "
              f"{len(ruleset.rules)} rule(s) from {len(ruleset.files)} file(s)")
        return 0
    try:
        return Daemon(config, args.config).run()
    except RuleError as exc:
        log.error("%s", exc)
    except FirewallError as exc:
        log.error("firewall: %s", exc)
        return 1
    except (ControlError, MetricsAddressError) as exc:  # socket taken, port taken, ...
        log.error("cannot start: %s", getattr(exc, "strerror", None) or exc)
    except OSError as exc:  # a directory or file the daemon needs cannot be made
        where = f" {exc.filename}" if exc.filename else ""
        log.error("cannot start:%s %s", where, exc.strerror or exc)
    return 2
