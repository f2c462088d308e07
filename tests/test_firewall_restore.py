"""Feeding a restore tool while its lines are made (rblguard.firewall.restore), with real
processes in place of ``ipset restore``: no root needed."""

from __future__ import annotations

import sys

import pytest

from rblguard.firewall import ipsettext, restore

# A tool that reads its whole input and prints how many lines it got.
COUNTING = [sys.executable, "-c",
            "import sys; n = sum(1 for _ in sys.stdin); sys.stderr.write(f'{n}\\n')"]
# A tool that refuses line 3 and stops reading, as ipset restore does.
REFUSING = [sys.executable, "-c",
            "import sys\n"
            "for i, _ in enumerate(sys.stdin, 1):\n"
            "    if i == 3:\n"
            "        sys.stderr.write('Error in line 3: refused\\n'); sys.exit(1)"]


def test_every_line_reaches_the_tool_in_order() -> None:
    lines = (f"add s 198.18.{i // 256}.{i % 256} timeout 60" for i in range(25_000))
    fed = restore.feed(COUNTING, lines)
    assert fed.returncode == 0
    assert fed.stderr.strip() == "25000"
    assert len(fed.lines) == 25_000 and fed.lines[-1] == "add s 198.18.97.167 timeout 60"


def test_a_tool_that_stops_reading_still_leaves_every_line_made() -> None:
    # 50,000 lines are far more than a pipe holds: writes past the refusal hit a
    # closed pipe, and the caller still gets all lines to resume after line 3.
    fed = restore.feed(REFUSING, (f"line {i}" for i in range(50_000)))
    assert fed.returncode == 1
    assert "Error in line 3" in fed.stderr
    assert len(fed.lines) == 50_000


def test_no_lines_is_an_empty_input() -> None:
    fed = restore.feed(COUNTING, [])
    assert (fed.returncode, fed.stderr.strip(), fed.lines) == (0, "0", [])


def test_a_tool_that_never_reads_cannot_hold_the_caller() -> None:
    never = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(restore.ToolError, match="no answer within"):
        restore.feed(never, (f"line {i}" for i in range(200_000)), timeout=1.0)


def test_a_missing_tool_is_a_clear_error() -> None:
    with pytest.raises(restore.ToolError, match="no-such-ipset-tool"):
        restore.feed(["no-such-ipset-tool", "restore"], ["x"])


def test_headers_and_saved_elements_parse() -> None:
    headers = ipsettext.parse_headers(
        "Name: rblguard4\nType: hash:net\nHeader: family inet hashsize 1024\n"
        "Number of entries: 2\n\nName: rblguard6\nType: hash:net\n")
    assert headers["rblguard4"]["Number of entries"] == "2"
    assert headers["rblguard6"] == {"Type": "hash:net"}
    saved = list(ipsettext.parse_saved(
        "create rblguard4 hash:net family inet timeout 0\n"
        "add rblguard4 198.18.0.1 timeout 30\nadd rblguard4 198.18.0.0/24 timeout 0\n"))
    assert [(x.target, x.expires) for x in saved] == [("198.18.0.1", 30.0),
                                                       ("198.18.0.0/24", float("inf"))]


def test_a_tool_that_writes_much_on_stderr_while_reading_does_not_stall() -> None:
    # 1 MB of warnings, far more than a pipe holds, written while it reads its input:
    # if nobody read its standard error it would block there and stop reading.
    chatty = [sys.executable, "-c",
              "import sys\n"
              "for line in sys.stdin:\n"
              "    sys.stderr.write('warning: ' + 'x' * 100 + '\\n')\n"]
    fed = restore.feed(chatty, (f"line {i}" for i in range(10_000)), timeout=30)
    assert fed.returncode == 0
    assert fed.stderr.count("warning: ") == 10_000
