"""The end-to-end load generator: SMTP clients from many addresses, on a schedule.

Run inside the client namespace (``python -m tests.e2e.load PLAN RESULTS``).  A plan is
a list of connections, each with its start time (seconds after the run's start), its
source address and its kind: ``legit`` (an unlisted sender, which must get its mail
through) or ``spam`` (a listed client, which rblsmtpd rejects and which retries).

Each connection speaks real SMTP to the server: greeting, HELO, MAIL, RCPT, QUIT.  Its
outcome is what a sender sees:

- ``accepted``: RCPT got 250 (the SMTP stand-in behind rblsmtpd answered);
- ``rejected``: RCPT got a 4xx/5xx (rblsmtpd's answer to a listed client);
- ``dropped``:  the connection was never established (its SYN was dropped);
- ``failed``:   anything else (reset, refused, a reply that never came).

A spammer's connect gives up after ``SPAM_CONNECT_TIMEOUT`` (before the kernel's first
SYN retransmission at 1 s, so a dropped connection is one SYN); a legitimate sender
waits as long as a real MTA would (``LEGIT_TIMEOUT``).  Nothing here decides what
rblguard should do: the plan is fixed before the run and outcomes are only recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import socket
import sys
import time
from dataclasses import asdict, dataclass

SPAM_CONNECT_TIMEOUT = 0.8
LEGIT_TIMEOUT = 20.0  # connect and each reply; an MTA waits minutes, 20 s is plenty here
SESSION = (b"HELO client.example\r\n", b"MAIL FROM:<sender@example.org>\r\n",
           b"RCPT TO:<postmaster@example.net>\r\n")


@dataclass
class Planned:
    """One connection of a plan."""

    at: float  # seconds after the run's start
    src: str
    kind: str  # "legit" | "spam"


@dataclass
class Outcome:
    """What one planned connection saw."""

    at: float
    src: str
    kind: str
    started: float  # Unix time the connect began
    outcome: str  # accepted | rejected | dropped | failed
    detail: str = ""
    port: int = 0  # the client's source port (ipset counts a connection per address+port)
    replied: float = 0.0  # Unix time of the server's answer to RCPT (0: none came)


# -- plans ------------------------------------------------------------------------------

def spammer_connections(rng: random.Random, spammers: list[str], start: float, span: float,
                        retries: tuple[int, int], gap: tuple[float, float]) -> list[Planned]:
    """Each spammer's first connection at a random time in [start, start+span), then a
    burst of retries, each ``gap`` seconds after the one before (a bot that reconnects
    as soon as it has been refused)."""
    plan = []
    for src in spammers:
        t = start + rng.uniform(0, span)
        plan.append(Planned(round(t, 4), src, "spam"))
        for _ in range(rng.randint(*retries)):
            t += rng.uniform(*gap)
            plan.append(Planned(round(t, 4), src, "spam"))
    return plan


def legit_connections(rng: random.Random, senders: list[str], rate: float,
                      seconds: float) -> list[Planned]:
    """Poisson arrivals at ``rate`` a second over ``seconds``, from random senders."""
    plan, t = [], rng.expovariate(rate)
    while t < seconds:
        plan.append(Planned(round(t, 4), rng.choice(senders), "legit"))
        t += rng.expovariate(rate)
    return plan


def ordered(plan: list[Planned]) -> list[Planned]:
    return sorted(plan, key=lambda p: (p.at, p.src))


# -- the client -------------------------------------------------------------------------

async def _reply(sock: socket.socket, loop: asyncio.AbstractEventLoop, buf: bytearray,
                 timeout: float) -> bytes:
    """One SMTP reply line (without its CRLF)."""
    while b"\n" not in buf:
        data = await asyncio.wait_for(loop.sock_recv(sock, 512), timeout)
        if not data:
            raise ConnectionError("closed by the server")
        buf += data
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.rstrip(b"\r")


async def one_connection(p: Planned, server: tuple[str, int], t0: float) -> Outcome:
    loop = asyncio.get_running_loop()
    legit = p.kind == "legit"
    started = time.time()
    out = Outcome(p.at, p.src, p.kind, started, "failed")
    family = socket.AF_INET6 if ":" in p.src else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind((p.src, 0))
        out.port = sock.getsockname()[1]
        try:
            await asyncio.wait_for(loop.sock_connect(sock, server),
                                   LEGIT_TIMEOUT if legit else SPAM_CONNECT_TIMEOUT)
        except TimeoutError:
            out.outcome, out.detail = "dropped", "connect timed out"
            return out
        buf = bytearray()
        greeting = await _reply(sock, loop, buf, LEGIT_TIMEOUT)
        if not greeting.startswith(b"220"):
            out.detail = f"greeting {greeting[:80]!r}"
            return out
        code = b""
        for command in SESSION:
            await loop.sock_sendall(sock, command)
            line = await _reply(sock, loop, buf, LEGIT_TIMEOUT)
            code = line[:3]
            if not code.startswith(b"2"):
                break
        out.replied = time.time()
        out.outcome = "accepted" if code == b"250" else "rejected"
        out.detail = code.decode("ascii", "replace")
        await loop.sock_sendall(sock, b"QUIT\r\n")
        with contextlib.suppress(OSError, TimeoutError, ConnectionError):
            await _reply(sock, loop, buf, 5.0)
    except (OSError, TimeoutError, ConnectionError) as exc:
        out.outcome, out.detail = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    return out


async def play(plan: list[Planned], server: tuple[str, int], t0: float) -> list[Outcome]:
    """Start every planned connection at its time (relative to Unix time ``t0``)."""
    tasks = []
    for p in plan:
        delay = t0 + p.at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one_connection(p, server, t0)))
    return list(await asyncio.gather(*tasks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", help="JSON: {server, port, t0, connections: [...]}")
    parser.add_argument("results", help="where to write the outcomes (JSON)")
    args = parser.parse_args(argv)
    with open(args.plan) as f:
        spec = json.load(f)
    plan = [Planned(**c) for c in spec["connections"]]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    outcomes = asyncio.run(play(plan, (spec["server"], spec["port"]), spec["t0"]))
    with open(args.results, "w") as f:
        json.dump([asdict(o) for o in outcomes], f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
