"""The Debian package: it builds from the checkout, lintian finds nothing to say, its
files are where Debian and the unit expect them, and install, upgrade and purge on a
real dpkg do what docs/install.md promises.

Every check runs the real tools (dpkg-buildpackage, lintian, dpkg-deb, apt-get,
systemd-analyze, piuparts).  The package is built in a temporary copy of the tree,
because dpkg-buildpackage writes ``../*.deb`` and leaves build trees under debian/.
The install round trip runs ``install.sh`` itself, on this machine: only when no
rblguard is there to be disturbed, with a policy-rc.d that keeps the daemon (and its
firewall) from starting, and it purges what it installed even when it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rblguard import __version__
from rblguard.commands.cli import COMMANDS
from tests.netns import IN_CI, require_root_tools

ROOT = Path(__file__).resolve().parent.parent
# pybuild must find Debian's python3, not a venv's or pyenv's first on PATH
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
             "DEBIAN_FRONTEND": "noninteractive"}
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build",
                                    "dist", ".pytest_cache", ".ruff_cache", ".hypothesis",
                                    "*.so")  # the venv's in-place build of the prefilter
CONFFILE = "/etc/rblguard/rblguard.yaml"
UNIT = "/lib/systemd/system/rblguard.service"
ENABLED = "/etc/systemd/system/multi-user.target.wants/rblguard.service"
# What an install.sh before the package left behind (all of it goes but config and state)
OLD_TREE, OLD_COMMAND = "/opt/rblguard", "/usr/local/sbin/rblguard"
OLD_UNIT = "/etc/systemd/system/rblguard.service"
STATE = "/var/lib/rblguard"
POLICY = "/usr/sbin/policy-rc.d"
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dpkg-deb", "argparse-manpage")
# The package holds the compiled prefilter (rblguard.matching._prefilter), so it is
# built for this machine's architecture.
ARCH = (subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                       check=False).stdout.strip() if shutil.which("dpkg") else "")


def require_tools(*tools: str) -> None:
    """Skip without the tools on a developer's machine; in CI a missing one fails."""
    missing = [t for t in tools if shutil.which(t, path=CLEAN_ENV["PATH"]) is None]
    if missing:
        problem = "needs " + ", ".join(missing)
        if IN_CI:
            pytest.fail(f"{problem}: CI must run this test (APT_PACKAGES in run-tests.sh)")
        pytest.skip(problem)


