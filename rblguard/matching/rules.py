"""Rule files: how admins tell rblguard which log lines are RBL rejects.

One YAML file per log producer (``rules/rblsmtpd.yaml``).  A rule's ``match`` is a
regular expression anchored at the start of the message, with ``<ADDR>`` where the
client's address stands.  Its ``ignore`` patterns veto a match (a DNS lookup failure, a
DNSBL error reply), and its ``ban`` says how many matches within which window ban for
how long.  Every file carries ``samples``: lines with the outcome they must give, so a
rule file tests itself and a rule that no sample exercises is an error.

Loading checks everything once and reports the file, the line and the problem.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Any, NamedTuple

import regex
import yaml

from rblguard import yamlfile
from rblguard.durations import parse_duration
from rblguard.matching import confine
from rblguard.matching.prefix import ADDR, ADDR_CAPTURE, split_literal
from rblguard.model import BanPolicy

IGNORE_KINDS = ("lookup-error", "dnsbl-error", "other")
OUTCOMES = ("ban", "ignored", "none", "parse-error", "connection")


class RuleError(Exception):
    """A rule file cannot be used; the message names file, line and problem."""


class IgnorePattern(NamedTuple):
    name: str
    kind: str
    regex: regex.Pattern


class Sample(NamedTuple):
    line: str
    outcome: str  # one of OUTCOMES
    expect: str  # the address for "ban", the ignore name for "ignored", else the why
    rule: str | None
    file: str
    lineno: int


class Rule(NamedTuple):
    name: str
    file: str
    lineno: int
    pattern: str  # as the admin wrote it
    literal: bytes  # the fixed text the pattern starts with: what the scanner looks for
    rest: bytes  # the regular expression after that text, <ADDR> expanded
    regex: regex.Pattern  # anchored by use of .match at the message start
    ignores: tuple[IgnorePattern, ...]
    policy: BanPolicy
    veto: regex.Pattern | None = None  # all ignores in one pattern: one search a match
    error: str | None = None  # every match is an error of this kind, never a ban


class ConnectionLine(NamedTuple):
    """A producer's line for one accepted SMTP connection (tcpserver's ``pid N from
    ADDR``, Postfix's ``connect from``): each cost DNSBL queries, so ``simulate`` and
    the DNSBL budget count them.  ``behind``: the front end (postscreen) that passes
    these connections on; once its own lines are seen, these are not counted again."""

    name: str
    literal: bytes
    rest: bytes
    regex: regex.Pattern
    behind: str | None = None


def connection_line(name: str, pattern: str, where: str,
                    behind: str | None = None) -> ConnectionLine:
    """A ConnectionLine from a pattern written as a rule's match is (``<ADDR>`` once)."""
    literal, rest, compiled = _address_pattern(pattern, where, f"connection line {name}")
    return ConnectionLine(name, literal.encode(), rest.encode(), compiled, behind)


def _address_pattern(pattern: str, where: str, what: str) -> tuple[str, str, regex.Pattern]:
    """(fixed start, rest with the address group, compiled) of a rule's or a connection
    line's match: ``<ADDR>`` exactly once, within one line, after a fixed start of two
    characters at least (Exim's lines start with just "H=" after the stamp)."""
    if pattern.count(ADDR) != 1:
        raise RuleError(f"{where}: {what}: match must hold {ADDR} exactly once, where "
                        "the client's address stands")
    if pattern.startswith("^"):
        pattern = pattern[1:]  # every match is anchored at the message start anyway
    literal, rest = split_literal(within_line(pattern, f"{where}: {what}: match"))
    if len(literal) < 2:
        raise RuleError(f"{where}: {what}: match must start with the program's own "
                        f"fixed prefix (like 'rblsmtpd: '), got {pattern!r}")
    rest = rest.replace(ADDR, ADDR_CAPTURE)
    return literal, rest, _compile(re.escape(literal) + rest, where, what)


class RuleSet:
    """Every enabled rule, in load order (files by name, rules in file order), with the
    files' samples and own connection lines, and which files were read and off."""

    __slots__ = ("connections", "disabled_files", "files", "rules", "samples")

    def __init__(self, rules: list[Rule] | None = None, samples: list[Sample] | None = None,
                 connections: list[ConnectionLine] | None = None) -> None:
        self.rules: list[Rule] = [] if rules is None else rules
        self.samples: list[Sample] = [] if samples is None else samples
        self.connections: list[ConnectionLine] = [] if connections is None else connections
        self.files: list[str] = []
        self.disabled_files: list[str] = []

    def by_name(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)


