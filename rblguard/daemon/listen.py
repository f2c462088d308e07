"""Where the metrics endpoint listens: the config's address, checked."""

from __future__ import annotations


class MetricsAddressError(OSError):
    """The metrics endpoint cannot listen where the config says (port taken, bad host)."""


def parse_address(address: object) -> tuple[str, int]:
    """``127.0.0.1:9731``, ``[::1]:9731``, ``:9731`` (every interface), or a config
    ListenAddress (``.host``/``.port``) -> (host for bind, port)."""
    if hasattr(address, "host") and hasattr(address, "port"):
        host, port = str(address.host), int(address.port)
    else:
        text = str(address).strip()
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit():
            raise MetricsAddressError(f"metrics address {text!r} must be host:port")
        port = int(port_text)
    host = host.strip("[]")
    return host or "::", port
