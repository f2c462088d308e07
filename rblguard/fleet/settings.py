"""The ``fleet:`` config section, read once into a frozen FleetSettings.

rblguard.config calls parse_fleet with its reader, so every error names the file, the
line and the dotted key like any other config error.  Secrets never sit in the YAML: the
hub's URL may not carry a password, ``password_file`` names a file that holds it.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

DEFAULT_PREFIX = "rblguard:"
DEFAULT_MAX_DURATION = 7 * 86400.0  # repeat.max's default: the longest local ban
DEFAULT_ORIGIN_RATE = 10_000.0  # above an origin's own storm guard (5,000/s)
DEFAULT_QUARANTINE = 3600.0
DEFAULT_QUEUE = 100_000
_MEMBER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PREFIX = re.compile(r"^[A-Za-z0-9:._{}-]{1,64}$")
_HOSTPORT = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$")
KEYS = ("redis", "name", "username", "password_file", "tls", "prefix", "sentinels",
        "service", "max_duration", "origin_max_per_second", "quarantine", "queue_max",
        "timeout")
TLS_KEYS = ("ca", "cert", "key", "check_hostname")


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """TLS to the hub (``rediss://``): a CA to trust, and a client certificate if the
    hub asks for one (``tls-auth-clients yes``)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    check_hostname: bool = True


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """Where the hub is, who this host is in the fleet and what it accepts from others."""

    redis: str | None  # redis://, rediss:// or unix:// URL; None with sentinels
    name: str
    username: str | None = None
    password_file: str | None = None
    tls: TlsSettings | None = None
    prefix: str = DEFAULT_PREFIX
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    max_duration: float = DEFAULT_MAX_DURATION
    origin_max_per_second: float = DEFAULT_ORIGIN_RATE
    quarantine: float = DEFAULT_QUARANTINE
    queue_max: int = DEFAULT_QUEUE
    timeout: float = 2.0  # seconds for a connect or a command (not XREAD's own block)

    @property
    def hub(self) -> str:
        """The hub as status shows it (never with a password)."""
        if self.sentinels:
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel://{hosts}/{self.service}"
        return str(self.redis)

    def password(self) -> str | None:
        """The password, read from ``password_file`` now (so a rotated secret is taken
        on the next reconnect); its trailing newline is not part of it."""
        if self.password_file is None:
            return None
        with open(self.password_file, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")


def default_name() -> str:
    """This host's short host name, as the fleet's name for it."""
    name = socket.gethostname().split(".")[0]
    return name if _MEMBER.match(name) else "rblguard"


def valid_member_name(text: str) -> bool:
    """A fleet member's (origin's) name: what this host publishes and accepts."""
    return bool(_MEMBER.match(text))


def _url(r: Any, value: Any) -> str:
    text = r.text("fleet.redis", value)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise r.err("fleet.redis", f"{text!r} is not a URL: {exc}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise r.err("fleet.redis", f"{text!r} must start with redis://, rediss:// (TLS) "
                    "or unix:// (a socket path)")
    if parts.password:
        raise r.err("fleet.redis", "must not hold a password (it would be readable by "
                    "anyone who can read the config): put it in password_file")
    if parts.scheme == "unix":
        if not parts.path.startswith("/"):
            raise r.err("fleet.redis", f"{text!r}: unix:// needs an absolute socket path, "
                        "e.g. unix:///run/redis/redis.sock")
    elif not parts.hostname:
        raise r.err("fleet.redis", f"{text!r} names no host (e.g. redis://hub:6379/0)")
    elif port is not None and not 1 <= port <= 65535:
        raise r.err("fleet.redis", f"port {port} must be between 1 and 65535")
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not (db.isdigit() and int(db) < 16):
        raise r.err("fleet.redis", f"database {db!r} must be a number from 0 to 15")
    return text


def _sentinels(r: Any, value: Any) -> tuple[tuple[str, int], ...]:
    items = r.listing("fleet.sentinels", value)
    if not items:
        raise r.err("fleet.sentinels", "needs at least one host:port")
    out = []
    for i, item in enumerate(items):
        m = _HOSTPORT.match(str(item).strip())
        if not m or not 1 <= int(m.group(3)) <= 65535:
            raise r.err(f"fleet.sentinels[{i}]", f"{item!r} must be host:port "
                        "(e.g. sentinel1.example:26379, [2001:db8::5]:26379)")
        out.append((m.group(1) or m.group(2), int(m.group(3))))
    return tuple(out)


def _readable(r: Any, key: str, value: Any) -> str:
    path = r.path_value(key, value)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise r.err(key, f"{path} is not a readable file")
    return path


def _tls(r: Any, value: Any) -> TlsSettings:
    spec = r.mapping("fleet.tls", value or {}, TLS_KEYS)
    if ("cert" in spec) != ("key" in spec):
        raise r.err("fleet.tls", "cert and key go together (the client certificate and "
                    "its private key)")
    return TlsSettings(
        ca=_readable(r, "fleet.tls.ca", spec["ca"]) if "ca" in spec else None,
        cert=_readable(r, "fleet.tls.cert", spec["cert"]) if "cert" in spec else None,
        key=_readable(r, "fleet.tls.key", spec["key"]) if "key" in spec else None,
        check_hostname=r.boolean("fleet.tls.check_hostname",
                                 spec.get("check_hostname", True)),
    )


def _hub(r: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """redis: or sentinels: + service:, exactly one way to find the hub."""
    out: dict[str, Any] = {"redis": None}
    if "sentinels" in spec:
        if "redis" in spec:
            raise r.err("fleet.sentinels", "give either redis: (one hub) or sentinels: "
                        "with service: (a hub that fails over), not both")
        out["sentinels"] = _sentinels(r, spec["sentinels"])
        if "service" not in spec:
            raise r.err("fleet.sentinels", "needs service: the name the sentinels monitor "
                        "(sentinel monitor NAME ...)")
        out["service"] = r.name("fleet.service", spec["service"], 64)
    elif "redis" in spec:
        out["redis"] = _url(r, spec["redis"])
        if "service" in spec:
            raise r.err("fleet.service", "only goes with sentinels:")
    else:
        raise r.err("fleet", "needs redis: (e.g. redis://hub.example:6379/0) or "
                    "sentinels: with service:")
    return out


def parse_fleet(r: Any, value: Any) -> FleetSettings | None:
    """The ``fleet:`` section via rblguard.config's reader (``r``); off is None."""
    if value is None or value is False:
        return None
    spec = r.mapping("fleet", value, KEYS)
    opts = _hub(r, spec)
    opts["name"] = default_name()
    if "name" in spec:
        name = r.text("fleet.name", spec["name"])
        if not valid_member_name(name):
            raise r.err("fleet.name", f"{name!r} must be letters, digits, '.', '_' or '-' "
                        "(at most 64), starting with a letter or digit")
        opts["name"] = name
    if "username" in spec:
        opts["username"] = r.name("fleet.username", spec["username"], 64)
    if "password_file" in spec:
        opts["password_file"] = _readable(r, "fleet.password_file", spec["password_file"])
    tls_wanted = "tls" in spec
    uses_tls = (opts["redis"] or "").startswith("rediss://")
    if tls_wanted and opts["redis"] and not uses_tls:
        raise r.err("fleet.tls", "needs a rediss:// URL (redis:// is plain text)")
    if tls_wanted or uses_tls:
        opts["tls"] = _tls(r, spec.get("tls"))
    if "prefix" in spec:
        prefix = r.text("fleet.prefix", spec["prefix"])
        if not _PREFIX.match(prefix):
            raise r.err("fleet.prefix", f"{prefix!r} must be 1 to 64 of letters, digits "
                        "and : . _ - { }")
        opts["prefix"] = prefix
    if "max_duration" in spec:
        opts["max_duration"] = r.duration("fleet.max_duration", spec["max_duration"])
    if "origin_max_per_second" in spec:
        opts["origin_max_per_second"] = r.number(
            "fleet.origin_max_per_second", spec["origin_max_per_second"], 1.0, 10_000_000.0)
    if "quarantine" in spec:
        opts["quarantine"] = r.duration("fleet.quarantine", spec["quarantine"])
    if "queue_max" in spec:
        opts["queue_max"] = r.integer("fleet.queue_max", spec["queue_max"], 100, 10_000_000)
    if "timeout" in spec:
        opts["timeout"] = r.number("fleet.timeout", spec["timeout"], 0.1, 60.0)
    return FleetSettings(**opts)
