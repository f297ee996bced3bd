"""Liveness and last words of a rank, for the launcher that watches it.

Each rank runs a daemon thread that rewrites ``<dir>/rank<R>.json`` every
``interval`` seconds with the time, its pid and the rank's latest status
message ("step 12: generate"). A rank that stops (SIGSTOP, a native deadlock
holding the GIL, a dead machine) stops beating; the launcher ends the job when
a beat is older than ``runtime.heartbeat_timeout_s``, naming the rank and its
last message. A rank that fails writes its error here before it exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from pathlib import Path

# words of a collective backend's error when the other end went away
PEER_WORDS = ("connection", "by peer", "timed out", "gloo", "nccl", "broken pipe")


def is_peer_failure(err: BaseException | None) -> bool:
    """Whether ``err`` is a symptom, a collective that failed because another rank went
    away, rather than this rank's own failure. Judged by type: torch.distributed's own
    errors are symptoms; a plain RuntimeError (what some backend paths raise) is one when
    its text names a lost connection or a timed-out wait; plait's user-fixable errors
    (a reward that timed out, a config mistake) and any other exception never are."""
    if err is None:
        return False
    from plait.errors import known_errors

    if isinstance(err, known_errors()):
        return False
    try:
        from torch.distributed import DistError
    except ImportError:  # torch without distributed support
        DistError = ()  # noqa: N806
    if DistError and isinstance(err, DistError):
        return True
    return type(err) is RuntimeError and any(word in str(err).lower() for word in PEER_WORDS)


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
        self.since = time.time()      # when the message was set
        self.waiting: str | None = None  # the collective this rank is blocked in, if any
        self.longest_step = 0.0          # seconds of this rank's longest step so far
        self.status = "running"
        self.error: str | None = None
        self.peer = False  # whether the error is a symptom of a lost peer
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
        self.since = time.time()
        self._write()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()

    def _write(self) -> None:
        if self.path is None and self.sink is None:
            return
        record = {"rank": self.rank, "pid": os.getpid(), "time": time.time(),
                  "message": self.message, "since": self.since, "waiting": self.waiting,
                  "longest_step_s": self.longest_step,
                  "status": self.status, "error": self.error, "peer": self.peer}
        if self.sink is not None:
            self.sink(record)
            return
        with self._lock:
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.path)

    def finish(self, status: str = "done", error: str | None = None,
               peer: bool = False) -> None:
        """Final beat: ``done`` or ``error`` with its message and whether it is a symptom of
        a lost peer (:func:`is_peer_failure`); the thread stops."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.status, self.error, self.peer = status, error, peer
        self._write()


_current: Heartbeat | None = None


def install(beat: Heartbeat) -> None:
    global _current
    _current = beat


def report(message: str) -> None:
    """Set this process's status message (no-op outside a launched rank)."""
    if _current is not None:
        _current.set(message)


def step_done(seconds: float) -> None:
    """Record a finished step's duration (the progress watch scales its limit by it)."""
    if _current is not None:
        _current.longest_step = max(_current.longest_step, seconds)


@contextlib.contextmanager
def waiting_in(what: str):
    """Mark this rank as blocked in a collective (``what``) while inside: a rank that makes
    no progress outside one is the cause of a stall, the ranks waiting for it are not."""
    if _current is None:
        yield
        return
    _current.waiting = what
    try:
        yield
    finally:
        _current.waiting = None


_STEP = re.compile(r"step (\d+)")


class ProgressWatch:
    """Tells a rank that is alive (it beats) but stuck: its status names a step and has
    not changed for longer than ``max(floor_s, factor x the longest step so far)``, the
    longest step being the largest any rank has reported. Until a step has finished, and
    outside steps (evaluation, warm start, saving), nothing is judged: a slow rank is
    then left to the collective timeout."""

    def __init__(self, floor_s: float, factor: float = 10.0):
        self.floor_s, self.factor = floor_s, factor
        self.longest_step = 0.0

    def limit(self) -> float | None:
        if self.longest_step <= 0:
            return None
        return max(self.floor_s, self.factor * self.longest_step)

    def observe(self, beat: dict) -> None:
        self.longest_step = max(self.longest_step, float(beat.get("longest_step_s") or 0.0))

    def stuck(self, beats: dict[int, dict], now: float) -> tuple[int, str] | None:
        """``(rank, reason)`` for the stuck rank to blame, or None. Ranks blocked in a
        collective are waiting for another: one that is not is preferred."""
        for beat in beats.values():
            self.observe(beat)
        limit = self.limit()
        if limit is None:
            return None
        late = [(now - beat.get("since", beat["time"]), rank) for rank, beat in beats.items()
                if beat.get("status") == "running" and _STEP.match(beat.get("message") or "")
                and now - beat.get("since", beat["time"]) > limit]
        if not late:
            return None
        free = [item for item in late if not beats[item[1]].get("waiting")]
        stalled, rank = max(free or late)
        where = beats[rank].get("waiting")
        return rank, (f"made no progress for {stalled:.0f} s"
                      + (f" (blocked in {where})" if where else "")
                      + f"; steps so far took at most {self.longest_step:.1f} s "
                      f"(limit: the larger of runtime.progress_timeout_s={self.floor_s:g} "
                      f"and {self.factor:g}x the longest step)")