def run(cmd: list[str], *, cwd: Path | None = None, check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """A tool in the clean environment; its output is in the failure message."""
    proc = subprocess.run(cmd, cwd=cwd, env={**CLEAN_ENV, "HOME": str(cwd or "/root")},
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@dataclass
class Built:
    deb: Path
    changes: Path
    contents: dict[str, str]  # path in the package -> its mode string from dpkg-deb -c
    control: Path  # the control area (dpkg-deb -e)
    data: Path  # the files (dpkg-deb -x)


def build(tmp: Path, version: str | None = None) -> Built:
    """Build the package from a copy of the tree; ``version`` adds a changelog entry and
    a changed default config, as a new release would bring."""
    src = tmp / "rblguard"
    shutil.copytree(ROOT, src, ignore=NOT_COPIED)
    if version:
        changelog = src / "debian" / "changelog"
        entry = (f"rblguard ({version}) unstable; urgency=medium\n\n  * Test release.\n\n"
                 " -- rblguard developers <maintainers@users.noreply.r-seed-60f15e96.example>"
                 "  Mon, 07 Dec 2026 00:00:00 +0000\n\n")
        changelog.write_text(entry + changelog.read_text())
        with (src / "rblguard.example.yaml").open("a") as example:
            example.write(f"# the default of release {version}\n")
    run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src)
    (deb,) = tmp.glob(f"rblguard_*_{ARCH}.deb")
    (changes,) = tmp.glob("rblguard_*.changes")
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    contents = {}
    for line in listing.splitlines():
        fields = line.split(maxsplit=5)
        contents[fields[5].removeprefix(".").split(" -> ")[0]] = fields[0]
    run(["dpkg-deb", "-e", str(deb), str(tmp / "control")])
    run(["dpkg-deb", "-x", str(deb), str(tmp / "data")])
    return Built(deb, changes, contents, tmp / "control", tmp / "data")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    require_tools(*BUILD_TOOLS)
    tmp = tmp_path_factory.mktemp("deb")
    tmp.chmod(0o755)  # apt-get reads the .deb as its unprivileged _apt user
    return build(tmp)


def field(built: Built, name: str) -> list[str]:
    """A relation field of the binary package, split at the commas."""
    text = run(["dpkg-deb", "-f", str(built.deb), name]).stdout
    return [part.strip() for part in text.split(",") if part.strip()]


def test_lintian_reports_no_error_and_no_warning(built: Built) -> None:
    require_tools("lintian")
    proc = run(["lintian", "--info", "--display-info", str(built.changes)], check=False)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert not tags and proc.returncode == 0, proc.stdout + proc.stderr


def test_files_are_where_debian_and_the_unit_expect_them(built: Built) -> None:
    files = built.contents
    assert files["/usr/bin/rblguard"].startswith("-rwxr-xr-x")
    assert CONFFILE in files and "/etc/rblguard/rules.d/" in files
    assert UNIT in files  # bookworm's dh_installsystemd looks only in /lib
    assert "/usr/share/rblguard/grafana/dashboard.json" in files
    assert "/usr/share/rblguard/prometheus/alerts.yml" in files
    assert "/usr/share/man/man8/rblguard.8.gz" in files
    shipped = {p.rsplit("/", 1)[1] for p in files
               if re.fullmatch(r"/usr/lib/python3/dist-packages/rblguard/shipped_rules/"
                               r"[^/]+\.yaml", p)}
    assert shipped == {p.name for p in (ROOT / "rules").glob("*.yaml")}
    for forbidden in ("/run/", "/var/run/", "/usr/local/", "/etc/systemd/", "/opt/"):
        assert not [p for p in files if p.startswith(forbidden)], forbidden
    conffiles = (built.control / "conffiles").read_text().split()
    assert conffiles == [CONFFILE]
    assert (built.data / CONFFILE.lstrip("/")).read_text() == \
        (ROOT / "rblguard.example.yaml").read_text()
    assert (built.data / UNIT.lstrip("/")).read_text() == \
        (ROOT / "systemd" / "rblguard.service").read_text()


def test_dependencies_come_from_debian(built: Built) -> None:
    depends = {d.split(" ")[0] for d in field(built, "Depends")}
    assert {"nftables", "python3-nftables", "python3-regex", "python3-yaml", "python3-watchdog",
            "python3-prometheus-client", "python3-pyroute2", "python3-redis"} <= depends
    assert not [d for d in depends if "pip" in d]  # pyproject's pip-nftables is mapped
    assert field(built, "Recommends") == ["ipset", "iptables"]
    assert field(built, "Suggests") == ["redis-server", "prometheus"]
    assert run(["dpkg-deb", "-f", str(built.deb), "Architecture"]).stdout.strip() == ARCH
    assert any(d.startswith("libc6") for d in depends)  # ${shlibs:Depends}: the prefilter's


def test_the_compiled_prefilter_is_in_the_package(built: Built) -> None:
    """Built for Debian's python3 (not skipped for want of a compiler): without it
    `rblguard scan` is slower but right, so nothing else would notice."""
    compiled = [p for p in built.contents
                if re.fullmatch(r"/usr/lib/python3/dist-packages/rblguard/matching/"
                                r"_prefilter\.cpython-3\d+-[\w-]+\.so", p)]
    assert compiled, "no rblguard/matching/_prefilter*.so in the package"


def test_man_page_is_the_parser_in_section_8(built: Built) -> None:
    page = run(["zcat", str(built.data / "usr/share/man/man8/rblguard.8.gz")]).stdout
    assert page.startswith('.TH rblguard "8"')
    assert re.search(r"^\.SH NAME\nrblguard \\- \S", page, re.MULTILINE)
    words = set(re.findall(r"\\fI\\,([\w\\-]+)\\/", page.replace("\\-", "-")))
    assert set(COMMANDS) <= words, set(COMMANDS) - words


def test_maintainer_scripts_leave_systemctl_to_debhelper() -> None:
    scripts = [p for p in (ROOT / "debian").iterdir()
               if re.fullmatch(r"(rblguard\.)?(pre|post)(inst|rm)", p.name)]
    assert scripts, "no maintainer script (postrm removes the state on purge)"
    for script in scripts:
        body = "\n".join(line for line in script.read_text().splitlines()
                         if not line.lstrip().startswith("#"))
        assert "systemctl" not in body and "deb-systemd" not in body, script


def installed_version(package: str = "rblguard") -> str | None:
    status = run(["dpkg-query", "-W", "-f", "${Status} ${Version}", package],
                 check=False).stdout
    return status.split()[-1] if status.startswith("install ok installed ") else None


def dpkg_knows(package: str = "rblguard") -> bool:
    """Installed, or only its config left (removed, not purged)."""
    status = run(["dpkg-query", "-W", "-f", "${Status}", package], check=False).stdout
    return status.endswith((" installed", " config-files", " half-installed",
                            " half-configured", " unpacked"))


@pytest.fixture
def no_rblguard_here() -> Iterator[None]:
    """Install only where nothing of an rblguard is to be disturbed, never start it, and
    purge whatever the test installed, however it ends."""
    require_root_tools("apt-get", "dpkg-query", "systemd-analyze")
    present = [p for p in (CONFFILE, STATE, OLD_TREE, OLD_COMMAND, OLD_UNIT, ENABLED)
               if os.path.lexists(p)]
    if dpkg_knows() or present:
        problem = f"an rblguard is installed here ({present or 'dpkg knows it'})"
        if IN_CI:
            pytest.fail(f"{problem}: CI needs a machine without it")
        pytest.skip(problem)
    own_policy = not os.path.lexists(POLICY)
    if own_policy:
        Path(POLICY).write_text("#!/bin/sh\nexit 101\n")
        os.chmod(POLICY, 0o755)
    try:
        refused = run([POLICY, "rblguard.service", "start"], check=False).returncode
        assert refused == 101, f"{POLICY} would let the package start rblguard"
        yield
    finally:
        if dpkg_knows():
            run(["apt-get", "purge", "-y", "-qq", "rblguard"], check=False)
        for path in (OLD_TREE, STATE, "/etc/rblguard"):
            shutil.rmtree(path, ignore_errors=True)
        for path in (OLD_COMMAND, OLD_UNIT, ENABLED):
            if os.path.lexists(path):
                os.unlink(path)
        if own_policy:
            os.unlink(POLICY)


def fake_old_installation(admin_config: str) -> None:
    """What the install.sh before the package left: a venv, a command, a unit that would
    shadow the packaged one, the admin's config and rblguard's state."""
    os.makedirs(f"{OLD_TREE}/bin")
    Path(f"{OLD_TREE}/bin/rblguard").write_text("#!/bin/sh\nexit 1\n")
    os.makedirs(os.path.dirname(OLD_COMMAND), exist_ok=True)
    os.symlink(f"{OLD_TREE}/bin/rblguard", OLD_COMMAND)
    old_unit = (ROOT / "systemd" / "rblguard.service").read_text()
    Path(OLD_UNIT).write_text(old_unit.replace("/usr/bin/rblguard", OLD_COMMAND))
    os.makedirs(os.path.dirname(ENABLED), exist_ok=True)
    os.symlink(OLD_UNIT, ENABLED)
    os.makedirs("/etc/rblguard/rules.d")
    Path(CONFFILE).write_text(admin_config)
    os.makedirs(STATE, mode=0o700)
    Path(STATE, "state.db").write_bytes(b"bans")


def exposure(unit: str) -> float:
    proc = run(["systemd-analyze", "security", "--offline=true", unit])
    found = re.search(r"Overall exposure level for rblguard\.service: (\d+\.\d+)",
                      proc.stdout)
    assert found, proc.stdout[-2000:]
    return float(found.group(1))


def test_install_migrate_upgrade_purge(no_rblguard_here: None, built: Built,
                                       tmp_path: Path) -> None:
    default = (ROOT / "rblguard.example.yaml").read_text()
    admin_config = default.replace("log_level: info ", "log_level: debug")  # the admin's
    assert admin_config != default
    fake_old_installation(admin_config)

    # The README's set-up command (--no-start: this machine's firewall is not ours)
    proc = subprocess.run([str(ROOT / "install.sh"), "--no-start"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert installed_version() == __version__
    for gone in (OLD_TREE, OLD_COMMAND, OLD_UNIT):
        assert not os.path.lexists(gone), gone
    assert Path(CONFFILE).read_text() == admin_config  # kept, and the default beside it
    assert Path(CONFFILE + ".dpkg-dist").read_text() == default
    assert Path(STATE, "state.db").read_bytes() == b"bans"
    assert os.readlink(ENABLED) == UNIT  # enabled by debhelper's postinst
    version = run(["/usr/bin/rblguard", "--version"]).stdout.strip()
    assert version == f"rblguard {__version__}"
    run(["/usr/bin/rblguard", "run", "--check"])

    verify = run(["systemd-analyze", "verify", "--man=no", UNIT], check=False)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), \
        verify.stdout + verify.stderr
    assert exposure(UNIT) <= 2.4  # as tests/test_systemd.py asks of the shipped unit

    # An upgrade with a new default keeps the admin's edit and leaves the default beside
    upgrade = tmp_path / "upgrade"
    upgrade.mkdir(mode=0o755)
    newer = build(upgrade, version=f"{__version__}+1")
    run(["apt-get", "install", "-y", "-qq", "-o", "Dpkg::Options::=--force-confold",
         str(newer.deb)])
    assert installed_version() == f"{__version__}+1"
    assert Path(CONFFILE).read_text() == admin_config
    assert Path(CONFFILE + ".dpkg-dist").read_text() == \
        (newer.data / CONFFILE.lstrip("/")).read_text()
    assert Path(CONFFILE + ".dpkg-dist").read_text() != default

    run(["apt-get", "purge", "-y", "-qq", "rblguard"])
    assert not dpkg_knows()
    left = [p for p in {**built.contents, **newer.contents}
            if p.startswith(("/etc/rblguard", "/usr/lib/python3/dist-packages/rblguard",
                             "/usr/share/rblguard", "/usr/bin/rblguard", UNIT,
                             "/usr/share/man/man8/rblguard", "/usr/share/doc/rblguard"))
            and os.path.lexists(p)]
    assert not left, left
    for gone in ("/etc/rblguard", STATE, ENABLED):
        assert not os.path.lexists(gone), gone


def test_piuparts_installs_and_purges_in_a_clean_bookworm(built: Built,
                                                          tmp_path: Path) -> None:
    """Debian's own check, in a fresh chroot from the archive: about a minute here."""
    require_root_tools("piuparts", "debootstrap")
    proc = run(["piuparts", "--tmpdir", str(tmp_path), "-d", "bookworm",
                "-m", "http://deb.debian.org/debian", str(built.deb)],
               cwd=tmp_path, check=False, timeout=1200)
    assert proc.returncode == 0 and "PASS: All tests." in proc.stdout + proc.stderr, \
        (proc.stdout + proc.stderr)[-4000:]
