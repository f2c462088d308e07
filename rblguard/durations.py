"""Durations as admins write them: ``90s``, ``10m``, ``1h``, ``7d`` (or plain seconds)."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_duration(value: object) -> float:
    """Seconds in ``value``; raises ValueError with a message fit for an admin."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (write e.g. 90s, 10m, 1h, 7d)")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a duration (write e.g. 90s, 10m, 1h, 7d)")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds <= 0:
        raise ValueError(f"{value!r}: a duration must be greater than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 3600 -> "1h", 5400 -> "90m", 45 -> "45s"."""
    seconds = round(seconds)
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"
