"""Run reward functions with a time limit: in a worker subprocess, or in a thread.

Python threads cannot be killed, so user reward functions run in one
persistent worker process per :class:`~plait.rewards.manager.RewardManager`.
The parent sends one request per batch (all isolated functions at once) and
the worker streams back one reply per function; the parent waits at most
``timeout_s`` for each reply and, on a timeout or a crash, kills the worker.
A fresh worker is started on the next request.

Functions given by spec are imported by the worker, never by the parent, so
that module-level code that blocks can be stopped: each import gets
``import_timeout_s`` (the worker is killed past it, with a
:class:`~plait.rewards.loading.RewardLoadError` naming the module), and one
still running after a couple of seconds is announced on stderr. A replacement
worker imports them again. :meth:`RewardWorker.abort` ends the worker from any
thread at once, so that a job that stops never waits out a hung call.

Start method: ``fork`` on Linux, so the worker inherits callables passed
directly (closures included); ``spawn`` elsewhere, where callables passed
directly must be picklable. The worker shares the parent's stdout/stderr,
ignores SIGINT (the parent handles Ctrl-C and then ends the worker), and exits
by itself if the parent process dies.

:func:`call_in_process` is the in-process alternative: a timeout can only be
detected there, not enforced; the hung call keeps running in an abandoned
daemon thread.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from plait.rewards.loading import (
    RewardLoadError,
    RewardSpec,
    check_reward_signature,
    import_label,
    load_user_function,
    required_fields,
    wait_for_import,
)

__all__ = [
    "CallFailure",
    "CallOutcome",
    "LoadResult",
    "RewardWorker",
    "WorkerStopped",
    "call_in_process",
    "default_start_method",
]

_ORPHAN_CHECK_INTERVAL_S = 1.0
_SHUTDOWN_GRACE_S = 1.0
# Start-up (imports, under spawn) does not count against a reward's time limit.
_STARTUP_TIMEOUT_S = 120.0
_STARTED = "started"
_STOP_POLL_S = 0.1


class WorkerStopped(RuntimeError):
    """The worker was aborted (the job is stopping): no call runs any more."""


@dataclass
class LoadResult:
    """What the worker found when it imported one function given by spec.

    Attributes:
        error: why it cannot be used (a :class:`RewardLoadError` message), or None.
        required_fields: its required parameters besides prompts and completions.
    """

    error: str | None
    required_fields: frozenset[str] = frozenset()


@dataclass
class CallFailure:
    """Why one call of a reward function produced no result.

    Attributes:
        kind: ``"exception"``, ``"timeout"`` or ``"crash"`` (the worker died).
        detail: ``"ValueError: bad input"``, ``"exceeded time limit of 1s"``...
        traceback: formatted traceback of the exception, when there is one.
        exception: the exception object itself (in-process calls only).
    """

    kind: Literal["exception", "timeout", "crash"]
    detail: str
    traceback: str | None = None
    exception: BaseException | None = None


@dataclass
class CallOutcome:
    """The raw return value of one call, or its :class:`CallFailure`."""

    value: Any = None
    failure: CallFailure | None = None


# A function for the worker: the callable itself (fork, or picklable) or a spec to import.
WorkerFunction = Callable[..., Any] | RewardSpec


def _invoke(
    function: Callable[..., Any], prompts: list[str], completions: list[str], fields: dict
) -> CallOutcome:
    try:
        value = function(prompts=prompts, completions=completions, **fields)
    except (Exception, SystemExit) as exc:  # SystemExit: a reward calling sys.exit()
        detail = f"{type(exc).__name__}: {exc}"
        return CallOutcome(failure=CallFailure("exception", detail, traceback.format_exc(), exc))
    return CallOutcome(value=value)


def call_in_process(
    function: Callable[..., Any],
    prompts: list[str],
    completions: list[str],
    fields: dict[str, list],
    timeout_s: float | None,
    stop: threading.Event | None = None,
) -> CallOutcome:
    """Call ``function`` in this process.

    With a ``timeout_s`` the call runs in a daemon thread; if it is late, or
    ``stop`` is set while it runs, the thread is abandoned (it cannot be
    stopped) and a timeout or crash failure returned.
    """
    if timeout_s is None:
        return _invoke(function, prompts, completions, fields)
    box: list[CallOutcome] = []
    thread = threading.Thread(
        target=lambda: box.append(_invoke(function, prompts, completions, fields)),
        name="plait-reward-call",
        daemon=True,
    )
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            return CallOutcome(failure=CallFailure("crash", "scoring was stopped"))
        thread.join(min(_STOP_POLL_S, max(0.0, deadline - time.monotonic())))
    if thread.is_alive():
        detail = f"exceeded time limit of {timeout_s:g}s (the call was abandoned, still running)"
        return CallOutcome(failure=CallFailure("timeout", detail))
    return box[0]


# ----------------------------------------------------------------------------- worker side


def _worker_main(connection: Any, functions: list[WorkerFunction], parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The worker is started as a daemon so that multiprocessing ends it at exit, but a
    # reward may start its own multiprocessing pool, which daemons may not: lift the flag.
    try:
        multiprocessing.current_process().daemon = False
    except AssertionError:
        pass
    _start_orphan_watchdog(parent_pid)
    connection.send(_STARTED)
    resolved = _load_functions(connection, functions)
    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        indices, prompts, completions, fields = request
        for index in indices:
            outcome = _run_in_worker(resolved, index, prompts, completions, fields)
            _send_outcome(connection, index, outcome)


def _load_functions(connection: Any, functions: list[WorkerFunction]) -> dict[int, Any]:
    """Import the functions given by spec, in order, and send a :class:`LoadResult` for each;
    the parent times each import. Returns index -> callable, or the error message."""
    resolved: dict[int, Any] = {}
    for index, entry in enumerate(functions):
        if not isinstance(entry, RewardSpec):
            resolved[index] = entry
            continue
        try:
            function = load_user_function(entry)
            check_reward_signature(entry.name, function)
            result = LoadResult(None, required_fields(function))
            resolved[index] = function
        except Exception as exc:
            message = str(exc) if isinstance(exc, RewardLoadError) else \
                f"reward spec '{entry}': {type(exc).__name__}: {exc}"
            result = resolved[index] = LoadResult(message)
        sys.stdout.flush()
        sys.stderr.flush()
        connection.send(result)
    return resolved


def _start_orphan_watchdog(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            time.sleep(_ORPHAN_CHECK_INTERVAL_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="plait-reward-watchdog", daemon=True).start()


def _run_in_worker(
    resolved: dict[int, Any],
    index: int,
    prompts: list[str],
    completions: list[str],
    fields: dict,
) -> CallOutcome:
    if isinstance(resolved[index], LoadResult):
        detail = f"could not load in the worker: {resolved[index].error}"
        return CallOutcome(failure=CallFailure("exception", detail))
    outcome = _invoke(resolved[index], prompts, completions, fields)
    if outcome.failure is not None:
        outcome.failure.exception = None  # the traceback text travels; the object may not pickle
    sys.stdout.flush()
    sys.stderr.flush()
    if hasattr(outcome.value, "tolist"):  # numpy arrays and tensors travel as lists
        outcome.value = outcome.value.tolist()
    return outcome


def _send_outcome(connection: Any, index: int, outcome: CallOutcome) -> None:
    try:
        connection.send((index, outcome))
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        detail = (
            f"returned a {type(outcome.value).__name__} that cannot be sent back from the "
            f"worker ({exc}); return a list of floats"
        )
        connection.send((index, CallOutcome(failure=CallFailure("exception", detail))))


# ----------------------------------------------------------------------------- parent side


def default_start_method() -> str:
    """``"fork"`` on Linux (the worker inherits loaded functions), ``"spawn"`` elsewhere."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def _shutdown(handle: dict[str, Any]) -> None:
    """End the worker in ``handle`` (used by close and by the GC/atexit finalizer)."""
    if os.getpid() != handle["owner_pid"]:
        return  # a forked copy of the manager (inside another worker) must not touch it
    process, connection = handle.get("process"), handle.get("connection")
    handle["process"] = handle["connection"] = None
    if process is None:
        return
    if connection is not None:
        try:
            connection.send(None)
        except (OSError, ValueError):
            pass
        connection.close()
    process.join(_SHUTDOWN_GRACE_S)
    if process.is_alive():
        process.kill()
        process.join()


