"""Daemon: the loop that owns the state and drives sources -> matching -> decisions ->
firewall; its control socket and metrics.
"""
