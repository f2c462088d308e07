"""Rule files: loading, the errors admins see, and samples that prove every rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rblguard.rules import RuleError, literal_prefix, load_rules, shipped_rules_dir
from rblguard.testrules import check_files

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


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path


def test_every_shipped_rule_file_proves_itself() -> None:
    """A shipped rule (enabled or example) without passing samples fails the suite."""
    _rules, problems, errors = check_files([shipped_rules_dir()])
    assert errors == []
    assert problems == []


def test_shipped_rules_load_and_only_rblsmtpd_is_enabled() -> None:
    ruleset = load_rules()
    assert [r.name for r in ruleset.rules] == ["rblsmtpd"]
    assert ruleset.disabled_files and "qmail-smtpd" in ruleset.disabled_files[0]


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
    assert "r.yaml: not valid YAML" in broken.stderr


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
    with pytest.raises(RuleError) as err:
        load_rules([write(tmp_path, text)])
    assert message in str(err.value)


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
