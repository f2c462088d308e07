"""A real ``rblguard run`` in a network namespace of its own, for tests and benchmarks.

The daemon runs with the nftables (or ipset) backend inside a namespace the harness
creates and deletes, follows a log that a real ``multilog`` writes, and is queried over
its real control socket.  Nothing here stands in for a part: only the clock of the log
lines is the test's (each line carries a real TAI64N stamp of now).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.netns import delete_netns, run

TAI64_UNIX_OFFSET = 4611686018427387914


def tai64n(when: float | None = None) -> str:
    """The multilog stamp of ``when`` (default now): ``@4000...`` + one space."""
    when = time.time() if when is None else when
    seconds = int(when)
    return f"@{seconds + TAI64_UNIX_OFFSET:016x}{int((when - seconds) * 1e9):08x} "


def reject_message(address: str, pid: int = 1) -> str:
    """rblsmtpd's line for a listed client, without a stamp (multilog adds it)."""
    return f"rblsmtpd: {address} pid {pid}: 553 https://www.spamhaus.org/query/ip/{address}\n"


@dataclass
class DaemonHarness:
    """One namespace, one log directory, one daemon (started and restarted at will)."""

    workdir: Path
    ns: str
    config: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    stderr_path: Path | None = None
    starts: int = 0

    @property
    def socket(self) -> str:
        return str(self.workdir / "control.sock")

    @property
    def config_path(self) -> Path:
        return self.workdir / "rblguard.yaml"

    def write_config(self, **overrides) -> None:
        config = {
            "sources": [{"path": str(self.workdir / "log")}],
            "shipped_rules": True,
            "rules_dirs": [str(self.workdir / "rules.d")],
            "backend": "nftables",
            "ban_time": "1h",
            "state_dir": str(self.workdir / "state"),
            "control_socket": self.socket,
            "metrics": False,
            "allowlist": [],
        }
        config.update(overrides)
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self, wait: bool = True, timeout: float = 20,
              env: dict[str, str] | None = None) -> None:
        self.starts += 1
        self.stderr_path = self.workdir / f"daemon-{self.starts}.log"
        err = open(self.stderr_path, "wb")  # noqa: SIM115 - the daemon keeps it open
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "rblguard", "run",
             "--config", str(self.config_path)],
            stdout=err, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})})
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"rblguard exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(RuntimeError):
                self.cli("status", "--json")
                return
            time.sleep(0.05)
        raise RuntimeError(f"rblguard did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(10)

    def cli(self, *args: str, check: bool = True) -> dict | str:
        """Run an rblguard CLI command against this daemon; JSON answers are parsed."""
        proc = subprocess.run([sys.executable, "-m", "rblguard", args[0], "--socket",
                               self.socket, *args[1:]], capture_output=True, text=True,
                              timeout=30)
        if check and proc.returncode != 0:
            raise RuntimeError(f"rblguard {' '.join(args)}: {proc.stderr.strip()}")
        if "--json" in args:
            return json.loads(proc.stdout)
        return proc.stdout + proc.stderr

    def kernel_elements(self, table: str = "rblguard") -> set[str]:
        """Every element of every set of the daemon's nftables table, as text."""
        out = run(["ip", "netns", "exec", self.ns, "nft", "-j", "list", "table", "inet",
                   table], check=False)
        if out.returncode != 0:
            return set()
        found: set[str] = set()
        for item in json.loads(out.stdout)["nftables"]:
            elems = item.get("set", {}).get("elem", [])
            if item.get("set", {}).get("name", "").startswith("seen"):
                continue  # the connection-tracking helper sets are not bans
            for elem in elems:
                value = elem["elem"]["val"] if isinstance(elem, dict) and "elem" in elem else elem
                if isinstance(value, dict) and "prefix" in value:
                    value = f"{value['prefix']['addr']}/{value['prefix']['len']}"
                found.add(str(value))
        return found

    def state_bans(self) -> set[str]:
        from rblguard.store.state import State

        state = State(self.config["state_dir"])
        try:
            return {b.target for b in state.load_bans(time.time())}
        finally:
            close = getattr(state, "close", None)
            if close:
                close()


def wait_for(predicate: Callable[[], object], timeout: float = 15,
             what: str = "condition", every: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; AssertionError naming ``what`` after
    ``timeout`` seconds (the tests' one way to wait for the daemon or the kernel)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


PROBE_TABLE = "rblguard_monitor_probe"


class ElementMonitor:
    """``nft monitor`` in a namespace: when each element first appeared in the kernel.

    The way to time a ban without polling: the kernel announces every element added to
    rblguard's sets, and the monitor's thread stamps each announcement as it arrives.
    """

    PATTERN = re.compile(r"add element inet (\S+) (\S+) \{ ([^}]*)\}")

    def __init__(self, ns: str, table: str = "rblguard") -> None:
        self.table = table
        self.seen: dict[str, float] = {}
        self.subscribed = threading.Event()
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "nft", "monitor"],
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        # Subscribed once it reports a change of its own: a probe table made and removed
        # (in the test's namespace) until the monitor shows it.
        deadline = time.monotonic() + 10
        while not self.subscribed.wait(0.05):
            assert time.monotonic() < deadline, "nft monitor did not start"
            subprocess.run(["ip", "netns", "exec", ns, "nft",
                            f"add table inet {PROBE_TABLE}; delete table inet {PROBE_TABLE}"],
                           check=True, capture_output=True)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.time()
            if PROBE_TABLE in line:
                self.subscribed.set()
            for m in self.PATTERN.finditer(line):
                if m.group(1) != self.table or m.group(2).startswith("seen"):
                    continue  # another table, or the connection-counting sets
                for element in m.group(3).split(","):
                    self.seen.setdefault(element.split()[0], now)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


class NotifyListener:
    """A systemd-style ``NOTIFY_SOCKET``: records when the daemon says READY=1."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            self.messages.append((time.time(), data.decode(errors="replace")))

    def ready_times(self) -> list[float]:
        return [t for t, m in self.messages if "READY=1" in m.splitlines()]

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def daemon_namespace(tmp_path: Path) -> Iterator[DaemonHarness]:
    """A namespace with loopback up, deleted with everything in it afterwards."""
    ns = f"rgd-{uuid.uuid4().hex[:6]}"
    run(["ip", "netns", "add", ns])
    harness = DaemonHarness(tmp_path, ns)
    try:
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        (tmp_path / "rules.d").mkdir(exist_ok=True)
        yield harness
    finally:
        harness.kill()
        delete_netns(ns)
