"""Scan speed: ``rblguard scan --json`` against the fastest plain-Python loop.

An admin's first contact with rblguard is ``rblguard scan`` on months of logs, and the
daemon catches up on a backlog with the same scanner: it must beat what anyone would
write in five minutes.  The reference is that five-minute loop: read lines, a cheap
``in`` test, one anchored precompiled regex, a counter.  Both run as whole processes
(interpreter start, imports and all) on the same generated log, interleaved, best of
``--runs``: the machine is shared and noisy, so only the ratio of two figures measured
side by side means anything.  Each also runs on a log of a hundred lines, so that the
CPU of the work itself (past each one's start-up) is reported beside the whole's.

    python benchmarks/parse.py [--lines 1000000] [--runs 5]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import genlog, installed

# The reference: anchored right after the TAI64N stamp (so client text elsewhere in a
# line never counts), and the lines that must never ban excluded with the same cheap
# test rblguard's rule uses.  Distinct addresses canonicalised only for ::ffff: (the
# generator writes IPv6 already compressed).
REFERENCE_LOOP = '''\
import json, re, sys
RX = re.compile(rb"@[0-9a-f]{24} rblsmtpd: (\\S+) pid \\d+: (?:451|553) ")
matches = 0
addresses = set()
for line in open(sys.argv[1], "rb"):
    if b"rblsmtpd: " in line:
        m = RX.match(line)
        if m is not None and not (b"Error:" in line or b"/returnc/" in line
                                  or b"temporary RBL lookup error" in line):
            matches += 1
            addresses.add(m.group(1))
canonical = {a[7:] if a.startswith(b"::ffff:") else a for a in addresses}
print(json.dumps({"matches": matches, "addresses": len(canonical)}))
'''


# The minimal loop, as the efficiency issue writes it: text mode, count matches only.
MINIMAL_LOOP = '''\
import json, re, sys
RX = re.compile(r"@[0-9a-f]{24} rblsmtpd: (\\S+) pid \\d+: (?:451|553) ")
matches = 0
for line in open(sys.argv[1]):
    if "rblsmtpd: " in line:
        if RX.match(line):
            matches += 1
print(json.dumps({"matches": matches}))
'''


STARTUP_LINES = 100  # the small log: a process's fixed cost, next to nothing of work


def write_reference(directory: Path, name: str = "reference_loop.py",
                    text: str = REFERENCE_LOOP) -> Path:
    """A reference loop as a script, run with this same interpreter."""
    path = directory / name
    path.write_text(text)
    return path


def reference_command(script: Path, log: Path) -> list[str]:
    return [sys.executable, str(script), str(log)]


def scan_command(log: Path) -> list[str]:
    return [sys.executable, "-m", "rblguard", "scan", "--json", str(log)]


def run_json(command: list[str]) -> tuple[float, dict]:
    """Wall-clock seconds of one whole process, and the JSON object it printed last,
    with its CPU seconds (itself and its workers) under the key ``_cpu_s``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr}")
    return seconds, {**json.loads(proc.stdout.strip().splitlines()[-1]), "_cpu_s": cpu}


