"""Durations as admins write them: ``90s``, ``10m``, ``1h``, ``7d`` (or plain seconds).

Every duration rblguard takes (config, rules, control requests, ``--for``) goes through
``parse_duration``: it is finite, greater than zero and at most MAX_DURATION, so a ban's
end is always a time the kernel, SQLite and a log line can hold.
"""

from __future__ import annotations

import math
import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
MAX_DURATION = 365 * 86400.0  # the longest timeout an nftables set element holds
_HINT = "write e.g. 90s, 10m, 1h, 7d"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_duration(value: object) -> float:
    """Seconds in ``value``; raises ValueError with a message fit for an admin."""
    shown = _shown(value)
    if isinstance(value, bool):
        raise ValueError(f"{shown} is not a duration ({_HINT})")
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        else:
            m = _DURATION.match(str(value))
            if not m:
                raise ValueError(f"{shown} is not a duration ({_HINT})")
            seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    except OverflowError:
        seconds = math.inf
    if math.isnan(seconds):
        raise ValueError(f"{shown} is not a duration ({_HINT})")
    if seconds <= 0:
        raise ValueError(f"{shown}: a duration must be greater than zero")
    if seconds > MAX_DURATION:
        raise ValueError(f"{shown}: a duration must be finite and at most "
                         f"{format_duration(MAX_DURATION)}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 3600 -> "1h", 5400 -> "90m", 45 -> "45s"."""
    seconds = round(seconds)
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"
