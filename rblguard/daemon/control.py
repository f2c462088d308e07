"""The control socket: line-delimited JSON over a Unix socket that only root can open.

One request object per line, one answer per line, several per connection::

    {"cmd": "ban", "target": "198.18.5.124", "duration": 3600, "reason": "x", "force": false}
    {"ok": true, "result": {"target": "198.18.5.124", "until": 1700003600.0, ...}}
    {"ok": false, "error": "198.51.100.9 is allowlisted (...); use --force to ban it anyway"}

Commands: status, list, ban, unban, reload, flush.  Requests are checked here (shape,
types, a target that parses) before the daemon's handler sees them, so the handler only
decides; a failing handler yields an error answer and never stops the server.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("rblguard.daemon.control")

MAX_LINE = 64 * 1024
MAX_CLIENTS = 32  # connections served at once; when all are taken, the longest idle goes
CLIENT_TIMEOUT = 60.0  # s of silence before a connection is closed
BACKLOG = 128  # connections the kernel queues before accept (Python's default is 5)
COMMANDS = {"status": {}, "list": {}, "reload": {}, "flush": {},
            "ban": {"target": str, "duration": (int, float, type(None)), "reason": str,
                    "force": bool},
            "unban": {"target": str}}
REQUIRED = {"ban": ("target",), "unban": ("target",)}


class ControlError(Exception):
    """A request that cannot be done; the message is shown to the admin as it is."""


class Unreachable(ControlError):
    """No daemon answered: not running, not allowed, or silent."""


def normalise_target(text: str) -> str:
    """The canonical address or network for ``text``; ValueError says what is wrong."""
    text = text.strip()
    bad = ValueError(f"{text!r} is not an IPv4/IPv6 address or CIDR network")
    if "/" in text:
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise bad from None
            raise ValueError(f"{text!r} has host bits set: the network is {loose}") from None
        if net.prefixlen == net.max_prefixlen:
            return normalise_target(str(net.network_address))
        return str(net)
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise bad from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def check_request(body: Any) -> dict[str, Any]:
    """The request, checked and with its target normalised; ControlError if malformed."""
    if not isinstance(body, dict):
        raise ControlError("a request is a JSON object, e.g. {\"cmd\": \"status\"}")
    cmd = body.get("cmd")
    if cmd not in COMMANDS:
        raise ControlError(f"unknown cmd {cmd!r} (known: {', '.join(sorted(COMMANDS))})")
    fields = COMMANDS[cmd]
    for key, value in body.items():
        if key == "cmd":
            continue
        if key not in fields:
            raise ControlError(f"{cmd}: unknown field {key!r}")
        if not isinstance(value, fields[key]) or (isinstance(value, bool)
                                                  and fields[key] is not bool):
            raise ControlError(f"{cmd}: field {key!r} has the wrong type")
    for key in REQUIRED.get(cmd, ()):
        if key not in body:
            raise ControlError(f"{cmd}: field {key!r} is required")
    checked = dict(body)
    if "target" in checked:
        try:
            checked["target"] = normalise_target(checked["target"])
        except ValueError as exc:
            raise ControlError(str(exc)) from None
    if checked.get("duration") is not None:
        from rblguard.durations import parse_duration

        try:
            checked["duration"] = parse_duration(checked["duration"])
        except ValueError as exc:  # NaN, Infinity, 0, negative, past MAX_DURATION
            raise ControlError(f"{cmd}: field 'duration': {exc}") from None
    return checked


class _Handler(socketserver.StreamRequestHandler):
    timeout = CLIENT_TIMEOUT

    def handle(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        if not server.take_slot():
            self._send({"ok": False, "error": "too many control connections"})
            return
        try:
            while True:
                server.idle(self.connection, True)
                line = self.rfile.readline(MAX_LINE + 1)
                server.idle(self.connection, False)
                if not line:
                    return
                if len(line) > MAX_LINE:
                    self._send({"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                    return
                if line.strip():
                    self._send(server.answer(line))
        except (OSError, TimeoutError):
            return
        finally:
            server.idle(self.connection, False)
            server.slots.release()

    def _send(self, obj: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(obj).encode() + b"\n")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(self, path: str, handler: Callable[[dict], dict]) -> None:
        self.handler = handler
        self.slots = threading.Semaphore(MAX_CLIENTS)
        self._idle: dict[socket.socket, float] = {}  # waiting for a request, since when
        self._lock = threading.Lock()
        super().__init__(path, _Handler)

    def idle(self, conn: socket.socket, waiting: bool) -> None:
        with self._lock:
            if waiting:
                self._idle[conn] = time.monotonic()
            else:
                self._idle.pop(conn, None)

    def take_slot(self) -> bool:
        """A slot for a new connection; when all are taken, the connection idle the
        longest is closed to free one, so idle clients cannot lock the admin out.

        Another newcomer may take the slot freed for this one: then the next idle
        connection goes, until a slot is ours or a second has passed.
        """
        deadline = time.monotonic() + 1.0
        while not self.slots.acquire(blocking=False):
            if time.monotonic() > deadline:
                return False
            self._close_longest_idle()
            if self.slots.acquire(timeout=0.05):
                return True
        return True

    def _close_longest_idle(self) -> None:
        with self._lock:
            oldest = min(self._idle, key=self._idle.__getitem__, default=None)
            if oldest is not None:
                del self._idle[oldest]
                with contextlib.suppress(OSError):
                    oldest.shutdown(socket.SHUT_RDWR)  # its readline ends: slot freed

    def answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = check_request(json.loads(line))
            return {"ok": True, "result": self.handler(request)}
        except json.JSONDecodeError as exc:
            return {"ok": False, "error": f"not JSON: {exc}"}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control handler failed")
            return {"ok": False, "error": f"internal error: {exc}"}


class ControlServer:
    """Serves ``handler`` on the socket ``path`` (mode 0600, parent 0700) in a thread."""

    def __init__(self, path: str, handler: Callable[[dict], dict]) -> None:
        self.path = path
        self.handler = handler
        self.server: _Server | None = None

    def start(self) -> None:
        """Listen; ControlError (one line, naming the path) if that is impossible:
        another rblguard answers there, or the path or its directory cannot be made."""
        try:
            server = self._listen()
        except OSError as exc:
            raise ControlError(f"cannot create the control socket {self.path}: "
                               f"{exc.strerror or exc}; check control_socket in the "
                               "config") from None
        self.server = server
        threading.Thread(target=server.serve_forever, name="control", daemon=True).start()

    def _listen(self) -> _Server:
        parent = Path(self.path).parent
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.path.exists(self.path):
            if not stat.S_ISSOCK(os.stat(self.path).st_mode):
                raise ControlError(f"{self.path} exists and is not a socket")
            if _listening(self.path):
                raise ControlError(f"another rblguard answers on {self.path} "
                                   "(stop it first, or give this one its own "
                                   "control_socket)")
            os.unlink(self.path)  # stale: its daemon is gone
        old = os.umask(0o177)  # no window where the socket is open to others
        try:
            server = _Server(self.path, self.handler)
        finally:
            os.umask(old)
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            server.server_close()
            raise
        return server

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _listening(path: str) -> bool:
    """Whether some process accepts connections on the socket ``path`` (a daemon still
    starting up may not answer yet, but it listens: its socket is not stale)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    try:
        sock.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # e.g. a full backlog: someone is there
    finally:
        sock.close()
    return True


def _connect(sock: socket.socket, path: str, timeout: float) -> None:
    """connect(), waiting while the daemon's listen queue is full: a Unix socket with a
    timeout fails at once with EAGAIN then, instead of waiting as TCP would."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError from None
            time.sleep(0.01)  # no event tells when a queue slot frees: poll it


def request(path: str, body: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request, return its ``result``; ControlError with a clear reason."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        _connect(sock, path, timeout)
        sock.sendall(json.dumps(body).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            part = sock.recv(1 << 20)
            if not part:
                break
            data += part
    except (FileNotFoundError, ConnectionRefusedError):
        raise Unreachable(f"rblguard is not running (no control socket at {path})") from None
    except PermissionError:
        raise Unreachable(f"permission denied on {path}: run as root") from None
    except TimeoutError:
        raise Unreachable(f"rblguard did not answer within {timeout:.0f} s") from None
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except json.JSONDecodeError:
        raise Unreachable("rblguard closed the connection without an answer") from None
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "refused"))
    return answer.get("result", {})
