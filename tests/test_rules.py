"""Rule files: loading, the errors admins see, and samples that prove every rule."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from rblguard.commands.testrules import check_files, check_samples
from rblguard.matching.prefix import literal_prefix
from rblguard.matching.rules import RuleError, load_rules, shipped_rules_dir, within_line

GOOD = """\
description: test
rules:
  - name: r1
    match: 'rblsmtpd: <ADDR> pid \\d+: (?:451|553) '
    ignore:
      - name: lookup-error
        match: 'temporary RBL lookup error'
samples:
  - line: 'rblsmtpd: 198.18.0.9 pid 1: 553 listed'
    ban: 198.18.0.9
  - line: 'rblsmtpd: 198.18.0.9 pid 1: 451 temporary RBL lookup error'
    ignored: lookup-error
  - line: 'tcpserver: status: 1/40'
    none: not a reject
"""


def rblguard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rblguard", *args],
                          capture_output=True, text=True, timeout=60)


def refusal(tmp_path: Path, text: str) -> str:
    """The RuleError a rule file with ``text`` gets (it must get one)."""
    with pytest.raises(RuleError) as err:
        load_rules([write(tmp_path, text)])
    return str(err.value)


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path


def test_every_shipped_rule_file_proves_itself() -> None:
    """A shipped rule (enabled or example) without passing samples fails the suite."""
    _rules, problems, errors = check_files([shipped_rules_dir()])
    assert errors == []
    assert problems == []


def test_shipped_qmail_rules_are_enabled() -> None:
    """The qmail front ends' rules need no config: their prefixes are exact."""
    ruleset = load_rules()
    assert [r.name for r in ruleset.rules] == ["qmail-smtpd-rbl", "rblsmtpd"]


def test_test_rules_command_exit_codes(tmp_path: Path) -> None:
    ok = rblguard("test-rules", "--rules", str(write(tmp_path, GOOD)))
    assert ok.returncode == 0, ok.stderr
    assert "all rule files and samples OK" in ok.stdout

    wrong = GOOD.replace("ban: 198.18.0.9", "ban: 198.18.0.10")
    failed = rblguard("test-rules", "--rules", str(write(tmp_path, wrong)))
    assert failed.returncode == 1
    assert "r.yaml:9: sample expects a ban of 198.18.0.10 but the rule extracted 198.18.0.9" \
        in failed.stderr

    broken = rblguard("test-rules", "--rules", str(write(tmp_path, "rules: [\n")))
    assert broken.returncode == 2
    # one line: the file, the line where the parser gave up, why, and what it was in
    assert broken.stderr.strip().count("\n") == 0, broken.stderr
    assert "r.yaml:2: not valid YAML: did not find expected node content" in broken.stderr
    assert "(while parsing a flow node at line 2)" in broken.stderr


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("<ADDR>", "ADDR"), "r.yaml:4: rule r1: match must hold <ADDR> exactly once"),
    (GOOD.replace("(?:451|553) ", "(?:451|553 "), "r.yaml:4: rule r1: bad regular expression"),
    (GOOD.replace("'rblsmtpd: <ADDR>", "'.*<ADDR>"), "must start with the program's own"),
    (GOOD.replace("    ignore:", "    ignroe:"), "r.yaml:5: a rule: unknown key 'ignroe'"),
    (GOOD.replace("  - name: r1\n", "  - nom: r1\n"), "r.yaml:3: a rule: unknown key 'nom'"),
    (GOOD + "    ban: 198.18.0.1\n", "r.yaml:13: a sample states exactly one outcome"),
    (GOOD.replace("    ignore:", "    ban: {for: 5x}\n    ignore:"), "ban: '5x' is not a duration"),
])
def test_rule_errors_name_file_line_and_problem(tmp_path: Path, text: str, message: str) -> None:
    assert message in refusal(tmp_path, text)


CONNECTIONS = GOOD.replace("samples:\n", """connections:
  - name: front
    match: 'front: CONNECT <ADDR>$'
  - name: back
    match: 'back: connect from <ADDR>$'
    behind: front
samples:
  - line: 'front: CONNECT 198.18.0.3'
    connection: 198.18.0.3
""")


@pytest.mark.parametrize("text, message", [
    (CONNECTIONS.replace("connect from <ADDR>$", "connect from$"),
     "r.yaml:12: connection line back: match must hold <ADDR> exactly once"),
    (CONNECTIONS.replace("behind: front", "behind: nowhere"),
     "r.yaml:11: connection line back: behind must name another connection line"),
    (CONNECTIONS.replace("  - name: back\n", "  - nom: back\n"),
     "r.yaml:11: a connection line: unknown key 'nom'"),
    (CONNECTIONS.replace("'front: CONNECT", "'.*CONNECT"), "must start with the program's own"),
])
def test_connection_line_errors_name_file_line_and_problem(tmp_path: Path, text: str,
                                                           message: str) -> None:
    assert message in refusal(tmp_path, text)


