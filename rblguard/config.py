"""rblguard's configuration: every key read and checked once, into frozen dataclasses.

Each word of the YAML file is parsed here and nowhere else; the daemon, the CLI and
every stage get typed values (seconds, tuples, FirewallOptions), never raw YAML.  A bad
key stops start-up with one message naming the file, the YAML line, the dotted key
(``backend.ports[1]``) and what is wrong, so an admin fixes it in one go.

The dataclasses are frozen and compare by value: a reload can tell what changed with
``Config.changed(other)``.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from rblguard import DEFAULT_CONFIG, yamlfile
from rblguard.durations import parse_duration
from rblguard.firewall.base import FirewallOptions
from rblguard.fleet.settings import FleetSettings, parse_fleet

DAY = 86400.0
LOG_LEVELS = ("debug", "info", "warning", "error")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class ConfigError(Exception):
    """The config file cannot be used; the message names file, line, key and problem."""


class ListenAddress(NamedTuple):
    """Where the metrics endpoint listens; unpacks as ``host, port``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RepeatSettings:
    """Repeat offenders: ban time x factor^(previous bans), capped at ``max``."""

    factor: float = 2.0
    max: float = 7 * DAY
    forget_after: float = 30 * DAY  # history is dropped after this long without a ban


@dataclass(frozen=True, slots=True)
class SubnetSettings:
    """Ban the whole IPv4 /``prefix`` once ``after`` addresses in it are banned."""

    after: int
    prefix: int = 24


@dataclass(frozen=True, slots=True)
class StormSettings:
    """Limits that keep a runaway rule (or a log flood) from banning the world.

    The defaults let a botnet wave of 1,000 new bans a second through untouched.
    """

    max_active: int = 1_000_000
    max_per_second: float = 5_000.0


@dataclass(frozen=True, slots=True)
class DnsblSettings:
    """What rblsmtpd asks per connection and the DNSBL's free-use limits (Spamhaus)."""

    zones: int = 2
    connections_per_day: int = 100_000
    queries_per_day: int = 300_000


_DEFAULT_FIREWALL = FirewallOptions()
_DEFAULT_METRICS = ListenAddress("127.0.0.1", 9731)
_DEFAULT_REPEAT = RepeatSettings()
_DEFAULT_STORM = StormSettings()
_DEFAULT_DNSBL = DnsblSettings()


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, checked.  ``path`` is the file it came from, if any."""

    path: str | None = field(default=None, compare=False)
    sources: tuple[str, ...] = ("/var/log/qmail/smtpd/current",)
    rules_dirs: tuple[str, ...] = ("/etc/rblguard/rules.d",)
    shipped_rules: bool = True
    packs: tuple[str, ...] = ()  # rule packs to turn on: postfix, exim
    backend: FirewallOptions = _DEFAULT_FIREWALL
    ban_time: float = 3600.0
    repeat: RepeatSettings | None = _DEFAULT_REPEAT
    ipv6_prefix: int = 64
    ipv4_subnet: SubnetSettings | None = None
    storm: StormSettings = _DEFAULT_STORM
    allowlist: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    tcprules: str | None = None
    state_dir: str = "/var/lib/rblguard"
    control_socket: str = "/run/rblguard/control.sock"
    metrics: ListenAddress | None = _DEFAULT_METRICS
    dnsbl: DnsblSettings = _DEFAULT_DNSBL
    log_level: str = "info"
    fleet: FleetSettings | None = None  # off: this host bans alone

    @property
    def source_paths(self) -> list[str]:
        return list(self.sources)

    def changed(self, other: Config) -> list[str]:
        """The top-level keys whose values differ from ``other``'s (for reload logs)."""
        return [f.name for f in fields(self)
                if f.compare and getattr(self, f.name) != getattr(other, f.name)]


DEFAULT_PATH = DEFAULT_CONFIG
KEYS = tuple(f.name for f in fields(Config) if f.name != "path")  # the YAML keys


