"""Firewall backends: put bans in the kernel, in batches, with kernel timeouts."""

from __future__ import annotations

from rblguard.firewall.base import Backend, FirewallError, FirewallOptions


def make_backend(options: FirewallOptions) -> Backend:
    """The backend ``options.backend`` names; its library is imported only here."""
    if options.backend == "nftables":
        from rblguard.firewall.nftables import NftablesBackend

        return NftablesBackend(options)
    if options.backend == "ipset":
        from rblguard.firewall.ipset import IpsetBackend

        return IpsetBackend(options)
    raise FirewallError(f"unknown backend {options.backend!r} (nftables or ipset)")
