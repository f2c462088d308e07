"""Scan memory: peak resident memory of ``rblguard scan --json`` on a ~1 GB log.

Months of logs must scan on a small mail server without swapping: scan reads in chunks
and keeps only counts, so its peak must not grow with the log (target: under 150 MB).
The reference loop of benchmarks/parse.py, which holds one line at a time, shows what
the interpreter alone costs.  The log is streamed to disk (never held in memory here)
and removed afterwards, also on error.  Peak memory is the child's ``ru_maxrss`` from
``os.wait4``; this process stays small, as a child's figure starts at its parent's size.

    python benchmarks/scan_memory.py [--bytes 1000000000] [--tmpdir DIR]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import genlog
from benchmarks.parse import compare_counts, reference_command, scan_command, write_reference

TARGET_MB = 150


def tree_pss_kb(pid: int) -> int:
    """Proportional resident KiB of ``pid`` and all its descendants (scan forks workers
    for large files): each page shared copy-on-write counts once in all, split among
    the processes sharing it, so the sum is the memory the whole scan really holds."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def run_measured(command: list[str]) -> tuple[float, float, float, dict]:
    """Wall seconds, peak memory of the whole process tree (PSS, sampled every 20 ms) and
    of its largest process (ru_maxrss from wait4), in MB, and the JSON object the
    process printed last.  The first is never taken below the second."""
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL)
        peak_tree = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_tree = max(peak_tree, tree_pss_kb(proc.pid))
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}")
        out.seek(0)
        last = out.read().decode().strip().splitlines()[-1]
    largest = usage.ru_maxrss / 1024  # KiB; wait4 gives the process's own, not its children's
    return seconds, max(peak_tree / 1024, largest), largest, json.loads(last)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=int, default=1_000_000_000, dest="size",
                        help="log size to generate (default 1e9)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tmpdir", help="where the log is written (default: system temp)")
    args = parser.parse_args(argv)

    directory = Path(tempfile.mkdtemp(prefix="rblguard-memory-", dir=args.tmpdir))
    try:
        log = directory / "current"
        started = time.perf_counter()
        # In a child process: Linux starts a child's ru_maxrss at its parent's resident
        # size at fork, so this process must stay small for the figures to be the
        # children's own.
        truth_file = directory / "truth.json"
        subprocess.run([sys.executable, genlog.__file__, "--bytes", str(args.size),
                        "--format", "tai64n", "--seed", str(args.seed),
                        "--truth", str(truth_file), str(log)], check=True)
        truth = genlog.Truth(**json.loads(truth_file.read_text()))
        generated = time.perf_counter() - started
        script = write_reference(directory)
        ref_seconds, ref_mb, _, ref_out = run_measured(reference_command(script, log))
        scan_seconds, scan_mb, scan_largest_mb, scan_out = run_measured(scan_command(log))
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    problems = compare_counts(truth, ref_out, scan_out)
    print(f"log: {truth.bytes / 1e9:.2f} GB, {truth.lines} lines, generated in "
          f"{generated:.1f} s")
    print(f"{'':<16}{'peak RSS MB':>12}{'seconds':>9}  (scan: all its processes together)")
    print(f"{'reference loop':<16}{ref_mb:>12.1f}{ref_seconds:>9.2f}")
    print(f"{'rblguard scan':<16}{scan_mb:>12.1f}{scan_seconds:>9.2f}")
    verdict = "meets" if scan_mb < TARGET_MB else "FALLS SHORT of"
    print(f"scan peak {scan_mb:.1f} MB {verdict} the {TARGET_MB} MB target")
    for problem in problems:
        print(f"MISMATCH {problem}")
    print(json.dumps({
        "log_bytes": truth.bytes,
        "lines": truth.lines,
        "scan_peak_rss_mb": round(scan_mb, 1),  # all of scan's processes together
        "scan_largest_process_rss_mb": round(scan_largest_mb, 1),
        "ref_peak_rss_mb": round(ref_mb, 1),
        "scan_seconds": round(scan_seconds, 2),
        "ref_seconds": round(ref_seconds, 2),
        "counts_agree": not problems,
        "target_mb": TARGET_MB,
    }))
    return 0 if scan_mb < TARGET_MB and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