def test_connection_lines_are_proven_by_samples(tmp_path: Path) -> None:
    """A connection line needs a sample, and a sample names the address it counts."""
    ruleset = load_rules([write(tmp_path, CONNECTIONS)])
    assert [line.name for line in ruleset.connections] == ["front", "back"]
    _rules, problems, _errors = check_files([tmp_path])
    assert problems == [f"{tmp_path / 'r.yaml'}: connection line back has no sample "
                        "(connection: ADDRESS)"]
    wrong = CONNECTIONS.replace("connection: 198.18.0.3", "connection: 198.18.0.4")
    _rules, problems, _errors = check_files([write(tmp_path, wrong)])
    assert any("r.yaml:15: sample expects a connection of 198.18.0.4 but the connection "
               "line extracted 198.18.0.3" in p for p in problems)


def test_rule_without_samples_fails(tmp_path: Path) -> None:
    no_samples = GOOD[: GOOD.index("samples:")]
    _rules, problems, _errors = check_files([write(tmp_path, no_samples)])
    assert any("rule r1 has no sample line that it bans" in p for p in problems)
    assert any("ignore lookup-error of rule r1 has no sample" in p for p in problems)
    assert any("no must-not-match sample" in p for p in problems)


def test_duplicate_rule_names_across_files(tmp_path: Path) -> None:
    write(tmp_path, GOOD, "a.yaml")
    write(tmp_path, GOOD, "b.yaml")
    with pytest.raises(RuleError, match=r"b.yaml:3: rule name 'r1' is already used at .*a.yaml:3"):
        load_rules([tmp_path])


def test_a_file_that_is_off_is_not_compiled_but_test_rules_checks_it(tmp_path: Path) -> None:
    """A start reads a file that is off no further than its header (the Postfix and Exim
    packs cost a qmail host's every start a few ms a rule): its broken rule does not stop
    the daemon, test-rules still names it, and turning the file on does too."""
    broken = GOOD.replace("(?:451|553) '", "(?:451|553 '")
    write(tmp_path, GOOD, "a.yaml")
    write(tmp_path, "pack: extra\n" + broken.replace("r1", "r2"), "b.yaml")
    write(tmp_path, "enabled: false\n" + broken.replace("r1", "r3"), "c.yaml")
    ruleset = load_rules([tmp_path], packs=[])
    assert [r.name for r in ruleset.rules] == ["r1"]
    assert [Path(f).name for f in ruleset.disabled_files] == ["b.yaml", "c.yaml"]
    _rules, _problems, errors = check_files([tmp_path])
    assert [e.split(":")[0].rsplit("/", 1)[-1] for e in errors] == ["b.yaml", "c.yaml"]
    assert all("bad regular expression" in e for e in errors)
    with pytest.raises(RuleError, match=r"b.yaml:\d+: rule r2: bad regular expression"):
        load_rules([tmp_path], packs=["extra"])


def test_literal_prefix() -> None:
    assert literal_prefix(r"rblsmtpd: <ADDR> pid") == "rblsmtpd: "
    assert literal_prefix(r"qmail-smtpd: pid \d+ x") == "qmail-smtpd: pid "
    assert literal_prefix(r"abc\.def*") == "abc.de"
    assert literal_prefix(r"(?:a|b)") == ""


