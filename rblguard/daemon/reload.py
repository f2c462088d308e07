"""What a reload re-reads, and noticing when it is due.

A reload (SIGHUP, ``rblguard reload``, or a saved rule or tcprules file) applies the
config keys in RELOADED_KEYS and the rules; the other keys (backend, sources, ...) need
a restart, and a reload says so instead of half-applying them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

from rblguard.config import Config, ConfigError, load_config
from rblguard.daemon import sdnotify
from rblguard.daemon.pipeline import lift_allowlisted
from rblguard.decisions.allowlist import Allowlist
from rblguard.matching.rules import RuleError, RuleSet, load_rules, rule_files, shipped_rules_dir
from rblguard.matching.scanner import Scanner

if TYPE_CHECKING:
    from rblguard.daemon.loop import Daemon

log = logging.getLogger("rblguard")

RELOADED_KEYS = ("allowlist", "tcprules", "rules_dirs", "shipped_rules", "packs")


def ruleset_of(config: Config) -> RuleSet:
    """The rules ``config`` names (RuleError if a file is bad or none is enabled)."""
    dirs = ([shipped_rules_dir()] if config.shipped_rules else []) + [
        d for d in config.rules_dirs if os.path.isdir(d)]
    return load_rules(dirs, require_enabled=True, packs=config.packs)


def reread_config(running: Config, path: str | None) -> Config:
    """The config file again, with the keys a reload applies taken from it and the
    rest kept as running (ConfigError if the file is bad: nothing changes).  A file
    that existed at start must still exist."""
    fresh = load_config(path, must_exist=path is not None or running.path is not None)
    later = sorted(set(fresh.changed(running)) - set(RELOADED_KEYS))
    if later:
        log.warning("%s: %s changed; that takes a restart (a reload applies %s)",
                    fresh.path or path, ", ".join(later), ", ".join(RELOADED_KEYS))
    return dataclasses.replace(running, path=fresh.path or running.path,
                               **{k: getattr(fresh, k) for k in RELOADED_KEYS})


class Triggers:
    """The modification times of the rule files and the tcprules file: a change to
    any of them means a reload is due (the admin saved a file)."""

    def __init__(self) -> None:
        self._seen: tuple[dict[str, float], float | None] = ({}, None)

    def remember(self, config: Config) -> None:
        """Take the times now (OSError if a directory vanished meanwhile)."""
        self._seen = self._times(config)

    def changed(self, config: Config) -> bool:
        """Whether any file changed since remember(); the new times are taken."""
        old = self._seen
        try:
            self._seen = self._times(config)
        except OSError:
            return False
        return self._seen != old

    @staticmethod
    def _times(config: Config) -> tuple[dict[str, float], float | None]:
        dirs = [d for d in (shipped_rules_dir(), *config.rules_dirs) if os.path.isdir(d)]
        rules = {str(p): p.stat().st_mtime for p in rule_files(dirs)}
        tcprules: Any = config.tcprules
        when = (os.stat(tcprules).st_mtime
                if tcprules and os.path.exists(tcprules) else None)
        return rules, when


def apply(d: Daemon, *, raise_errors: bool = False) -> dict[str, Any]:
    """Re-read the config file's allowlist, tcprules and rule directories, the rules
    and the host's addresses, then lift the bans the new allowlist holds.  A bad
    edit (config or rule) keeps everything as it was and is raised only for
    `rblguard reload`, whose caller shows it; a signal or a file change just logs
    it (file, line, problem)."""
    sdnotify.reloading()
    try:
        config = reread_config(d.config, d.config_arg)
        ruleset = ruleset_of(config)
    except (ConfigError, RuleError) as exc:
        d.metrics.reload(False)
        log.error("reload failed, keeping the config and the %d rules in use: %s",
                  len(d.ruleset.rules), exc)
        sdnotify.ready()
        if raise_errors:
            raise
        return {"rules": len(d.ruleset.rules), "changed": [], "lifted": [],
                "error": str(exc)}
    changed = sorted({r.name for r in d.ruleset.rules} ^ {r.name for r in ruleset.rules})
    d.config, d.ruleset, d.scanner = config, ruleset, Scanner(ruleset, connection_events=False)
    old_allowlist, d.allowlist = d.allowlist, Allowlist.from_config(config)
    d.decider.set_allowlist(d.allowlist)
    lifted = lift_allowlisted(d.pipeline, d.allowlist, old_allowlist)
    with contextlib.suppress(OSError):
        d.triggers.remember(config)  # the directories and tcprules may be new ones
    d.metrics.reload(True)
    log.info("reloaded %d rule(s) from %d file(s)%s; allowlist of %d entries",
             len(ruleset.rules), len(ruleset.files),
             f"; changed: {', '.join(changed)}" if changed else "", len(d.allowlist))
    sdnotify.ready()
    return {"rules": len(ruleset.rules), "changed": changed, "lifted": lifted}
