"""Decisions: turn matches into bans (repeat offenders, subnets, the storm guard) and keep the
allowlist's addresses out.
"""