def test_test_rules_on_a_log_shows_unmatched_reject_lines(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text(
        "@4000000065a1d28a302953e2 rblsmtpd: 198.18.0.9 pid 1: 553 listed\n"
        "@4000000065a1d28a302953e2 rblsmtpd: 198.18.0.10 pid 2: 554 a code no rule knows\n"
    )
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    out = rblguard("test-rules", "--rules", str(write(rules_dir, GOOD)), str(log))
    assert out.returncode == 0, out.stderr
    assert "r1: 1 line(s)" in out.stdout
    assert "no rule matched or ignored (1)" in out.stdout
    assert "554 a code no rule knows" in out.stdout


# -- a pattern is matched within one line --------------------------------------------

_ATOMS = [".", r"\s", r"\S", r"\d", r"\D", r"\w", r"\W", "[^=]", r"[\s\S]", r"[\x00-\x7f]",
          r"[^\S]", "[]a]", "[^]a]", "[^-a]", "[-a]", "a", "=", " ", "(?s:.)", "(?i:[^A])",
          r"\Z", "$", r"\b", r"\B", r"[\t-\r]", r"[^\n]", "(?P<g>a)", r"\t", r"\x41", r"\101"]
_QUANTIFIED = ["", "*", "+", "?", "{0,3}", "*?", "+?"]


@st.composite
def _regex(draw, depth: int = 0) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        if depth < 2 and draw(st.integers(0, 4)) == 0:
            inner = draw(_regex(depth + 1))
            group = draw(st.sampled_from(["(?:{})", "(?={})", "(?!{})", "(?:{}|a)"]))
            parts.append(group.format(inner) + draw(st.sampled_from(_QUANTIFIED)))
        else:
            atom = draw(st.sampled_from(_ATOMS))
            quantifiable = atom not in ("$", r"\Z", r"\b", r"\B") and "P<" not in atom
            parts.append(atom + (draw(st.sampled_from(_QUANTIFIED)) if quantifiable else ""))
    return "".join(parts)


@settings(max_examples=400, deadline=None)
@given(_regex(), st.lists(st.sampled_from(["a", "A", "=", " ", "\t", "\r", "\n", "x", "\x00"]),
                          max_size=14))
def test_within_line_patterns_see_nothing_past_their_line(pattern: str, chars: list[str]) -> None:
    """Matched anywhere in a buffer, a confined pattern gives exactly what it gives on
    that line alone: it neither matches nor looks across a newline, in either direction."""
    try:
        regex = re.compile(within_line(pattern, "t").encode(), re.MULTILINE)
    except (RuleError, re.error):
        return  # refused or not a valid pattern: no rule could be made of it
    text = "".join(chars).encode()
    for pos in range(len(text) + 1):
        start = text.rfind(b"\n", 0, pos) + 1
        end = text.find(b"\n", pos)
        end = len(text) if end < 0 else end
        if pos > end or start == end:  # (an empty line: Python's \B never matches b"")
            continue
        whole = regex.match(text, pos)
        alone = regex.match(text[start:end], pos - start)
        assert (whole and whole.span()) == (alone and (alone.start() + start, alone.end() + start))
        if whole:
            assert b"\n" not in text[whole.start():whole.end()]


@pytest.mark.parametrize("pattern, confined", [
    (r"rejected[^=]*ip=", r"rejected[^\n=]*ip="),
    (r"a\s+b.c\Z", r"a[^\S\n]+b[^\n]c$"),
    (r"[^]a][^-a][\s,]", r"[^\n\]a][^\n\-a](?:(?!\n)[\s,])"),
    (r"(?P<x>a)(?P=x)(?(x)a|b)(?#[)", r"(?P<x>a)(?P=x)(?(x)a|b)(?#[)"),
    (r"\\1\0\101[a-z]\S", r"\\1\0\101[a-z]\S"),
])
def test_within_line_rewrites(pattern: str, confined: str) -> None:
    assert within_line(pattern, "t") == confined


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("pid \\d+: (?:451|553) ", "pid (?P<p>\\d+) (\\d+) \\2: "),
     "r.yaml:4: rule r1: match: numbered back-reference '\\2': name the group"),
    (GOOD.replace("pid \\d+: ", "pid (\\d+)(?(1)x|y)"),
     "r.yaml:4: rule r1: match: numbered group condition '(?(1)'"),
    (GOOD.replace("pid \\d+: ", "pid\\n"), "r.yaml:4: rule r1: match: '\\n' is a newline"),
    (GOOD.replace("pid \\d+: ", "pid\\x0a"), "r.yaml:4: rule r1: match: '\\x0a' is a newline"),
    (GOOD.replace("pid \\d+: ", "pid ^"), "r.yaml:4: rule r1: match: '^' after the start"),
    (GOOD.replace("pid \\d+: ", "(?x: pid )"), "match: verbose mode (?x) is not supported"),
    (GOOD.replace("'temporary RBL lookup error'", "'(a)\\1'"),
     "r.yaml:7: rule r1: ignore lookup-error: numbered back-reference '\\1'"),
    (GOOD.replace("pid \\d+: ", "pid (?P<rblguard_tail>x)"),
     "group name 'rblguard_tail': names starting with 'rblguard_' are rblguard's own"),
    (GOOD.replace("'temporary RBL lookup error'", "'(?P<addr>x)'"),
     "r.yaml:4: rule r1: match and ignores together: bad regular expression"),
    (GOOD.replace("line: 'tcpserver: status: 1/40'", 'line: "tcpserver:\\n status"'),
     "r.yaml:13: a sample line is one log line"),
])
def test_patterns_that_cannot_stay_in_one_line_are_refused(tmp_path: Path, text: str,
                                                           message: str) -> None:
    assert message in refusal(tmp_path, text)


def test_numbered_back_reference_fails_test_rules(tmp_path: Path) -> None:
    """\\1 meant the rule's group on a sample line but the stamp's in the daemon."""
    text = GOOD.replace("pid \\d+: (?:451|553) ", "pid (\\d+): (?:451|553) \\1").replace(
        "553 listed'", "553 1'")
    out = rblguard("test-rules", "--rules", str(write(tmp_path, text)))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "r.yaml:4: rule r1: match: numbered back-reference '\\1'" in out.stderr


