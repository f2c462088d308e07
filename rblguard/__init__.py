"""rblguard: keep DNSBL-listed SMTP clients out in the kernel, so retries cost no query."""

__version__ = "0.1.0"

# Where the config lives unless --config names another.  Here, not in rblguard.config,
# so that the command line can say it without importing YAML (every command would pay).
DEFAULT_CONFIG = "/etc/rblguard/rblguard.yaml"
