"""The README stays true: the commands, files and words it names exist."""

from __future__ import annotations

import os
import re
from pathlib import Path

from rblguard.commands.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_setup_commands_exist_and_ci_runs_the_readme_test_command() -> None:
    assert "sudo ./install.sh" in README
    assert "sudo ./run-tests.sh" in README
    for script in ("install.sh", "run-tests.sh", ".ci/run"):
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"
    assert "./run-tests.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_rblguard_command_in_the_readme_exists() -> None:
    named = set(re.findall(r"`rblguard ([a-z-]+)", README))
    for block in re.findall(r"```sh\n(.*?)```", README, re.DOTALL):
        named |= set(re.findall(r"^(?:sudo )?rblguard ([a-z-]+)", block, re.MULTILINE))
    assert named, "the README names no command"
    unknown = named - set(COMMANDS)
    assert not unknown, f"README names commands that do not exist: {unknown}"


def test_every_repo_path_in_the_readme_exists() -> None:
    paths = set(re.findall(r"`((?:rules|rblguard|tests|systemd|grafana|benchmarks|docs)"
                           r"/[\w./-]*)`", README))
    missing = [p for p in paths if not (ROOT / p.rstrip("/")).exists()]
    assert not missing, f"README names files that do not exist: {missing}"


def test_cli_help_works_for_every_command(capsys) -> None:
    """``rblguard COMMAND --help`` prints that command's usage and exits 0, and every
    command the README names is one of them."""
    import pytest

    for command in COMMANDS:
        with pytest.raises(SystemExit) as leaving:
            build_parser().parse_args([command, "--help"])
        out = capsys.readouterr().out
        assert leaving.value.code == 0, command
        assert out.startswith(f"usage: rblguard {command} "), out[:80]
        assert "options:" in out, f"{command} --help shows no options"


def test_every_link_between_docs_exists() -> None:
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(((?:docs/)?[\w-]+\.md)(?:#[\w-]+)?\)", doc.read_text()):
            base = ROOT if doc.name == "README.md" else doc.parent
            assert (base / target).exists(), f"{doc.name} links to missing {target}"


def test_each_limit_in_docs_limits_is_the_constant_in_its_module() -> None:
    """docs/limits.md names a constant and its module per row: both must exist."""
    import importlib

    rows = re.findall(r"^\|.*\(`([A-Z_]+)`\).*\| `(rblguard/[\w/]+)\.py` \|$",
                      (ROOT / "docs" / "limits.md").read_text(), re.MULTILINE)
    assert len(rows) >= 8, "docs/limits.md lost its rows"
    for constant, path in rows:
        module = importlib.import_module(path.replace("/", "."))
        assert hasattr(module, constant), f"docs/limits.md: {path}.py has no {constant}"
