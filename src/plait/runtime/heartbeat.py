"""Liveness and last words of a rank, for the launcher that watches it.

Each rank runs a daemon thread that rewrites ``<dir>/rank<R>.json`` every
``interval`` seconds with the time, its pid and the rank's latest status
message ("step 12: generate"). A rank that stops (SIGSTOP, a native deadlock
holding the GIL, a dead machine) stops beating; the launcher ends the job when
a beat is older than ``runtime.heartbeat_timeout_s``, naming the rank and its
last message. A rank that fails writes its error here before it exits.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path


def heartbeat_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank{rank}.json"


def read_heartbeat(directory: str | Path, rank: int) -> dict | None:
    """The rank's latest beat, or None before its first one."""
    try:
        return json.loads(heartbeat_path(directory, rank).read_text())
    except (OSError, ValueError):
        return None


class Heartbeat:
    """Writes this rank's beat in a background thread: to ``<directory>/rank<R>.json``,
    or to ``sink(record)`` (e.g. a Ray actor on another machine); a no-op with neither."""

    def __init__(self, directory: str | Path | None, rank: int, interval: float = 1.0,
                 sink=None):
        self.path = heartbeat_path(directory, rank) if directory else None
        self.sink = sink
        self.rank = rank
        self.interval = interval
        self.message = "starting"
        self.status = "running"
        self.error: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        if self.path is not None or sink is not None:
            self._write()
            self._thread = threading.Thread(target=self._run, name="plait-heartbeat",
                                            daemon=True)
            self._thread.start()

    def set(self, message: str) -> None:
        """New status message, written at once (a rank killed right after still leaves it)."""
        self.message = message
        self._write()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()

    def _write(self) -> None:
        if self.path is None and self.sink is None:
            return
        record = {"rank": self.rank, "pid": os.getpid(), "time": time.time(),
                  "message": self.message, "status": self.status, "error": self.error}
        if self.sink is not None:
            self.sink(record)
            return
        with self._lock:
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.path)

    def finish(self, status: str = "done", error: str | None = None) -> None:
        """Final beat: ``done`` or ``error`` with its message; the thread stops."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.status, self.error = status, error
        self._write()


_current: Heartbeat | None = None


def install(beat: Heartbeat) -> None:
    global _current
    _current = beat


def report(message: str) -> None:
    """Set this process's status message (no-op outside a launched rank)."""
    if _current is not None:
        _current.set(message)