def compare_counts(truth: genlog.Truth, ref: dict, scan: dict) -> list[str]:
    """Every disagreement between the generator's truth, the reference and scan."""
    problems = []
    checks = [
        ("reference matches", ref["matches"], truth.rejects),
        ("reference addresses", ref["addresses"], truth.reject_addresses),
        ("scan lines", scan.get("lines"), truth.lines),
        ("scan matches", scan.get("matches"), truth.rejects),
        ("scan addresses", scan.get("addresses"), truth.reject_addresses),
        ("scan dnsbl_errors", scan.get("dnsbl_errors"), truth.dnsbl_errors),
        ("scan parse_errors", scan.get("parse_errors"), 0),
    ]
    if "lookup_errors" in scan:
        checks.append(("scan lookup_errors", scan["lookup_errors"], truth.lookup_errors))
    for name, got, want in checks:
        if got != want:
            problems.append(f"{name}: {got}, truth says {want}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    installed.compile_package()  # as the package's postinst does

    with tempfile.TemporaryDirectory(prefix="rblguard-parse-") as tmp:
        directory = Path(tmp)
        log_dir = directory / "main"
        log_dir.mkdir()
        log = log_dir / "current"  # the multilog file as `multilog t` writes it
        truth = genlog.write_log(log, "tai64n", args.seed, lines=args.lines)
        # A start-up's worth: the same generator's first lines, for each side's fixed
        # cost (interpreter, imports, rule files), so that the CPU of the work past it
        # can be told apart from the whole process's (cpu_ratio_past_startup).
        small_dir = directory / "small"
        small_dir.mkdir()
        small = small_dir / "current"
        genlog.write_log(small, "tai64n", args.seed, lines=STARTUP_LINES)
        script = write_reference(directory)
        minimal = write_reference(directory, "minimal_loop.py", MINIMAL_LOOP)
        log.read_bytes()  # into the page cache before the first timed run

        ref_times: list[float] = []
        scan_times: list[float] = []
        min_times: list[float] = []
        cpu: dict[str, list[float]] = {"ref": [], "scan": [], "minimal": [],
                                       "scan_small": [], "minimal_small": []}
        ref_out = scan_out = min_out = {}
        for _ in range(args.runs):  # interleaved: all see the same noise
            seconds, ref_out = run_json(reference_command(script, log))
            ref_times.append(seconds)
            seconds, min_out = run_json(reference_command(minimal, log))
            min_times.append(seconds)
            seconds, scan_out = run_json(scan_command(log))
            scan_times.append(seconds)
            for name, out in (("ref", ref_out), ("scan", scan_out), ("minimal", min_out)):
                cpu[name].append(out["_cpu_s"])
            cpu["minimal_small"].append(run_json(reference_command(minimal, small))[1]["_cpu_s"])
            cpu["scan_small"].append(run_json(scan_command(small))[1]["_cpu_s"])

    ref_best, scan_best, min_best = min(ref_times), min(scan_times), min(min_times)
    ratio = ref_best / scan_best  # scan's speed over the reference's
    ratio_minimal = min_best / scan_best
    cpu_ratio = min(cpu["scan"]) / min(cpu["minimal"])  # scan's CPU over the loop's
    # the same, less each one's start-up (best of each, as every figure here)
    past_startup = ((min(cpu["scan"]) - min(cpu["scan_small"]))
                    / max(min(cpu["minimal"]) - min(cpu["minimal_small"]), 1e-9))
    problems = compare_counts(truth, ref_out, scan_out)
    # (the minimal loop's count takes error replies and lookup errors for rejects too:
    # it is a speed reference, not a correct one, so its count is only shown)
    print(f"log: {truth.lines} lines, {truth.bytes / 1e6:.1f} MB, tai64n, "
          f"{truth.rejects} rejects from {truth.reject_addresses} addresses")
    print(f"{'':<16}{'best s':>9}{'median s':>10}{'lines/s':>13}{'matches':>9}")
    for name, times, out in (("reference loop", ref_times, ref_out),
                             ("minimal loop", min_times, min_out),
                             ("rblguard scan", scan_times, scan_out)):
        median = sorted(times)[len(times) // 2]
        print(f"{name:<16}{min(times):>9.3f}{median:>10.3f}"
              f"{truth.lines / min(times):>13,.0f}{out.get('matches', '?'):>9}")
    verdict = "meets the 2.0 aim" if ratio_minimal >= 2 else (
        "meets the 1.0 minimum, short of the 2.0 aim" if ratio_minimal >= 1 else
        "FALLS SHORT of the 1.0 minimum")
    print(f"ratio scan/reference: {ratio:.2f}; scan/minimal loop: {ratio_minimal:.2f} "
          f"({verdict}); CPU scan/minimal loop: {cpu_ratio:.2f} ({past_startup:.2f} past "
          f"start-up: {min(cpu['scan_small']):.3f} s against {min(cpu['minimal_small']):.3f} s "
          f"on {STARTUP_LINES} lines)")
    for problem in problems:
        print(f"MISMATCH {problem}")
    print(json.dumps({
        "ref_lines_per_s": round(truth.lines / ref_best),
        "scan_lines_per_s": round(truth.lines / scan_best),
        "ratio": round(ratio, 3),
        "ratio_minimal": round(ratio_minimal, 3),
        "cpu_ratio_minimal": round(cpu_ratio, 3),
        "cpu_ratio_past_startup": round(past_startup, 3),
        "startup_cpu_s": round(min(cpu["scan_small"]), 3),
        "minimal_startup_cpu_s": round(min(cpu["minimal_small"]), 3),
        "minimal_seconds": round(min_best, 3),
        "scan_cpu_s": round(min(cpu["scan"]), 3),
        "minimal_cpu_s": round(min(cpu["minimal"]), 3),
        "lines": truth.lines,
        "matches": scan_out.get("matches"),
        "ref_matches": ref_out.get("matches"),
        "truth_matches": truth.rejects,
        "counts_agree": not problems,
        "runs": args.runs,
        "ref_seconds": round(ref_best, 3),
        "scan_seconds": round(scan_best, 3),
        "prefilter": installed.prefilter_built(),
    }))
    return 0 if not problems and ratio_minimal >= 1.0 and cpu_ratio <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