class _Reader:
    """Turns one YAML document into a Config, remembering each key's line for errors."""

    def __init__(self, path: Path, lines: dict[str, int]) -> None:
        self.path = path
        self.lines = lines

    def err(self, key: str, problem: str) -> ConfigError:
        line = self.lines.get(key)
        where = f"{self.path}: line {line}" if line else str(self.path)
        return ConfigError(f"{where}: {key}: {problem}")

    def mapping(self, key: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.err(key, f"must be a mapping of {', '.join(allowed)}, not {value!r}")
        for name in value:
            if name not in allowed:
                full = f"{key}.{name}" if key else str(name)
                hint = difflib.get_close_matches(str(name), allowed, n=1)
                tip = f"; did you mean {hint[0]!r}?" if hint else ""
                raise self.err(full, f"unknown key (known: {', '.join(allowed)}){tip}")
        return value

    def integer(self, key: str, value: Any, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.err(key, f"must be a whole number, not {value!r}")
        if not low <= value <= high:
            raise self.err(key, f"must be between {low} and {high}, not {value}")
        return value

    def number(self, key: str, value: Any, low: float, high: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.err(key, f"must be a number, not {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise self.err(key, f"must be a finite number, not {value!r}")
        if number < low:
            raise self.err(key, f"must be at least {low}, not {value}")
        if number > high:
            raise self.err(key, f"must be at most {high:g}, not {value}")
        return number

    def duration(self, key: str, value: Any) -> float:
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.err(key, str(exc)) from None

    def text(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.err(key, f"must be a non-empty string, not {value!r}")
        return value

    def path_value(self, key: str, value: Any) -> str:
        """A path; relative ones are taken from the config file's directory."""
        text = self.text(key, value)
        p = Path(text)
        return str(p if p.is_absolute() else (self.path.parent / p))

    def name(self, key: str, value: Any, max_len: int) -> str:
        text = self.text(key, value)
        if not _NAME.match(text) or len(text) > max_len:
            raise self.err(key, f"{text!r} is not a valid name (letters, digits, _ and -, "
                           f"starting with a letter, at most {max_len} characters)")
        return text

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.err(key, f"must be true or false, not {value!r}")
        return value

    def listing(self, key: str, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise self.err(key, f"must be a list, not {value!r}")
        return value


def _sources(r: _Reader, value: Any) -> tuple[str, ...]:
    items = r.listing("sources", value)
    if not items:
        raise r.err("sources", "needs at least one source")
    paths = []
    for i, item in enumerate(items):
        key = f"sources[{i}]"
        if isinstance(item, str):  # a bare path is accepted as shorthand for {path: ...}
            paths.append(r.path_value(key, item))
            continue
        entry = r.mapping(key, item, ("path",))
        if "path" not in entry:
            raise r.err(key, "needs a path (a log file, a multilog directory or its current)")
        paths.append(r.path_value(f"{key}.path", entry["path"]))
    if len(set(paths)) != len(paths):
        raise r.err("sources", "names the same path twice")
    return tuple(paths)


def _ports(r: _Reader, value: Any) -> tuple[int, ...] | None:
    if value == "all":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    items = r.listing("backend.ports", value) if not isinstance(value, str) else None
    if not items:
        raise r.err("backend.ports", f"must be a list of TCP ports or 'all', not {value!r}")
    ports = [r.integer(f"backend.ports[{i}]", p, 1, 65535) for i, p in enumerate(items)]
    return tuple(sorted(set(ports)))


def _backend(r: _Reader, value: Any) -> FirewallOptions:
    kinds = ("nftables", "ipset")
    shorthand = isinstance(value, str)
    if shorthand:
        value = {"type": value}
    allowed = ("type", "ports", "table", "priority", "set_v4", "set_v6", "maxelem", "mode",
               "chain")
    spec = r.mapping("backend", value, allowed)
    kind = spec.get("type", "nftables")
    if kind not in kinds:
        raise r.err("backend" if shorthand else "backend.type",
                    f"must be nftables or ipset, not {kind!r}")
    opts: dict[str, Any] = {"backend": kind}
    if "ports" in spec:
        opts["ports"] = _ports(r, spec["ports"])
    if "table" in spec:
        opts["table"] = r.name("backend.table", spec["table"], 64)
    if "priority" in spec:
        opts["priority"] = r.integer("backend.priority", spec["priority"], -400, 400)
    for key in ("set_v4", "set_v6"):
        if key in spec:
            opts[key] = r.name(f"backend.{key}", spec[key], 31)  # ipset's name limit
    if "maxelem" in spec:
        opts["maxelem"] = r.integer("backend.maxelem", spec["maxelem"], 1, 2**31 - 1)
    if "mode" in spec:
        if spec["mode"] not in ("rules", "set-only"):
            raise r.err("backend.mode", f"must be rules or set-only, not {spec['mode']!r}")
        opts["mode"] = spec["mode"]
    if "chain" in spec:
        opts["chain"] = r.name("backend.chain", spec["chain"], 28)  # iptables' limit
    if opts.get("set_v4", "rblguard4") == opts.get("set_v6", "rblguard6"):
        raise r.err("backend.set_v6", "must differ from backend.set_v4 (one set per family)")
    return FirewallOptions(**opts)


def _repeat(r: _Reader, value: Any) -> RepeatSettings | None:
    if value is False or value is None:
        return None
    spec = r.mapping("repeat", value, ("factor", "max", "forget_after"))
    d = RepeatSettings()
    return RepeatSettings(
        factor=r.number("repeat.factor", spec.get("factor", d.factor), 1.0, 1000.0),
        max=r.duration("repeat.max", spec["max"]) if "max" in spec else d.max,
        forget_after=(r.duration("repeat.forget_after", spec["forget_after"])
                      if "forget_after" in spec else d.forget_after),
    )


def _subnet(r: _Reader, value: Any) -> SubnetSettings | None:
    if value is False or value is None:
        return None
    spec = r.mapping("ipv4_subnet", value, ("after", "prefix"))
    if "after" not in spec:
        raise r.err("ipv4_subnet", "needs after: how many banned addresses ban the subnet")
    return SubnetSettings(
        after=r.integer("ipv4_subnet.after", spec["after"], 2, 65536),
        prefix=r.integer("ipv4_subnet.prefix", spec.get("prefix", 24), 16, 31),
    )


def _storm(r: _Reader, value: Any) -> StormSettings:
    spec = r.mapping("storm", value, ("max_active", "max_per_second"))
    d = StormSettings()
    return StormSettings(
        max_active=r.integer("storm.max_active", spec.get("max_active", d.max_active),
                             1, 100_000_000),
        max_per_second=r.number("storm.max_per_second",
                                spec.get("max_per_second", d.max_per_second), 0.001,
                                10_000_000.0),
    )


def _allowlist(r: _Reader, value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    nets = []
    for i, item in enumerate(r.listing("allowlist", value)):
        try:
            nets.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise r.err(f"allowlist[{i}]", f"{item!r} is not an address or CIDR network "
                        "(write e.g. 192.0.2.10, 198.51.100.0/24, 2001:db8::/48)") from None
    return tuple(nets)


def _metrics(r: _Reader, value: Any) -> ListenAddress | None:
    if value is False or value is None or value == "off":
        return None
    text = r.text("metrics", value)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if not m:
        raise r.err("metrics", f"{text!r} must be host:port (e.g. 127.0.0.1:9731, "
                    "[::1]:9731) or off")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise r.err("metrics", f"port {port} must be between 1 and 65535")
    if m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise r.err("metrics", f"[{host}] is not an IPv6 address") from None
    return ListenAddress(host, port)


def _dnsbl(r: _Reader, value: Any) -> DnsblSettings:
    spec = r.mapping("dnsbl", value, ("zones", "connections_per_day", "queries_per_day"))
    d = DnsblSettings()
    return DnsblSettings(
        zones=r.integer("dnsbl.zones", spec.get("zones", d.zones), 1, 64),
        connections_per_day=r.integer("dnsbl.connections_per_day",
                                      spec.get("connections_per_day",
                                               d.connections_per_day), 1, 10**12),
        queries_per_day=r.integer("dnsbl.queries_per_day",
                                  spec.get("queries_per_day", d.queries_per_day), 1, 10**12),
    )


def _log_level(r: _Reader, value: Any) -> str:
    level = str(value).lower()
    if level not in LOG_LEVELS:
        raise r.err("log_level", f"must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
    return level


_PARSERS: dict[str, Callable[[_Reader, Any], Any]] = {
    "sources": _sources,
    "rules_dirs": lambda r, v: tuple(r.path_value(f"rules_dirs[{i}]", d)
                                     for i, d in enumerate(r.listing("rules_dirs", v or []))),
    "shipped_rules": lambda r, v: r.boolean("shipped_rules", v),
    "packs": lambda r, v: tuple(r.name(f"packs[{i}]", p, 32)
                                for i, p in enumerate(r.listing("packs", v or []))),
    "backend": _backend,
    "ban_time": lambda r, v: r.duration("ban_time", v),
    "repeat": _repeat,
    "ipv6_prefix": lambda r, v: r.integer("ipv6_prefix", v, 32, 128),
    "ipv4_subnet": _subnet,
    "storm": _storm,
    "allowlist": _allowlist,
    "tcprules": lambda r, v: None if v in (None, False) else r.path_value("tcprules", v),
    "state_dir": lambda r, v: r.path_value("state_dir", v),
    "control_socket": lambda r, v: r.path_value("control_socket", v),
    "metrics": _metrics,
    "dnsbl": _dnsbl,
    "log_level": _log_level,
    "fleet": parse_fleet,
}
assert set(_PARSERS) == set(KEYS)


def parse_config(text: str, path: str | Path = "<config>") -> Config:
    """A Config from YAML text; ``path`` is only used in messages and for relative paths."""
    path = Path(path)
    try:
        node = yamlfile.compose(text, str(path))
        data = yaml.load(text, Loader=yamlfile.SAFE_LOADER)
    except yamlfile.YamlFileError as exc:
        raise ConfigError(str(exc)) from None
    except yaml.YAMLError as exc:
        line, problem = yamlfile.syntax_error(exc)
        where = f"{path}: line {line}" if line is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if data is None:
        data = {}
    lines: dict[str, int] = {}
    yamlfile.key_lines(node, "", lines)
    reader = _Reader(path, lines)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys "
                          f"({', '.join(KEYS)}), not {type(data).__name__}")
    reader.mapping("", data, KEYS)
    values = {key: _PARSERS[key](reader, data[key])
              for key in KEYS if key in data}
    return Config(path=str(path), **values)


def load_config(path: str | Path | None = None, must_exist: bool | None = None) -> Config:
    """Read and check the config at ``path``, or at DEFAULT_PATH when None.

    A path the admin named must exist (``must_exist`` defaults to whether one was
    named): a typo must not silently run with defaults.  The default path may be
    absent, which means every default.
    """
    if must_exist is None:
        must_exist = path is not None
    path = Path(DEFAULT_PATH if path is None else path)
    try:
        text = yamlfile.read_text(path)
    except FileNotFoundError:
        if must_exist:
            raise ConfigError(f"{path}: no such file") from None
        return Config(path=None)
    except yamlfile.YamlFileError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_config(text, path)