def _unconfined(rules_dir: Path):
    """The crossing rule as the old loader built it: [^=] free to run past a newline."""
    from rblguard.matching.rules import ADDR_CAPTURE, load_rule_file

    _enabled, rules, samples = load_rule_file(rules_dir / "r.yaml")
    rest = ("[^=]*ip=" + ADDR_CAPTURE + "$").encode()  # after "qmail-dnsbl: rejected"
    loose = rules[0]._replace(rest=rest,
                              regex=regex.compile(re.escape(rules[0].literal) + rest, regex.M))
    return [loose], samples


CROSSING = (Path(__file__).parent / "fixtures" / "rules" / "crossing-lines.yaml").read_text()


def test_test_rules_scans_samples_as_one_log_and_sees_a_line_crossing(tmp_path: Path) -> None:
    """Samples go through the daemon's buffer scanner, alone and together: a pattern
    that reached into the next line (as the old loader let [^=]* do) is reported."""
    rules_dir = write(tmp_path, CROSSING)
    assert check_files([rules_dir])[1:] == ([], [])  # as loaded: confined, all good
    rules, samples = _unconfined(rules_dir)
    problems = check_samples(rules, samples)
    assert any("scanned as one log" in p and "203.0.113.9" in p for p in problems), problems


def test_test_rules_on_the_two_line_case(tmp_path: Path) -> None:
    """test-rules shows what the daemon and `rblguard scan` do with the two lines: the
    next line's client address is nobody's reject."""
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    write(rules_dir, CROSSING)
    log = tmp_path / "log"
    log.write_text("@4000000065a1d28a302953e2 qmail-dnsbl: rejected code 553\n"
                   "@4000000065a1d28a302953e2 qmail-smtpd: HELO ip=203.0.113.9\n")
    tested = rblguard("test-rules", "--rules", str(rules_dir), str(log))
    assert tested.returncode == 0, tested.stderr
    assert "\ndnsbl: " not in tested.stdout and "203.0.113.9" not in tested.stdout
    assert "no rule matched or ignored (1)" in tested.stdout
    scanned = rblguard("scan", "--json", "--rules", str(rules_dir), str(log))
    assert scanned.returncode == 0, scanned.stderr
    assert json.loads(scanned.stdout)["matches"] == 0


# -- rule directories that are not there ---------------------------------------------


def test_a_named_rules_directory_must_exist_and_hold_rules(tmp_path: Path) -> None:
    missing, empty = tmp_path / "nonexistent", tmp_path / "empty"
    empty.mkdir()
    for args, message in (
            (["test-rules", "--rules", str(missing)], f"{missing}: no such rules directory"),
            (["test-rules", "--rules", str(empty)], f"{empty}: holds no rule file"),
            (["test-rules", "--rules", str(write(tmp_path / "..", GOOD, "r.yaml") / "r.yaml")],
             "not a directory"),
    ):
        out = rblguard(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in out.stderr
        assert "all rule files and samples OK" not in out.stdout
    with pytest.raises(RuleError, match="no such rules directory"):
        load_rules([missing], explicit=True)


def test_configured_rule_directories_keep_their_documented_behaviour(tmp_path: Path) -> None:
    """The daemon's rules_dirs: a directory that does not exist is skipped; only when
    asked does having no enabled rule at all become an error."""
    ruleset = load_rules([shipped_rules_dir(), tmp_path / "nonexistent"])
    assert [r.name for r in ruleset.rules] == ["qmail-smtpd-rbl", "rblsmtpd"]
    assert load_rules([tmp_path / "nonexistent"]).rules == []
    with pytest.raises(RuleError, match=r"no enabled rule in .*nonexistent: nothing would"):
        load_rules([tmp_path / "nonexistent"], require_enabled=True)
    write(tmp_path, GOOD.replace("description: test\n", "description: test\nenabled: false\n"))
    with pytest.raises(RuleError, match="; 1 file\\(s\\) say enabled: false: nothing"):
        load_rules([tmp_path], require_enabled=True)


# -- logs that cannot be read ----------------------------------------------------------


def test_test_rules_on_an_unreadable_log_names_it(tmp_path: Path) -> None:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    write(rules_dir, GOOD)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    multilog = tmp_path / "smtpd"
    (multilog / "current").mkdir(parents=True)  # a directory where the log file should be
    (tmp_path / "empty").mkdir()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    for path, problem in ((fifo, "is not a regular file"),
                          (multilog / "current", "no log file in this directory"),
                          (multilog, "no log file in this directory"),
                          (tmp_path / "empty", "no log file in this directory"),
                          (dangling, "no such file or directory")):
        out = rblguard("test-rules", "--rules", str(rules_dir), str(path))
        assert out.returncode == 2, (path, out.stdout, out.stderr)
        assert f"{path}: " in out.stderr and problem in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
