"""Change-to-callback latency of the source watcher, across multilog-style rotations.

Run:  python benchmarks/watch_latency.py [--rotations 200] [--writes 5]

A multilog directory is rotated the way multilog does it (``current`` renamed to
``previous``, a new ``current`` created, ``previous`` linked to its ``@<tai64n>.s``
label and unlinked), then a few lines are appended to the new ``current``.  The latency
of a write is the time from just before it to the first callback that began after it:
what the daemon waits before it reads the line.  The latency of a rotation is the time
from its first rename to its first callback.

Why: watchdog's inotify buffer holds an IN_MOVED_FROM whose IN_MOVED_TO is not in the
same read for 0.5 s, and every event behind it waits too; this measures whether that
happens to multilog's renames in practice.

Watchers, each in the same run over the same sequence of changes:

- ``rblguard``: ``rblguard.sources.watch.SourceWatcher``, as the daemon uses it;
- ``observer``: watchdog's public ``Observer`` with a handler that calls back on every
  event of the directory (the plain use of the library);
- ``inotify``: the floor, one thread reading a raw inotify descriptor (ctypes).

Last line: JSON with p50_ms, p95_ms, max_ms per watcher and kind (write,
rotation, moved-away).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import select
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import watchdog.version

from rblguard.sources.watch import SourceWatcher

Callback = Callable[[str], None]


class RawInotify:
    """The floor: one inotify descriptor on the directory, one callback per read."""

    def __init__(self, paths: list[str], on_change: Callback) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        for path in paths:
            libc.inotify_add_watch(self._fd, os.fsencode(path), 0x2 | 0x40 | 0x80 | 0x100)
        self._paths, self._on_change = paths, on_change
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        for fd in (self._fd, self._stop_r, self._stop_w):
            os.close(fd)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while all(fd != self._stop_r for fd, _ in poller.poll()):
            try:
                os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            for path in self._paths:
                self._on_change(path)


class PlainObserver:
    """watchdog's Observer, one callback per event: the library used as documented."""

    def __init__(self, paths: list[str], on_change: Callback) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: object) -> None:
                on_change(paths[0])

        self._observer = Observer()
        for path in paths:
            self._observer.schedule(Handler(), path, recursive=False)

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join()


WATCHERS: dict[str, Callable[[list[str], Callback], object]] = {
    "rblguard": SourceWatcher, "observer": PlainObserver, "inotify": RawInotify}


class Calls:
    """Callback times, and a wait for the first one after a given moment."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cond = threading.Condition()

    def __call__(self, _source: str) -> None:
        with self.cond:
            self.times.append(time.perf_counter())
            self.cond.notify_all()

    def first_after(self, start: float, timeout: float = 5.0) -> float:
        with self.cond:
            assert self.cond.wait_for(lambda: self.times and self.times[-1] > start, timeout), \
                "no callback within 5 s"
            return next(t for t in self.times if t > start) - start


def rotate(directory: Path, label: int, current: int) -> int:
    """multilog's rotation: the full ``current`` becomes ``previous``, then its label."""
    os.rename(directory / "current", directory / "previous")
    fd = os.open(directory / "current", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.close(current)
    os.link(directory / "previous", directory / f"@{label:024x}.s")
    os.unlink(directory / "previous")
    return fd


def moved_away(kind: str, rotations: int) -> list[float]:
    """Latencies (ms) of the first write to a plain file after the old one was moved
    to another directory (no IN_MOVED_TO in the watched one)."""
    with tempfile.TemporaryDirectory() as tmp:
        directory, away = Path(tmp) / "log", Path(tmp) / "old"
        directory.mkdir()
        away.mkdir()
        path = directory / "maillog"
        path.write_bytes(b"")
        calls = Calls()
        watcher = WATCHERS[kind]([str(path) if kind == "rblguard" else str(directory)], calls)
        watcher.start()  # type: ignore[attr-defined]
        found = []
        try:
            for n in range(rotations):
                os.rename(path, away / f"maillog.{n}")
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                start = time.perf_counter()
                os.write(fd, b"Jan 13 00:00:00 line\n")
                os.close(fd)
                found.append(calls.first_after(start) * 1000)
        finally:
            watcher.stop()  # type: ignore[attr-defined]
    return found


def measure(kind: str, rotations: int, writes: int) -> dict[str, list[float]]:
    """Latencies (ms) of writes right after each rotation, and of the rotations."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "log"
        directory.mkdir()
        fd = os.open(directory / "current", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        calls = Calls()
        watcher = WATCHERS[kind]([str(directory)], calls)
        watcher.start()  # type: ignore[attr-defined]
        found: dict[str, list[float]] = {"write": [], "rotation": []}
        try:
            for n in range(rotations):
                start = time.perf_counter()
                fd = rotate(directory, 0x4000000000000000_00000000 + n, fd)
                found["rotation"].append(calls.first_after(start) * 1000)
                for _ in range(writes):
                    start = time.perf_counter()
                    os.write(fd, b"@4000000065a1d2c3 line\n")
                    found["write"].append(calls.first_after(start) * 1000)
                for old in directory.glob("@*"):
                    old.unlink()
        finally:
            watcher.stop()  # type: ignore[attr-defined]
            os.close(fd)
    return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rotations", type=int, default=200)
    parser.add_argument("--writes", type=int, default=5, help="lines after each rotation")
    parser.add_argument("--watchers", default=",".join(WATCHERS))
    args = parser.parse_args()
    summary: dict[str, object] = {"watchdog": watchdog.version.VERSION_STRING,
                                  "rotations": args.rotations, "writes": args.writes}
    print(f"watchdog {watchdog.version.VERSION_STRING}; {args.rotations} rotations, "
          f"{args.writes} writes after each")
    print("| watcher | kind | p50 ms | p95 ms | max ms | over 100 ms |")
    print("|---|---|---:|---:|---:|---:|")
    for kind in args.watchers.split(","):
        found = measure(kind, args.rotations, args.writes)
        found["moved-away"] = moved_away(kind, max(1, args.rotations // 10))
        for what, values in found.items():
            figures = {"p50_ms": round(percentile(values, 0.5), 3),
                       "p95_ms": round(percentile(values, 0.95), 3),
                       "max_ms": round(max(values), 3),
                       "over_100ms": sum(v > 100 for v in values)}
            summary[f"{kind}_{what}"] = figures
            print(f"| {kind} | {what} | {figures['p50_ms']:.3f} | {figures['p95_ms']:.3f} | "
                  f"{figures['max_ms']:.3f} | {figures['over_100ms']} |")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
