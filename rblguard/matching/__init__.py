"""Matching: the YAML rules, and the scanner that finds their rejects in blocks of log lines."""
