"""Store: the SQLite state (bans, offenders, read positions) that survives restarts."""