def _kill(handle: dict[str, Any]) -> None:
    if os.getpid() != handle["owner_pid"]:
        return
    process, connection = handle.get("process"), handle.get("connection")
    handle["process"] = handle["connection"] = None
    if process is not None:
        process.kill()
        process.join()
    if connection is not None:
        connection.close()


class RewardWorker:
    """A persistent subprocess that calls reward functions by index.

    Args:
        functions: the functions it can run; request ``i`` calls
            ``functions[i]``. Callables are inherited (fork) or pickled
            (spawn); :class:`RewardSpec` entries are imported in the worker.
        start_method: multiprocessing start method; default ``"fork"`` on
            Linux and ``"spawn"`` elsewhere.
        import_timeout_s: time limit for importing each spec (None: none).
    """

    def __init__(
        self,
        functions: Sequence[WorkerFunction],
        *,
        start_method: str | None = None,
        import_timeout_s: float | None = None,
    ):
        start_method = start_method or default_start_method()
        self._context = multiprocessing.get_context(start_method)
        self.start_method = start_method
        self.import_timeout_s = import_timeout_s
        self._functions = list(functions)
        self._handle: dict[str, Any] = {
            "process": None,
            "connection": None,
            "owner_pid": os.getpid(),
            "ready": False,
            "stopped": False,
        }
        self._state_lock = threading.Lock()  # start() against abort() from another thread
        self.load_results: dict[int, LoadResult] = {}
        self._finalizer = weakref.finalize(self, _shutdown, self._handle)

    @property
    def pid(self) -> int | None:
        """Process id of the live worker, or None when none is running."""
        process = self._handle["process"]
        return process.pid if process is not None else None

    def start(self) -> None:
        """Start the worker now if it is not running (otherwise it starts on first use).

        Raises:
            WorkerStopped: :meth:`abort` was called.
        """
        with self._state_lock:
            if self._handle["stopped"]:
                raise WorkerStopped("the reward worker was stopped: the job is ending")
            if self._handle["process"] is not None:
                return
            parent_end, child_end = self._context.Pipe(duplex=True)
            process = self._context.Process(
                target=_worker_main,
                args=(child_end, self._functions, os.getpid()),
                name="plait-reward-worker",
                daemon=True,
            )
            process.start()
            child_end.close()
            self._handle.update(process=process, connection=parent_end, ready=False)

    def load(self) -> dict[int, LoadResult]:
        """Start the worker and wait until it has imported every spec (each within
        ``import_timeout_s``); return a :class:`LoadResult` per spec's index.

        Raises:
            RewardLoadError: an import took too long, or the worker died during one.
        """
        self.start()
        self._wait_until_ready()
        return self.load_results

    def _wait_until_ready(self) -> None:
        connection, process = self._handle["connection"], self._handle["process"]
        if self._handle["ready"]:
            return
        if not connection.poll(_STARTUP_TIMEOUT_S):
            _kill(self._handle)
            raise RuntimeError(f"the reward worker did not start within {_STARTUP_TIMEOUT_S:g}s")
        message = self._receive_while_starting(connection, process, "starting", RuntimeError)
        if message != _STARTED:
            _kill(self._handle)
            raise RuntimeError(f"the reward worker sent {message!r} instead of {_STARTED!r}")
        for index, entry in enumerate(self._functions):
            if isinstance(entry, RewardSpec):
                try:
                    wait_for_import(entry, self.import_timeout_s, connection.poll)
                except RewardLoadError:
                    _kill(self._handle)
                    raise
                doing = f"importing {import_label(entry)} (reward spec '{entry}')"
                self.load_results[index] = self._receive_while_starting(
                    connection, process, doing, RewardLoadError
                )
        self._handle["ready"] = True

    def _receive_while_starting(
        self, connection: Any, process: Any, doing: str, error: type[Exception]
    ) -> Any:
        try:
            return connection.recv()
        except (EOFError, OSError):
            _kill(self._handle)
            raise error(
                f"the reward worker exited while {doing} (exit code {process.exitcode}); "
                f"see its output above"
            ) from None

    def close(self) -> None:
        """Stop the worker; a later call starts a new one (unless it was aborted)."""
        _shutdown(self._handle)

    def abort(self) -> None:
        """Kill the worker at once and start no other; callable from any thread.

        A call waiting on the worker in another thread sees it die and returns
        at once (a crash outcome) instead of waiting out its time limit.
        """
        with self._state_lock:
            self._handle["stopped"] = True
            process = self._handle["process"]
        if process is not None and os.getpid() == self._handle["owner_pid"]:
            process.kill()  # the thread using it (or close) reaps it and closes the pipe

    def run(
        self,
        indices: Sequence[int],
        prompts: list[str],
        completions: list[str],
        fields: dict[str, list],
        timeout_s: float | None,
    ) -> dict[int, CallOutcome]:
        """Call ``functions[i](prompts, completions, **fields)`` for each ``i`` in ``indices``.

        Each function gets ``timeout_s`` seconds from the moment the previous
        one answered. A late or crashed function gets a failure outcome and
        the worker is killed; the remaining functions run in a fresh worker.
        """
        outcomes: dict[int, CallOutcome] = {}
        pending = list(indices)
        while pending:
            connection = self._send((pending, prompts, completions, fields))
            for index in list(pending):
                outcomes[index] = self._receive(connection, index, timeout_s)
                pending.remove(index)
                if outcomes[index].failure and outcomes[index].failure.kind != "exception":
                    break
        return outcomes

    def _send(self, request: tuple) -> Any:
        try:
            return self._send_once(request)
        except (BrokenPipeError, ConnectionResetError):
            _kill(self._handle)  # the worker died while idle (killed from outside): restart
        try:
            return self._send_once(request)
        except (BrokenPipeError, ConnectionResetError) as exc:
            _kill(self._handle)
            raise RuntimeError("the reward worker process died as soon as it started") from exc

    def _send_once(self, request: tuple) -> Any:
        self.start()
        self._wait_until_ready()
        connection = self._handle["connection"]
        try:
            connection.send(request)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise TypeError(
                f"cannot send the batch to the reward worker ({exc}); prompts, completions "
                f"and extra fields must be picklable"
            ) from exc
        return connection

    def _receive(self, connection: Any, index: int, timeout_s: float | None) -> CallOutcome:
        if not connection.poll(timeout_s):
            _kill(self._handle)
            return CallOutcome(
                failure=CallFailure("timeout", f"exceeded time limit of {timeout_s:g}s")
            )
        try:
            answered_index, outcome = connection.recv()
        except (EOFError, OSError):
            process = self._handle["process"]
            _kill(self._handle)
            code = process.exitcode if process is not None else None
            detail = f"the reward worker process died (exit code {code})"
            return CallOutcome(failure=CallFailure("crash", detail))
        if answered_index != index:
            _kill(self._handle)
            raise RuntimeError(
                f"reward worker answered for function {answered_index}, expected {index}"
            )
        return outcome
