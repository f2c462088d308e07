"""``rblguard test-rules``: prove rule files before they ban anyone.

Every rule file carries sample lines with the outcome each must give.  This command
loads every file (disabled ones too: an admin checks an example before enabling it),
runs every sample through the same scanner the daemon uses, and insists that each rule
and each ignore pattern is exercised by at least one sample and that each file has a
must-not-match sample.  Given logs, it also shows what each rule matched and, above all,
the reject-looking lines that no rule matched or ignored: the lines a rule is missing.

Exit status: 0 all good, 1 a sample or check failed, 2 a file could not be read or parsed.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from rblguard.model import Ignored, Match, ParseError
from rblguard.rules import Rule, RuleError, RuleSet, Sample, load_rule_file, rule_files
from rblguard.scanner import Scanner, read_complete_lines
from rblguard.stamps import detect_format, split_line

# A line "looks like a reject" when a program's own prefix is followed by an SMTP 4xx/5xx
# code: rblsmtpd's lines, and similar lines of other DNSBL checkers.
_REJECT_LOOKING = re.compile(rb"^(?:rblsmtpd|qmail-smtpd|qmail-dnsbl|rbl\w*): .*?\b[45]\d\d\b")
SHOW_PER_RULE = 5


def _outcome(scanner: Scanner, sample: Sample) -> tuple[str, str, str | None]:
    """(outcome, detail, rule) the scanner gives a sample line."""
    event = scanner.classify_message(sample.line.encode(), None, 0)
    if isinstance(event, Match):
        return "ban", event.address, event.rule
    if isinstance(event, Ignored):
        return "ignored", event.reason, event.rule
    if isinstance(event, ParseError):
        return "parse-error", "", event.rule
    return "none", "", None


def check_samples(rules: list[Rule], samples: list[Sample]) -> list[str]:
    """Problems with one file's samples: wrong outcomes and unexercised rules/ignores."""
    problems: list[str] = []
    scanner = Scanner(RuleSet(rules=rules), connections=False)
    exercised: set[str] = set()
    for sample in samples:
        got, detail, rule = _outcome(scanner, sample)
        where = f"{sample.file}:{sample.lineno}"
        if got != sample.outcome:
            problems.append(f"{where}: sample expects {sample.outcome} "
                            f"{sample.expect!r} but got {got} {detail}".rstrip())
            continue
        if got == "ban" and detail != sample.expect:
            problems.append(f"{where}: sample expects a ban of {sample.expect} "
                            f"but the rule extracted {detail}")
            continue
        if got == "ignored" and detail != sample.expect:
            problems.append(f"{where}: sample expects ignore {sample.expect!r} "
                            f"but {detail!r} vetoed it")
            continue
        if sample.rule is not None and rule != sample.rule:
            problems.append(f"{where}: sample expects rule {sample.rule} but {rule} matched")
            continue
        if got == "ban" and rule:
            exercised.add(rule)
        elif got == "ignored" and rule:
            exercised.add(f"{rule}/{detail}")
    for rule in rules:
        if rule.name not in exercised:
            problems.append(f"{rule.file}:{rule.lineno}: rule {rule.name} has no sample line "
                            "that it bans: add one (samples: - line: ... ban: ADDRESS)")
        for ig in rule.ignores:
            if f"{rule.name}/{ig.name}" not in exercised:
                problems.append(f"{rule.file}:{rule.lineno}: ignore {ig.name} of rule "
                                f"{rule.name} has no sample line (ignored: {ig.name})")
    if rules and not any(s.outcome == "none" for s in samples):
        problems.append(f"{rules[0].file}: no must-not-match sample (none: WHY): add lines "
                        "that look close to a reject but must never ban")
    return problems


def check_files(dirs: list[str | Path] | None) -> tuple[list[Rule], list[str], list[str]]:
    """(enabled rules, problems, unreadable-file errors) over every rule file."""
    enabled_rules: list[Rule] = []
    problems: list[str] = []
    errors: list[str] = []
    names: dict[str, str] = {}
    for path in rule_files(dirs):
        try:
            enabled, rules, samples = load_rule_file(path)
        except RuleError as exc:
            errors.append(str(exc))
            continue
        problems.extend(check_samples(rules, samples))
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
    """Show what each rule matches in real logs, and reject-like lines none matched."""
    from rblguard.follow import list_files

    scanner = Scanner(RuleSet(rules=rules), connections=False)
    matched: dict[str, list[str]] = defaultdict(list)
    counts: Counter[str] = Counter()
    unmatched: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for path in paths:
        for file in list_files(path):
            fmt = None
            for _offset, buf in read_complete_lines(file):
                fmt = fmt or detect_format(buf)
                for line in buf.split(b"\n")[:-1]:
                    _when, message = split_line(fmt, line, 0.0)
                    event = scanner.classify_message(message, None, 0)
                    key = _label(event)
                    text = message.decode("utf-8", "replace")
                    if key is not None:
                        counts[key] += 1
                        if len(matched[key]) < SHOW_PER_RULE:
                            matched[key].append(text)
                    elif _REJECT_LOOKING.match(message):
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
        try_logs(rules, args.paths)
    if errors:
        return 2
    if problems:
        return 1
    print("all rule files and samples OK")
    return 0
