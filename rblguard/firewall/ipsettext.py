"""Reading what the ``ipset`` tool prints: set headers and saved elements.

Kept apart from the backend so that the parsing of the tool's text, which changes
between ipset versions, can be tested on plain strings.
"""

from __future__ import annotations

from collections.abc import Iterator

from rblguard.firewall.base import Listed


def parse_headers(text: str) -> dict[str, dict[str, str]]:
    """``ipset list -t``'s output (no elements, the kernel's own count) as
    name -> {"Type": "hash:net", "Header": "family inet ...", "Number of entries":
    "12", ...}."""
    headers: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        if key == "Name":
            current = headers.setdefault(value.strip(), {})
        else:
            current[key] = value.strip()
    return headers


def parse_saved(text: str) -> Iterator[Listed]:
    """The elements of ``ipset list -o save NAME``, each with its expiry in seconds
    from now (infinite when the element has no timeout)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[0] != "add":
            continue
        expires = float("inf")
        if "timeout" in parts:
            seconds = int(parts[parts.index("timeout") + 1])
            expires = float(seconds) if seconds else float("inf")
        yield Listed(parts[2], expires)
