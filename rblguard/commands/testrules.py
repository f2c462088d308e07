"""``rblguard test-rules``: prove rule files before they ban anyone.

Every rule file carries sample lines with the outcome each must give.  This command
loads every file (disabled ones too: an admin checks an example before enabling it),
runs every sample through the same buffer scanner the daemon and ``rblguard scan`` use
(each sample alone, and all of a file's samples together as one log, so that a pattern
reaching into another line would show), and insists that each rule
and each ignore pattern is exercised by at least one sample and that each file has a
must-not-match sample.  Given logs, it also shows what each rule matched and, above all,
the reject-looking lines that no rule matched or ignored: the lines a rule is missing.

Exit status: 0 all good, 1 a sample or check failed, 2 a file could not be read or parsed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from rblguard.matching import prefilter
from rblguard.matching.rules import (
    ConnectionLine,
    Rule,
    RuleError,
    RuleSet,
    Sample,
    read_rule_file,
    rule_files,
)
from rblguard.matching.scanner import Scanner
from rblguard.model import ChunkResult, Connection, Ignored, Match, ParseError
from rblguard.sources.files import log_files, read_complete_lines
from rblguard.sources.stamps import NONE, TAI64N, StampFormat, detect_format, split_line

# A line "looks like a reject" when a program's own prefix is followed by an SMTP 4xx/5xx
# code: rblsmtpd's lines, and similar lines of other DNSBL checkers.
_REJECT_LOOKING = re.compile(rb"^(?:rblsmtpd|qmail-smtpd|qmail-dnsbl|rbl\w*): .*?\b[45]\d\d\b")
SHOW_PER_RULE = 5


Outcome = tuple[str, str, str | None]  # (outcome, address or ignore name, rule)
NO_EVENT: Outcome = ("none", "", None)
# The daemon reads multilog files: samples are also tried behind a multilog stamp.
SAMPLE_STAMP = b"@4000000065a1d28a302953e2 "


def _event_outcome(event: object) -> Outcome:
    if isinstance(event, Match):
        return "ban", event.address, event.rule
    if isinstance(event, Ignored):
        return "ignored", event.reason, event.rule
    if isinstance(event, ParseError):
        return "parse-error", "", event.rule
    if isinstance(event, Connection):
        return "connection", event.address, event.via
    return NO_EVENT


def _counted(outcome: Outcome) -> Outcome:
    """What `rblguard scan` can tell of an outcome: connections only as a count."""
    return ("connection", "", None) if outcome[0] == "connection" else outcome


def _log(lines: list[bytes], stamp: bytes) -> tuple[bytes, StampFormat]:
    """Sample lines as a log buffer, with or without a multilog stamp, and its format."""
    return b"".join(stamp + line + b"\n" for line in lines), TAI64N if stamp else NONE


def _scanned(scanner: Scanner, lines: list[bytes], stamp: bytes = b"") -> list[Outcome]:
    """The outcome of each line, scanned as one log buffer the way the daemon scans."""
    buf, fmt = _log(lines, stamp)
    by_end = {e.offset: _event_outcome(e) for e in scanner.scan(buf, 0, fmt, 0.0).events}
    out, end = [], 0
    for line in lines:
        end += len(stamp) + len(line) + 1
        out.append(by_end.get(end, NO_EVENT))
    return out


def _tallies(scanner: Scanner, lines: list[bytes], stamp: bytes = b"") -> list[Counter[Outcome]]:
    """What `rblguard scan` counts in the same buffer (it counts, it does not list), by
    each of its paths: searching whole windows, and searching only the lines its
    compiled prefilter picks where that is built (rblguard.matching.prefilter)."""
    buf, fmt = _log(lines, stamp)
    counts = []
    for use in (False, True) if prefilter.available() else (False,):
        scanner.use_prefilter = use
        counts.append(_counts(scanner.tally(buf, 0, fmt, 0.0)))
    return counts


def _counts(result: ChunkResult) -> Counter[Outcome]:
    counted: Counter[Outcome] = Counter()
    for (rule, address), n in (result.match_counts or {}).items():
        counted["ban", address, rule] += n
    for event in result.events:
        counted[_event_outcome(event)] += 1
    if result.connection_count:
        counted["connection", "", None] += result.connection_count
    return counted


def _check_paths(scanner: Scanner, samples: list[Sample]) -> tuple[list[Outcome], list[str]]:
    """Each sample's outcome through the daemon's buffer scanner, and every way in which
    another path disagrees: the line path (syslog), a multilog stamp, `rblguard scan`'s
    counting, and all samples scanned together as one log (where a pattern that ran on
    into the next line would show)."""
    problems: list[str] = []
    lines = [s.line.encode() for s in samples]
    alone = [_scanned(scanner, [line])[0] for line in lines]
    for sample, line, got in zip(samples, lines, alone, strict=True):
        where = f"{sample.file}:{sample.lineno}"
        others = {
            "as a syslog line": _event_outcome(scanner.classify_message(line, None, 0)),
            "behind a multilog stamp": _scanned(scanner, [line], SAMPLE_STAMP)[0],
        }
        for how, other in others.items():
            if other != got:
                problems.append(f"{where}: sample gives {_show(got)} but {_show(other)} "
                                f"{how}: the rule means different things to the scanner")
        want = Counter([_counted(got)] if got != NO_EVENT else [])
        for counted in _tallies(scanner, [line]):
            if counted != want:
                problems.append(f"{where}: sample gives {_show(got)} but `rblguard scan` "
                                f"counts {_show_counts(counted)}")
                break
    for stamp in (b"", SAMPLE_STAMP):
        together = _scanned(scanner, lines, stamp)
        for sample, got, alone_got in zip(samples, together, alone, strict=True):
            if got != alone_got:
                problems.append(f"{sample.file}:{sample.lineno}: sample gives {_show(alone_got)} "
                                f"alone but {_show(got)} scanned with the other samples: a "
                                "pattern must never reach into another line")
        expected = Counter(_counted(o) for o in together if o != NO_EVENT)
        wrong = [c for c in _tallies(scanner, lines, stamp) if c != expected]
        if wrong and samples:
            problems.append(f"{samples[0].file}: the samples scanned as one log give "
                            f"{_show_counts(expected)} but `rblguard scan` counts "
                            f"{_show_counts(wrong[0])}: a pattern reaches into another line")
    return alone, problems


def _show(outcome: Outcome) -> str:
    kind, detail, rule = outcome
    return " ".join(x for x in (kind, detail, f"(rule {rule})" if rule else "") if x)


def _show_counts(counted: Counter[Outcome]) -> str:
    return ", ".join(f"{n} x {_show(o)}" for o, n in sorted(counted.items(), key=str)) or "nothing"


def check_samples(rules: list[Rule], samples: list[Sample],
                  connections: list[ConnectionLine] | None = None) -> list[str]:
    """Problems with one file's samples: wrong outcomes, paths of the scanner that
    disagree, and unexercised rules/ignores/connection lines.  Each connection line is
    tried on its own (``behind`` dropped): a hand-off depends on the lines before it."""
    lines = [line._replace(behind=None) for line in connections or []]
    scanner = Scanner(RuleSet(rules=rules, connections=lines), tcpserver=False)
    outcomes, problems = _check_paths(scanner, samples)
    exercised: set[str] = set()
    for sample, (got, detail, rule) in zip(samples, outcomes, strict=True):
        where = f"{sample.file}:{sample.lineno}"
        if got != sample.outcome:
            problems.append(f"{where}: sample expects {sample.outcome} "
                            f"{sample.expect!r} but got {got} {detail}".rstrip())
            continue
        if got in ("ban", "connection") and detail != sample.expect:
            what = "the rule" if got == "ban" else "the connection line"
            problems.append(f"{where}: sample expects a {got} of {sample.expect} "
                            f"but {what} extracted {detail}")
            continue
        if got == "ignored" and detail != sample.expect:
            problems.append(f"{where}: sample expects ignore {sample.expect!r} "
                            f"but {detail!r} vetoed it")
            continue
        if sample.rule is not None and rule != sample.rule:
            problems.append(f"{where}: sample expects rule {sample.rule} but {rule} matched")
            continue
        if got in ("ban", "connection") and rule:
            exercised.add(rule)
        elif got == "ignored" and rule:
            exercised.add(f"{rule}/{detail}")
    for rule in rules:
        if rule.error is None and rule.name not in exercised:
            problems.append(f"{rule.file}:{rule.lineno}: rule {rule.name} has no sample line "
                            "that it bans: add one (samples: - line: ... ban: ADDRESS)")
        for ig in rule.ignores:
            if f"{rule.name}/{ig.name}" not in exercised:
                problems.append(f"{rule.file}:{rule.lineno}: ignore {ig.name} of rule "
                                f"{rule.name} has no sample line (ignored: {ig.name})")
    for line in lines:
        if line.name not in exercised:
            problems.append(f"{rules[0].file if rules else ''}: connection line "
                            f"{line.name} has no sample (connection: ADDRESS)")
    if rules and not any(s.outcome == "none" for s in samples):
        problems.append(f"{rules[0].file}: no must-not-match sample (none: WHY): add lines "
                        "that look close to a reject but must never ban")
    return problems


def check_files(dirs: list[str | Path] | None) -> tuple[list[Rule], list[str], list[str]]:
    """(enabled rules, problems, unreadable-file errors) over every rule file.

    A directory named here (``--rules DIR``) that does not exist or holds no rule file
    is an error: a typo must not pass as "all rule files OK".
    """
    enabled_rules: list[Rule] = []
    problems: list[str] = []
    errors: list[str] = []
    names: dict[str, str] = {}
    paths: list[Path] = []
    for d in dirs if dirs is not None else [None]:
        try:
            paths.extend(rule_files(None if d is None else [d], explicit=d is not None))
        except RuleError as exc:
            errors.append(str(exc))
    for path in paths:
        try:
            rule_file = read_rule_file(path)
        except RuleError as exc:
            errors.append(str(exc))
            continue
        enabled, rules, samples = rule_file.enabled, rule_file.rules, rule_file.samples
        problems.extend(check_samples(rules, samples, rule_file.connections))
        state = "enabled" if enabled else "disabled"
        print(f"{path}: {len(rules)} rule(s), {len(samples)} sample(s), {state}")
        if enabled:
            for rule in rules:
                where = f"{rule.file}:{rule.lineno}"
                if rule.name in names:
                    problems.append(f"{where}: rule name {rule.name!r} also at {names[rule.name]}")
                names[rule.name] = where
            enabled_rules.extend(rules)
    return enabled_rules, problems, errors


def _label(event: object) -> str | None:
    """How a line is reported: its rule, its rule and ignore, or None if no rule took it."""
    if isinstance(event, Match):
        return event.rule
    if isinstance(event, Ignored):
        return f"{event.rule} (ignored: {event.reason})"
    if isinstance(event, ParseError):
        return f"{event.rule} (parse error)"
    return None


def try_logs(rules: list[Rule], paths: list[str]) -> int:
    """Show what each rule matches in real logs, and reject-like lines none matched.

    The logs are scanned as the daemon scans them (buffers of lines, the file's stamp
    format), so what is shown is what the daemon would do.  Raises OSError naming the
    file that cannot be read.
    """
    scanner = Scanner(RuleSet(rules=rules), connections=False)
    matched: dict[str, list[str]] = defaultdict(list)
    counts: Counter[str] = Counter()
    unmatched: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for path in paths:
        for file in log_files(path):
            fmt = None
            ref = os.stat(file).st_mtime
            for offset, buf in read_complete_lines(file):
                fmt = fmt or detect_format(buf)
                events = {e.offset: e for e in scanner.scan(buf, offset, fmt, ref).events}
                end = offset
                for line in buf.split(b"\n")[:-1]:
                    end += len(line) + 1
                    event = events.get(end)
                    key = _label(event)
                    if key is not None:
                        counts[key] += 1
                        if len(matched[key]) < SHOW_PER_RULE:
                            matched[key].append(event.line)  # type: ignore[union-attr]
                        continue
                    _when, message = split_line(fmt, line, 0.0)
                    if _REJECT_LOOKING.match(message):
                        text = message.decode("utf-8", "replace")
                        shape = re.sub(rb"[0-9a-fA-F:.]{7,}", b"ADDR", message)
                        shape_text = re.sub(rb"\d+", b"N", shape)[:80].decode("utf-8", "replace")
                        unmatched[shape_text] += 1
                        examples.setdefault(shape_text, text)
    for key, n in counts.most_common():
        print(f"\n{key}: {n} line(s), e.g.")
        for text in matched[key]:
            print(f"  {text}")
    if unmatched:
        print(f"\nlines that look like rejects but no rule matched or ignored "
              f"({sum(unmatched.values())}):")
        for shape, n in unmatched.most_common(20):
            print(f"  {n:>7}  {examples[shape]}")
    else:
        print("\nno reject-looking line was left unmatched")
    return 0


def main(args: argparse.Namespace) -> int:
    rules, problems, errors = check_files(args.rules)
    for message in errors:
        print(f"rblguard test-rules: {message}", file=sys.stderr)
    for message in problems:
        print(f"FAIL {message}", file=sys.stderr)
    if args.paths:
        for path in args.paths:
            if not Path(path).exists():
                print(f"rblguard test-rules: {path}: no such file or directory",
                      file=sys.stderr)
                return 2
        try:
            try_logs(rules, args.paths)
        except OSError as exc:
            print(f"rblguard test-rules: {exc.filename or ''}: cannot read the log: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 2
    if errors:
        return 2
    if problems:
        return 1
    print("all rule files and samples OK")
    return 0