def shipped_rules_dir() -> Path:
    """The rules that come with rblguard: installed beside the package, or in a checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "shipped_rules", package.parent / "rules"):
        if any(candidate.glob("*.yaml")):
            return candidate
    return package.parent / "rules"


def _where(node: Any, file: str) -> str:
    mark = getattr(node, "start_mark", None)
    return f"{file}:{mark.line + 1}" if mark is not None else file


def _compile(pattern: str, where: str, what: str) -> regex.Pattern:
    """A rule pattern compiled by the ``regex`` module, in its re-compatible mode: it
    matches with a timeout, so a pattern that backtracks catastrophically cannot stall
    the daemon (rblguard.matching.scanner bounds every match)."""
    try:
        return regex.compile(pattern.encode(), regex.MULTILINE | regex.VERSION0)
    except regex.error as exc:
        raise RuleError(f"{where}: {what}: bad regular expression {pattern!r}: {exc}") from exc


def within_line(pattern: str, what: str) -> str:
    """``pattern`` kept to one log line (rblguard.matching.confine); RuleError starting
    with ``what`` (``file:line: rule NAME: match``) for what cannot be."""
    try:
        return confine.within_line(pattern)
    except confine.ConfineError as exc:
        raise RuleError(f"{what}: {exc}") from None


class _Loader:
    """Reads one rule file, keeping YAML nodes so every error can name its line."""

    def __init__(self, path: Path) -> None:
        self.file = str(path)
        try:
            self.root = yamlfile.compose(yamlfile.read_text(path), self.file)
        except yamlfile.YamlFileError as exc:
            raise RuleError(str(exc)) from None
        except OSError as exc:
            raise RuleError(f"{self.file}: cannot read: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            line, problem = yamlfile.syntax_error(exc)
            where = f"{self.file}:{line}" if line is not None else self.file
            raise RuleError(f"{where}: not valid YAML: {problem}") from None

    def err(self, node: Any, message: str) -> RuleError:
        return RuleError(f"{_where(node, self.file)}: {message}")

    def mapping(self, node: Any, what: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise self.err(node, f"{what} must be a mapping")
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key not in allowed:
                raise self.err(key_node, f"{what}: unknown key {key!r} "
                               f"(known: {', '.join(sorted(allowed))})")
            out[key] = value_node
        return out

    def scalar(self, node: Any, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.value == "":
            raise self.err(node, f"{what} must be a non-empty text")
        return str(node.value)

    def sequence(self, node: Any, what: str) -> list[Any]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.err(node, f"{what} must be a list")
        return list(node.value)


def _load_policy(ld: _Loader, node: Any, rule_name: str) -> BanPolicy:
    fields = ld.mapping(node, f"rule {rule_name}: ban", {"for", "after", "within"})
    count, window, duration = 1, 3600.0, None
    try:
        if "after" in fields:
            count = int(ld.scalar(fields["after"], "ban.after"))
            if count < 1:
                raise ValueError("must be 1 or more")
        if "within" in fields:
            window = parse_duration(ld.scalar(fields["within"], "ban.within"))
        if "for" in fields:
            duration = parse_duration(ld.scalar(fields["for"], "ban.for"))
    except ValueError as exc:
        raise ld.err(node, f"rule {rule_name}: ban: {exc}") from exc
    return BanPolicy(count=count, window=window, duration=duration)


def _load_rule(ld: _Loader, node: Any) -> Rule:
    fields = ld.mapping(node, "a rule", {"name", "match", "ignore", "ban", "error"})
    for required in ("name", "match"):
        if required not in fields:
            raise ld.err(node, f"a rule needs {required!r}")
    name = ld.scalar(fields["name"], "rule name")
    pattern = ld.scalar(fields["match"], f"rule {name}: match")
    where = _where(fields["match"], ld.file)
    literal, rest, regex = _address_pattern(pattern, where, f"rule {name}")
    ignores = []
    error = None
    if "error" in fields:
        # A line that only ever tells of a failure (Postfix's "RBL lookup error", a
        # dnsblog answer in 127.255.255.0/24): every match is counted as that error.
        error = ld.scalar(fields["error"], f"rule {name}: error")
        if error not in IGNORE_KINDS[:2] or "ignore" in fields or "ban" in fields:
            raise ld.err(fields["error"], f"rule {name}: error must be lookup-error or "
                         "dnsbl-error, without ignore or ban: every match is that error")
        ignores.append(IgnorePattern(error, error, _compile("", where, f"rule {name}")))
    for item in ld.sequence(fields["ignore"], f"rule {name}: ignore") if "ignore" in fields else []:
        ig = ld.mapping(item, f"rule {name}: ignore", {"name", "match", "kind"})
        if "name" not in ig or "match" not in ig:
            raise ld.err(item, f"rule {name}: an ignore needs 'name' and 'match'")
        ig_name = ld.scalar(ig["name"], "ignore name")
        kind = ld.scalar(ig["kind"], "ignore kind") if "kind" in ig else (
            ig_name if ig_name in IGNORE_KINDS else "other")
        if kind not in IGNORE_KINDS:
            raise ld.err(ig["kind"], f"ignore {ig_name}: kind must be one of "
                         f"{', '.join(IGNORE_KINDS)}")
        ig_where = _where(ig["match"], ld.file)
        ig_pattern = within_line(ld.scalar(ig["match"], "ignore match"),
                                 f"{ig_where}: rule {name}: ignore {ig_name}")
        ig_regex = _compile(ig_pattern, ig_where, f"rule {name}: ignore {ig_name}")
        ignores.append(IgnorePattern(ig_name, kind, ig_regex))
    policy = _load_policy(ld, fields["ban"], name) if "ban" in fields else BanPolicy()
    veto = None
    if ignores:
        # One pattern for all ignores, and the scanner's pattern of a vetoed hit: a group
        # name used twice would break them at scan time, so they are compiled here.
        joined = "|".join(f"(?:{ig.regex.pattern.decode()})" for ig in ignores)
        veto = _compile(joined, where, f"rule {name}: its ignores together")
        together = f"{regex.pattern.decode()}(?=[^\\n]*?(?:{joined}))"
        try:  # the stdlib refuses a group name used twice, which ``regex`` allows
            re.compile(together.encode())
        except re.error as exc:
            raise RuleError(f"{where}: rule {name}: match and ignores together: bad "
                            f"regular expression {together!r}: {exc}") from exc
    return Rule(name, ld.file, node.start_mark.line + 1, pattern, literal.encode(),
                rest.encode(), regex, tuple(ignores), policy, veto, error)



def _load_sample(ld: _Loader, node: Any) -> Sample:
    fields = ld.mapping(node, "a sample", {"line", "rule", *OUTCOMES})
    if "line" not in fields:
        raise ld.err(node, "a sample needs 'line'")
    outcomes = [key for key in OUTCOMES if key in fields]
    if len(outcomes) != 1:
        raise ld.err(node, "a sample states exactly one outcome: "
                     "ban: ADDRESS, ignored: REASON, none: WHY, parse-error: WHY or "
                     "connection: ADDRESS")
    outcome = outcomes[0]
    line = ld.scalar(fields["line"], "sample line")
    if "\n" in line:
        raise ld.err(fields["line"], "a sample line is one log line: it cannot hold a newline")
    return Sample(
        line=line,
        outcome=outcome,
        expect=ld.scalar(fields[outcome], f"sample {outcome}"),
        rule=ld.scalar(fields["rule"], "sample rule") if "rule" in fields else None,
        file=ld.file,
        lineno=node.start_mark.line + 1,
    )


def _load_connections(ld: _Loader, node: Any) -> list[ConnectionLine]:
    lines = []
    for item in ld.sequence(node, "connections"):
        fields = ld.mapping(item, "a connection line", {"name", "match", "behind"})
        if "name" not in fields or "match" not in fields:
            raise ld.err(item, "a connection line needs 'name' and 'match'")
        name = ld.scalar(fields["name"], "connection line name")
        behind = ld.scalar(fields["behind"], "behind") if "behind" in fields else None
        lines.append(connection_line(name, ld.scalar(fields["match"], "match"),
                                     _where(fields["match"], ld.file), behind))
    names = {line.name for line in lines}
    for line, item in zip(lines, node.value, strict=True):
        if line.behind is not None and line.behind not in names - {line.name}:
            raise ld.err(item, f"connection line {line.name}: behind must name another "
                         f"connection line of this file ({', '.join(sorted(names))})")
    return lines


def load_rule_file(path: Path, packs: Collection[str] = ()) -> tuple[bool, list[Rule],
                                                                     list[Sample]]:
    """(enabled, rules, samples) of one file; raises RuleError naming file and line.

    A file saying ``pack: NAME`` (the Postfix and Exim rules) is enabled only when NAME
    is in ``packs`` (the config's ``packs``): those rules must not watch a qmail log.
    """
    f = read_rule_file(path, packs)
    return f.enabled, f.rules, f.samples


class RuleFile(NamedTuple):
    """One rule file as read: whether it is on, its rules, samples and connection lines."""

    enabled: bool
    rules: list[Rule]
    samples: list[Sample]
    pack: str | None
    connections: list[ConnectionLine]


def read_rule_file(path: Path, packs: Collection[str] = (), *,
                   whole: bool = True) -> RuleFile:
    """The whole of one rule file (see load_rule_file); RuleError naming file and line.

    ``whole`` False: a file that is off is read only as far as its header (its rules
    are not compiled, at a few ms a rule: each start of a qmail host skips the Postfix
    and Exim packs); ``test-rules`` reads every file whole.
    """
    ld = _Loader(path)
    if ld.root is None:
        raise RuleError(f"{ld.file}: the file is empty")
    top = ld.mapping(ld.root, "a rule file",
                     {"description", "enabled", "pack", "rules", "connections", "samples"})
    enabled = True
    if "enabled" in top:
        value = ld.scalar(top["enabled"], "enabled").lower()
        if value not in ("true", "false", "yes", "no", "on", "off"):
            raise ld.err(top["enabled"], "enabled must be true or false")
        enabled = value in ("true", "yes", "on")
    pack = ld.scalar(top["pack"], "pack") if "pack" in top else None
    if pack is not None and pack not in packs:
        enabled = False
    if "rules" not in top:
        raise ld.err(ld.root, "a rule file needs 'rules'")
    if not (enabled or whole):
        return RuleFile(enabled, [], [], pack, [])
    rules = [_load_rule(ld, item) for item in ld.sequence(top["rules"], "rules")]
    if not rules:
        raise ld.err(top["rules"], "'rules' is empty")
    samples = [_load_sample(ld, item)
               for item in (ld.sequence(top["samples"], "samples") if "samples" in top else [])]
    connections = _load_connections(ld, top["connections"]) if "connections" in top else []
    return RuleFile(enabled, rules, samples, pack, connections)


def rule_files(dirs: list[str | Path] | None = None, *, explicit: bool = False) -> list[Path]:
    """The ``*.yaml`` files of each directory, by name.

    A configured directory that does not exist simply has none (the daemon's
    ``rules_dirs``).  With ``explicit`` (directories the admin named, ``--rules DIR``) a
    directory that does not exist, is not a directory or holds no rule file is a
    RuleError naming it: a typo must not look like "no rejects".
    """
    out: list[Path] = []
    for d in dirs if dirs is not None else [shipped_rules_dir()]:
        path = Path(d)
        found = sorted(path.glob("*.yaml"))
        if explicit and not found:
            if not path.exists():
                raise RuleError(f"{d}: no such rules directory")
            if not path.is_dir():
                raise RuleError(f"{d}: not a directory (--rules names a directory of "
                                "*.yaml rule files)")
            raise RuleError(f"{d}: holds no rule file (*.yaml)")
        out.extend(found)
    return out


def load_rules(dirs: list[str | Path] | None = None, *, explicit: bool = False,
               require_enabled: bool = False, packs: Collection[str] = ()) -> RuleSet:
    """Every enabled rule of every file in ``dirs`` (None: the shipped rules).

    Rule names must be unique across files: metrics, state and bans are keyed by them.
    A file that is off is read only as far as its header (read_rule_file's ``whole``).
    ``explicit``: the directories were named by the admin, so each must exist and hold
    a rule file (see rule_files).  ``require_enabled``: no enabled rule at all is a
    RuleError, for whoever would otherwise silently watch logs for nothing.
    """
    ruleset = RuleSet()
    seen: dict[str, Rule] = {}
    known_packs: set[str] = set()
    for path in rule_files(dirs, explicit=explicit):
        f = read_rule_file(path, packs, whole=False)
        if f.pack is not None:
            known_packs.add(f.pack)
        if not f.enabled:
            ruleset.disabled_files.append(str(path))
            continue
        for rule in f.rules:
            if rule.name in seen:
                other = seen[rule.name]
                raise RuleError(f"{rule.file}:{rule.lineno}: rule name {rule.name!r} is "
                                f"already used at {other.file}:{other.lineno}")
            seen[rule.name] = rule
        ruleset.rules.extend(f.rules)
        ruleset.samples.extend(f.samples)
        ruleset.connections.extend(f.connections)
        ruleset.files.append(str(path))
    unknown = sorted(set(packs) - known_packs)
    if unknown:
        raise RuleError(f"pack {unknown[0]!r} is in no rule file (known: "
                        f"{', '.join(sorted(known_packs)) or 'none'})")
    if require_enabled and not ruleset.rules:
        searched = [str(d) for d in (dirs if dirs is not None else [shipped_rules_dir()])]
        where = f"in {', '.join(searched)}" if searched else "(no rules directory to read)"
        disabled = (f"; {len(ruleset.disabled_files)} file(s) say enabled: false"
                    if ruleset.disabled_files else "")
        raise RuleError(f"no enabled rule {where}{disabled}: nothing would ever be banned")
    return ruleset


# tcpserver -v writes one of these per accepted connection; each one reached rblsmtpd
# or qmail-smtpd's own check.  Other producers' connection lines come with their rules.
TCPSERVER = connection_line("tcpserver", r"tcpserver: pid \d+ from <ADDR>$", "built-in")
