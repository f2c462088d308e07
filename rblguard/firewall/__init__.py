"""Firewall backends: put bans in the kernel, in batches, with kernel timeouts."""
