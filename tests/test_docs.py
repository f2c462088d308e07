"""The README stays true: the commands, files and words it names exist."""

from __future__ import annotations

import os
import re
from pathlib import Path

from rblguard.commands.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_setup_commands_exist_and_ci_runs_the_readme_test_command() -> None:
    commands = [line for block in re.findall(r"```sh\n(.*?)```", README, re.DOTALL)
                for line in block.splitlines()]
    assert "./install.sh" in commands
    assert "./run-tests.sh" in commands
    for script in ("install.sh", "run-tests.sh", ".ci/run"):
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if not line.startswith("#")]
    assert "exec ./run-tests.sh" in ci, "CI must run the README's own test command"


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


def _documented(doc: str, header: str) -> set[str]:
    """The names in the first column of the table under ``header`` in docs/``doc``:
    each backquoted word that is a name (``repeat: off``, a value, is not)."""
    text = (ROOT / "docs" / doc).read_text()
    table = text[text.index(header):].split("\n\n", 1)[0]
    names: set[str] = set()
    for row in table.splitlines()[2:]:
        first = row.split("|")[1]
        names |= {n for n in re.findall(r"`([^`]+)`", first)
                  if re.fullmatch(r"[a-z_0-9]+(\[\])?(\.[a-z_0-9]+)?(\{[a-z_,]*\})?", n)}
    return names


def _known_keys(yaml_text: str) -> tuple[str, ...]:
    """The keys parse_config accepts where ``yaml_text`` puts the key ``zzz``, read from
    its own "unknown key (known: ...)" message: no list of keys is kept twice."""
    from rblguard.config import ConfigError, parse_config

    try:
        parse_config(yaml_text)
    except ConfigError as exc:
        found = re.search(r"unknown key \(known: ([^)]*)\)", str(exc))
        return tuple(found.group(1).split(", ")) if found else ()
    raise AssertionError(f"parse_config accepted {yaml_text!r}")


def accepted_config_keys() -> set[str]:
    """Every YAML key of the config: top-level ``key``, ``key.sub`` in a mapping, and
    ``key[].sub`` in a list of mappings."""
    keys: set[str] = set()
    for key in _known_keys("zzz: 1"):
        keys.add(key)
        keys |= {f"{key}.{sub}" for sub in _known_keys(f"{key}: {{zzz: 1}}")}
        keys |= {f"{key}[].{sub}" for sub in _known_keys(f"{key}: [{{zzz: 1}}]")}
    return keys


def test_every_config_key_is_documented_and_every_documented_key_exists() -> None:
    accepted = accepted_config_keys()
    assert {"backend.type", "sources[].path", "log_level"} <= accepted, accepted
    documented = _documented("config.md", "| key | default | meaning |")
    # a key with sub-keys is documented by its sub-keys' rows
    covered = documented | {d.split(".")[0].split("[")[0] for d in documented}
    missing = sorted(accepted - covered)
    assert not missing, f"docs/config.md does not document the config keys {missing}"
    unknown = sorted(documented - accepted)
    assert not unknown, f"docs/config.md documents keys rblguard does not accept: {unknown}"


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    from rblguard.daemon.metrics import Metrics
    from rblguard.fleet.metrics import FleetMetrics

    suffix = {"counter": "_total"}  # a counter family's samples are NAME_total
    metrics = Metrics()
    FleetMetrics(metrics.registry)  # a fleet member's families too
    defined = {f.name + suffix.get(f.type, "") for f in metrics.registry.collect()}
    assert len(defined) >= 20, defined
    documented = {n.split("{")[0] for n in _documented("operations.md",
                                                       "| metric | type | meaning |")}
    missing = sorted(defined - documented)
    assert not missing, f"docs/operations.md does not list the metrics {missing}"
    unknown = sorted(documented - defined)
    assert not unknown, f"docs/operations.md lists metrics rblguard does not have: {unknown}"
