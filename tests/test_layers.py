"""The shape of the code stays readable: layers, private names, sizes.

The layers themselves are import-linter's contracts in pyproject.toml (``lint-imports``,
run by run-tests.sh).  This module checks what import-linter does not: that no module
imports another module's private name, that modules, classes and functions stay small
enough to read in one sitting, and that ``rblguard scan`` starts without the modules
it does not need.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rblguard"
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 60
# Allowed to be longer, and why.  Keep this short; shrink it rather than grow it.
LONGER: dict[str, str] = {
    "rblguard/commands/cli.py::build_parser":
        "one declarative table of every command and option, read top to bottom",
    "rblguard/daemon/metrics.py::__init__":
        "the declaration of every metric family, one after another: a list, not logic",
    "rblguard/decisions/decider.py::Decider":
        "the one owner of active bans, offender history and subnet counts, which must "
        "change together; each method is short",
    "rblguard/firewall/ipset.py::IpsetBackend":
        "one Backend: the interface's eight methods and the batching that keeps them fast",
    "rblguard/firewall/nftables.py::NftablesBackend":
        "one Backend: the interface's eight methods and the batching that keeps them fast",
    "rblguard/matching/scanner.py::Scanner":
        "scan() and tally() share the compiled patterns and the classification of a hit",
}


def _modules() -> list[tuple[str, ast.Module, int]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        found.append((str(path.relative_to(PACKAGE.parent)), ast.parse(text),
                      text.count("\n")))
    return found


def test_no_module_imports_another_modules_private_name() -> None:
    offences = []
    for name, tree, _ in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rblguard"):
                offences += [f"{name}:{node.lineno}: {node.module}.{a.name}"
                             for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offences, "private names imported across modules:\n" + "\n".join(offences)


def test_modules_classes_and_functions_stay_small() -> None:
    offences = []
    for name, tree, lines in _modules():
        if lines > MAX_MODULE_LINES and name not in LONGER:
            offences.append(f"{name}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(tree):
            limit = (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else
                     MAX_FUNCTION_LINES if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                     else None)
            if limit is None:
                continue
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            where = f"{name}:{node.lineno} {node.name}"
            if size > limit and f"{name}::{node.name}" not in LONGER:
                offences.append(f"{where}: {size} lines (at most {limit})")
    assert not offences, "too long to read in one sitting:\n" + "\n".join(offences)


# What `rblguard scan` does without: each was measured as a part of its start-up, which
# is most of what a scan of a day's log costs (docs/benchmarks.md, "Where scan's time
# goes").  The records it reads are named tuples or plain classes (rblguard.model says
# why); `logging`, `pickle` and the socket module are imported where they are used.
SCAN_STARTS_WITHOUT = ("dataclasses", "inspect", "socket", "logging", "pickle")
_SCAN_IMPORTS = """\
import json, sys
from rblguard.commands.cli import main
try:
    main(["scan", "--json", sys.argv[1]])
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def test_scan_starts_without_what_it_does_not_need(tmp_path: Path) -> None:
    log = tmp_path / "current"
    log.write_bytes(b"@4000000065a1d28a302953e2 rblsmtpd: 198.18.0.1 pid 1: 553 listed\n")
    proc = subprocess.run([sys.executable, "-c", _SCAN_IMPORTS, str(log)], capture_output=True,
                          text=True, check=True, cwd=PACKAGE.parent)
    assert json.loads(proc.stdout)["matches"] == 1
    imported = set(json.loads(proc.stderr.strip().splitlines()[-1]))
    needless = sorted(imported & set(SCAN_STARTS_WITHOUT))
    assert not needless, f"rblguard scan imports {needless}"
