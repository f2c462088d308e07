"""rblguard: keep DNSBL-listed SMTP clients out in the kernel, so retries cost no query."""

__version__ = "0.1.0"
