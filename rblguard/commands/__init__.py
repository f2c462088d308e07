"""Commands: the CLI (scan, test-rules, simulate, run, the control client, firewall)."""
