"""Fleet: bans shared across a site's MX hosts through one Redis hub.

Each host publishes the bans it decided from its own log to a Redis stream and applies
the others' bans through its own decision stage, so a spammer rejected on one MX costs
one DNSBL query for the whole fleet.  Split by job: ``settings`` (the config section),
``entries`` (the entry format and the checks a foreign entry must pass), ``guard`` (the
per-origin rate cap), ``hub`` (the Redis commands) and ``link`` (the thread that owns
the Redis connection; never the daemon's loop thread).
"""
