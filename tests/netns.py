"""Network namespaces that a test makes for itself and always deletes.

Two hosts joined by a veth pair: ``server`` and ``client``.  Addresses come only from
the benchmarking and documentation ranges (198.18.0.0/15, 2001:db8::/32), so no packet
of a test can ever mean anything outside the namespaces it made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest

IN_CI = os.environ.get("CI") == "true"


def require_root_tools(*tools: str) -> None:
    """Skip on a developer's machine without root or tools; in CI such a gap is a failure."""
    missing = [t for t in tools if shutil.which(t) is None]
    problem = None
    if os.geteuid() != 0:
        problem = "needs root"
    elif missing:
        problem = "needs " + ", ".join(missing)
    if problem:
        if IN_CI:
            pytest.fail(f"{problem}: CI must run this test (install it in .ci/run)")
        pytest.skip(problem)


def run(cmd: Sequence[str], *, check: bool = True, input: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command, raising with its stderr when it fails (so a test says why)."""
    proc = subprocess.run(list(cmd), input=input, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


@dataclass
class NetnsPair:
    """Two namespaces, ``server`` and ``client``, with one veth link between them."""

    server: str
    client: str
    server4: str = "198.18.0.1"
    client4: str = "198.18.0.2"
    server6: str = "2001:db8::1"
    client6: str = "2001:db8::2"
    client_extra: list[str] = field(default_factory=list)

    def exec(self, ns: str, cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *cmd], **kwargs)

    def popen(self, ns: str, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kwargs)

    def add_client_addresses(self, addresses: Sequence[str]) -> None:
        """Give the client more source addresses (one /32 or /128 each), in one batch."""
        lines = []
        for addr in addresses:
            plen = 128 if ":" in addr else 32
            lines.append(f"address add {addr}/{plen} dev veth-c nodad"
                         if plen == 128 else f"address add {addr}/{plen} dev veth-c")
        run(["ip", "-n", self.client, "-batch", "-"], input="\n".join(lines) + "\n")
        self.client_extra.extend(addresses)

    def route_to_client(self, networks: Sequence[str]) -> None:
        """Send the server's replies for ``networks`` through the client's veth address.

        With a route via one gateway the server keeps one neighbour entry, however many
        client addresses there are; on-link, thousands of them would overflow its
        neighbour table (gc_thresh3 is 1024) and drop packets of their own accord.
        """
        lines = [f"route add {net} via {self.client6 if ':' in net else self.client4}"
                 for net in networks]
        run(["ip", "-n", self.server, "-batch", "-"], input="\n".join(lines) + "\n")


@contextlib.contextmanager
def netns_pair(prefix: str = "rg") -> Iterator[NetnsPair]:
    """Create the pair, route 198.18.0.0/15 and 2001:db8::/32 between them, then delete it."""
    tag = uuid.uuid4().hex[:6]
    pair = NetnsPair(server=f"{prefix}s-{tag}", client=f"{prefix}c-{tag}")
    try:
        run(["ip", "netns", "add", pair.server])
        run(["ip", "netns", "add", pair.client])
        run(["ip", "link", "add", "veth-s", "netns", pair.server, "type", "veth",
             "peer", "name", "veth-c", "netns", pair.client])
        for ns, dev, a4, a6 in ((pair.server, "veth-s", pair.server4, pair.server6),
                                (pair.client, "veth-c", pair.client4, pair.client6)):
            batch = (f"link set lo up\nlink set {dev} up\n"
                     f"address add {a4}/15 dev {dev}\n"
                     f"address add {a6}/32 dev {dev} nodad\n")
            run(["ip", "-n", ns, "-batch", "-"], input=batch)
        yield pair
    finally:
        for ns in (pair.server, pair.client):
            delete_netns(ns)


def delete_netns(ns: str) -> None:
    """Kill whatever still runs in ``ns``, then delete it; never raises (it runs in the
    ``finally`` of every test that made a namespace)."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                          text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
