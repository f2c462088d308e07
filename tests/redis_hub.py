"""A real ``redis-server`` for the fleet tests, in a directory of the test's own.

Never the machine's Redis service: each hub gets its own directory (its AOF and its
socket live there), listens on a unix socket and, when asked, on a TCP address inside a
network namespace the test made; it is killed, and its files go with ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.daemon_harness import wait_for


@dataclass
class RedisHub:
    """One redis-server; ``start``/``kill`` at will (its AOF keeps the data)."""

    workdir: Path
    ns: str | None = None  # run inside this namespace (for a TCP hub), else here
    bind: str | None = None  # TCP address to listen on (port 6379), else unix only
    proc: subprocess.Popen | None = None
    extra: tuple[str, ...] = ()

    @property
    def socket(self) -> str:
        return str(self.workdir / "redis.sock")

    @property
    def url(self) -> str:
        return f"redis://{self.bind}:6379/0" if self.bind else f"unix://{self.socket}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = ["redis-server", "--dir", str(self.workdir), "--unixsocket", self.socket,
               "--unixsocketperm", "700", "--appendonly", "yes", "--appendfsync",
               "always", "--save", "", "--daemonize", "no", "--logfile",
               str(self.workdir / "redis.log"),
               *(("--bind", self.bind, "--port", "6379", "--protected-mode", "no")
                 if self.bind else ("--port", "0")), *self.extra]
        if self.ns:
            cmd = ["ip", "netns", "exec", self.ns, *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(self.answers, 10, "redis-server to answer PING")

    def client(self):  # a redis-py client on the unix socket (for the test's own use)
        import redis

        return redis.Redis(unix_socket_path=self.socket, socket_timeout=5)

    def answers(self) -> bool:
        import redis

        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited {self.proc.returncode}: "
                               f"{(self.workdir / 'redis.log').read_text()[-2000:]}")
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@contextlib.contextmanager
def redis_hub(workdir: Path, **kwargs) -> Iterator[RedisHub]:
    hub = RedisHub(workdir, **kwargs)
    hub.start()
    try:
        yield hub
    finally:
        hub.kill()
