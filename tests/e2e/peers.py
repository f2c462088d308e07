"""The tools rblguard replaces, run on the same front end for the CPU comparison.

- **swatch**: the seed's recipe.  Debian's ``swatchdog`` follows the log and, for each
  ``rblsmtpd:`` line, runs ``ipset add`` (one process per ban); iptables drops the set's
  members on port 25 (every packet, as the recipe did).
- **fail2ban**: Debian's ``fail2ban-server`` with a filter for the rblsmtpd reject line
  (its shipped qmail filter matches none of them) and an action that adds to an ipset,
  its backend chosen by fail2ban itself (``auto``).

Both run inside the front end's server namespace, with every file in its work
directory; nothing of the machine's own swatch or fail2ban configuration is read.
"""

from __future__ import annotations

from pathlib import Path

from tests.netns import run

SWATCH_SET = "rblswatch"
F2B_SET = "f2brbl"
BAN_SECONDS = 3600

SWATCHRC = f"""watchfor /rblsmtpd: (\\S+) /
  exec ipset -exist add {SWATCH_SET} $1 timeout {BAN_SECONDS}
"""

FAIL2BAN_CONF = """[Definition]
loglevel = WARNING
logtarget = {workdir}/fail2ban.log
socket = {workdir}/fail2ban.sock
pidfile = {workdir}/fail2ban.pid
dbfile = :memory:
"""

JAIL_CONF = """[rblsmtpd]
enabled = true
backend = auto
filter = rblsmtpd
action = rblset
logpath = {log}
datepattern = {{NONE}}
maxretry = 1
findtime = 3600
bantime = {ban}
"""

FILTER_CONF = r"""[Definition]
failregex = ^@[0-9a-f]{24} rblsmtpd: <HOST> pid \d+: (?:451|553)(?= )
ignoreregex = temporary RBL lookup error|Error:|/returnc/
"""

ACTION_CONF = """[Definition]
actionstart =
actionstop =
actioncheck =
actionban = ipset -exist add {set} <ip> timeout {ban}
actionunban = ipset -exist del {set} <ip>
"""


def drop_set_members(ns: str, name: str, port: int) -> None:
    """An ipset and the iptables rule that drops its members' packets to ``port``."""
    run(["ip", "netns", "exec", ns, "ipset", "-exist", "create", name, "hash:ip",
         "timeout", "0"])
    run(["ip", "netns", "exec", ns, "iptables", "-I", "INPUT", "-p", "tcp", "--dport",
         str(port), "-m", "set", "--match-set", name, "src", "-j", "DROP"])


def swatch_command(workdir: Path, log: Path) -> list[str]:
    """swatchdog following ``log`` with the seed's rule (config in ``workdir``)."""
    rc = workdir / "swatchrc"
    rc.write_text(SWATCHRC)
    return ["swatchdog", f"--config-file={rc}", f"--tail-file={log}",
            "--tail-args=-F -n 0", f"--script-dir={workdir}"]


def fail2ban_command(workdir: Path, log: Path) -> list[str]:
    """fail2ban-server in the foreground with a configuration of its own in ``workdir``."""
    conf = workdir / "fail2ban"
    (conf / "filter.d").mkdir(parents=True, exist_ok=True)
    (conf / "action.d").mkdir(exist_ok=True)
    (conf / "fail2ban.conf").write_text(FAIL2BAN_CONF.format(workdir=workdir))
    (conf / "jail.conf").write_text(JAIL_CONF.format(log=log, ban=BAN_SECONDS))
    (conf / "filter.d" / "rblsmtpd.conf").write_text(FILTER_CONF)
    (conf / "action.d" / "rblset.conf").write_text(
        ACTION_CONF.format(set=F2B_SET, ban=BAN_SECONDS))
    return ["fail2ban-server", "-c", str(conf), "-f", "-x", "start"]


def set_members(ns: str, name: str) -> set[str]:
    out = run(["ip", "netns", "exec", ns, "ipset", "list", name, "-o", "save"],
              check=False).stdout
    return {ln.split()[2] for ln in out.splitlines() if ln.startswith("add ")}


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and every descendant still running, plus what the
    children it has waited for used (swatch's ``tail`` and ``ipset`` processes count:
    they are the recipe's work)."""
    import os

    ticks = 0
    for proc in _tree(pid):
        try:
            fields = Path(f"/proc/{proc}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def running(pid: int, program: str) -> bool:
    """Whether a process named ``program`` runs among ``pid``'s descendants (swatch's
    ``tail``: until it runs, swatch sees nothing)."""
    for proc in _tree(pid):
        try:
            if Path(f"/proc/{proc}/comm").read_text().strip() == program:
                return True
        except OSError:
            continue
    return False


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found

