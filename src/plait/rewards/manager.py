"""Weighted combination of reward functions, with time limits and failure handling.

:class:`RewardManager` turns a batch of completions into one reward per
completion: ``total = sum_k weight_k * reward_k``. Each reward function is
called once per batch; only when that call fails does the manager re-run the
function sample by sample to name the culprit, so the common case costs one
call (one pipe round trip for all isolated functions together).

Where each function runs (``isolate``):

* ``None`` (default): functions given by spec (``"module:function"``,
  ``"file.py:function"``) run in a worker subprocess that is killed on a
  timeout; built-ins and callables passed directly run in-process.
* ``True``: every non-built-in function runs in the worker (callables passed
  directly must be picklable unless the start method is ``fork``).
* ``False``: everything runs in-process. A timeout is then only *detected*:
  the late call is abandoned in a daemon thread that keeps running (and
  holding whatever it holds) until it returns by itself.

Built-ins are trusted: they run in-process without a time limit. Functions
given by spec are imported by the worker, not by this process, each within
``import_timeout_s`` (see :mod:`plait.rewards.worker`).

Cost of failures: localising re-runs the failed function once per sample, to
name the failing samples. A timeout under ``on_error="raise"`` is not
localised: it raises at once, one ``timeout_s`` after the call began. Under
``"fallback"`` a function that hangs on k samples of a batch costs about
(k + 1) * ``timeout_s``, and one that times out on ``max_consecutive_timeouts``
calls in a row (none answering in time in between; a batch call that times out
and is then re-run sample by sample is counted by its sample calls only) is
taken to be stuck: a :class:`RewardError` stops the job instead of letting
every remaining call wait out its limit. A worker killed on a timeout is
replaced on the next call (a fork: milliseconds plus the imports; a spawn: an
interpreter start).

:meth:`RewardManager.abort` (from any thread) kills the worker at once and
fails the call in flight, so that a job that stops on an error or Ctrl-C never
waits for a hung reward function.
"""

from __future__ import annotations

import logging
import math
import numbers
import pickle
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from plait.data.tasks import Task
from plait.errors import PlaitError
from plait.rewards.loading import (
    RewardLoadError,
    RewardSpec,
    check_reward_signature,
    load_reward_fn,
    load_user_function_within,
    parse_reward_spec,
    required_fields,
)
from plait.rewards.worker import (
    CallFailure,
    CallOutcome,
    RewardWorker,
    WorkerStopped,
    call_in_process,
    default_start_method,
)

__all__ = ["RewardError", "RewardManager", "RewardResult"]

logger = logging.getLogger(__name__)

_EXCERPT_CHARS = 80
_RESERVED_FIELDS = ("prompts", "completions")

RewardItem = str | Callable[..., Any] | tuple[str | Callable[..., Any], float]


class RewardError(PlaitError, RuntimeError):
    """A reward function failed, hung, or returned something other than B finite numbers.

    Attributes:
        function_name: the reward function's name.
        sample_index: index within the batch of the failing sample, or None
            when the failure concerns the whole batch.
        detail: what went wrong (``"ZeroDivisionError: division by zero"``).
    """

    def __init__(self, message: str, *, function_name: str, sample_index: int | None, detail: str):
        super().__init__(message)
        self.function_name = function_name
        self.sample_index = sample_index
        self.detail = detail


class _RemoteTraceback(Exception):
    """Carries the worker's formatted traceback as the ``__cause__`` of a RewardError."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0]).rstrip()


@dataclass
class RewardResult:
    """Rewards for one batch of B completions.

    Attributes:
        total: ``[B]`` float32, ``sum_k weight_k * per_function[k]``.
        per_function: name -> ``[B]`` float32, unweighted values.
        num_failures: samples that got ``fallback_reward`` (summed over functions).
        seconds: wall-clock time of the whole ``score`` call.
    """

    total: torch.Tensor
    per_function: dict[str, torch.Tensor]
    num_failures: int
    seconds: float


@dataclass
class _Entry:
    name: str
    weight: float
    function: Callable[..., Any] | None  # None: a spec only the worker imports
    spec: RewardSpec | None
    isolated: bool
    required_fields: frozenset[str]

    @property
    def trusted(self) -> bool:
        return self.spec is not None and self.spec.kind == "builtin"


class RewardManager:
    """Score completions with a weighted sum of reward functions.

    Args:
        reward_specs: ``(spec_or_callable, weight)`` pairs; a bare spec or
            callable means weight 1.0. A weight of 0 computes and reports a
            function without adding it to ``total``.
        task: the active task, used by the built-in ``"task"`` reward.
        timeout_s: time limit for one call of one function (on the whole
            batch, or on one sample while localising a failure); None for
            no limit.
        on_error: ``"raise"`` a :class:`RewardError`, or ``"fallback"``: the
            failing samples get ``fallback_reward`` for that function and are
            counted in ``RewardResult.num_failures`` (a warning is logged the
            first time each function fails).
        fallback_reward: reward for a failed sample under ``"fallback"``.
        isolate: where functions run; see the module docstring.
        start_method: multiprocessing start method of the worker (default
            ``fork`` on Linux, ``spawn`` elsewhere).
        import_timeout_s: time limit for importing each user module given by
            spec; None: ``timeout_s``.
        max_consecutive_timeouts: under ``"fallback"``, stop with a
            :class:`RewardError` once one function has timed out on this many
            calls in a row; None: never.

    Use as a context manager, or call :meth:`close`, to end the worker; it is
    also ended when the manager is garbage-collected and at interpreter exit.
    ``score`` is thread-safe; concurrent calls run one at a time.
    """

    def __init__(
        self,
        reward_specs: Sequence[RewardItem],
        *,
        task: Task | None = None,
        timeout_s: float | None = 30.0,
        on_error: Literal["raise", "fallback"] = "raise",
        fallback_reward: float = 0.0,
        isolate: bool | None = None,
        start_method: str | None = None,
        import_timeout_s: float | None = None,
        max_consecutive_timeouts: int | None = 3,
    ):
        _check_options(reward_specs, timeout_s, on_error, fallback_reward, isolate)
        _check_limits(import_timeout_s, max_consecutive_timeouts)
        self.timeout_s = timeout_s
        self.on_error = on_error
        self.fallback_reward = float(fallback_reward)
        self.import_timeout_s = timeout_s if import_timeout_s is None else import_timeout_s
        self.max_consecutive_timeouts = max_consecutive_timeouts
        self._entries = _build_entries(reward_specs, task, isolate, self.import_timeout_s)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._warned: set[str] = set()
        self._timeouts_in_a_row: dict[str, int] = {}
        self._worker: RewardWorker | None = None
        self._worker_slots: dict[str, int] = {}
        isolated = [entry for entry in self._entries if entry.isolated]
        if isolated:
            method = start_method or default_start_method()
            functions = [_worker_function(entry, method) for entry in isolated]
            self._worker = RewardWorker(
                functions, start_method=method, import_timeout_s=self.import_timeout_s
            )
            self._worker_slots = {entry.name: slot for slot, entry in enumerate(isolated)}
            self._load_in_worker(isolated)

    def _load_in_worker(self, isolated: list[_Entry]) -> None:
        """Have the worker import the specs; take their required fields, or fail."""
        assert self._worker is not None
        try:
            results = self._worker.load()
            for slot, entry in enumerate(isolated):
                if slot in results:
                    if results[slot].error is not None:
                        raise RewardLoadError(results[slot].error)
                    entry.required_fields = results[slot].required_fields
        except BaseException:
            self._worker.close()
            raise

    # ------------------------------------------------------------------ public API

    @property
    def names(self) -> list[str]:
        """Names of the reward functions, in order (keys of ``per_function``)."""
        return [entry.name for entry in self._entries]

    @property
    def weights(self) -> dict[str, float]:
        """Weight of each reward function by name."""
        return {entry.name: entry.weight for entry in self._entries}

    @property
    def worker_pid(self) -> int | None:
        """Process id of the live worker subprocess, or None when none is running."""
        return self._worker.pid if self._worker is not None else None

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        fields: Mapping[str, Sequence[Any]] | None = None,
    ) -> RewardResult:
        """Score a batch: ``fields`` holds the extra dataset columns, one list per column.

        Raises:
            RewardError: a function failed (under ``on_error="raise"``), returned
                a malformed result (always), timed out ``max_consecutive_timeouts``
                times in a row (under ``"fallback"``), or :meth:`abort` was called.
        """
        started = time.perf_counter()
        prompts, completions, batch_fields = _check_batch(prompts, completions, fields)
        with self._lock:
            try:
                per_function, num_failures = self._score_all(prompts, completions, batch_fields)
            except WorkerStopped:
                self._stopped.set()
            except Exception:
                if not self._stopped.is_set():
                    raise  # otherwise a call cut short by abort(): say that instead
            if self._stopped.is_set():
                raise RewardError(
                    "reward scoring was stopped (the job is stopping)",
                    function_name="", sample_index=None, detail="stopped",
                )
        total = torch.zeros(len(prompts), dtype=torch.float32)
        for entry in self._entries:
            total += entry.weight * per_function[entry.name]
        seconds = time.perf_counter() - started
        return RewardResult(total, per_function, num_failures, seconds)

    def close(self) -> None:
        """End the worker subprocess (if any). The manager stays usable: a new one starts
        (unless :meth:`abort` was called). Waits for a call in flight."""
        if self._worker is not None:
            with self._lock:
                self._worker.close()

    def abort(self) -> None:
        """Stop scoring for good, at once, from any thread (the job is stopping).

        The worker is killed, a ``score`` call in flight fails within moments
        instead of waiting out ``timeout_s``, and later calls fail.
        """
        self._stopped.set()
        if self._worker is None:
            return
        if self._lock.acquire(blocking=False):  # idle: let it exit in order first
            try:
                self._worker.close()
            finally:
                self._lock.release()
        self._worker.abort()

    def __enter__(self) -> RewardManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{e.name}×{e.weight:g}{' (isolated)' if e.isolated else ''}" for e in self._entries
        )
        return f"RewardManager({parts}; timeout_s={self.timeout_s}, on_error={self.on_error!r})"

    # ------------------------------------------------------------------ scoring

    def _score_all(
        self, prompts: list[str], completions: list[str], fields: dict[str, list]
    ) -> tuple[dict[str, torch.Tensor], int]:
        if not prompts:
            return {e.name: torch.zeros(0, dtype=torch.float32) for e in self._entries}, 0
        for entry in self._entries:
            _check_required_fields(entry, fields)
        outcomes = self._call_batch(prompts, completions, fields)
        if self._stopped.is_set():
            return {}, 0
        per_function: dict[str, torch.Tensor] = {}
        num_failures = 0
        for entry in self._entries:
            values, failed = self._values_for(
                entry, outcomes[entry.name], prompts, completions, fields
            )
            per_function[entry.name] = torch.tensor(values, dtype=torch.float32)
            num_failures += failed
        return per_function, num_failures

    def _call_batch(
        self, prompts: list[str], completions: list[str], fields: dict[str, list]
    ) -> dict[str, CallOutcome]:
        outcomes: dict[str, CallOutcome] = {}
        if self._worker is not None:
            slots = list(self._worker_slots.values())
            by_slot = self._worker.run(slots, prompts, completions, fields, self.timeout_s)
            outcomes = {name: by_slot[slot] for name, slot in self._worker_slots.items()}
        for entry in self._entries:
            if not entry.isolated:
                outcomes[entry.name] = self._call(entry, prompts, completions, fields)
        for name, outcome in outcomes.items():
            if not self._localised_timeout(outcome, len(prompts)):
                self._count_timeouts(name, outcome, len(prompts))
        return outcomes

    def _localised_timeout(self, outcome: CallOutcome, batch_size: int) -> bool:
        """Whether ``outcome`` is a batch timeout that the per-sample calls after it will
        localise: those calls count towards ``max_consecutive_timeouts``, the batch call
        does not, so one hung sample is not counted twice."""
        return (outcome.failure is not None and outcome.failure.kind == "timeout"
                and self.on_error == "fallback" and batch_size > 1)

    def _call(
        self, entry: _Entry, prompts: list[str], completions: list[str], fields: dict[str, list]
    ) -> CallOutcome:
        if entry.isolated:
            assert self._worker is not None
            slot = self._worker_slots[entry.name]
            outcome = self._worker.run([slot], prompts, completions, fields, self.timeout_s)[slot]
        else:
            timeout_s = None if entry.trusted else self.timeout_s
            outcome = call_in_process(
                entry.function, prompts, completions, fields, timeout_s, self._stopped
            )
        return outcome

    def _count_timeouts(self, name: str, outcome: CallOutcome, batch_size: int) -> None:
        """Count ``name``'s timeouts in a row; past the limit, stop (it looks stuck)."""
        if outcome.failure is None or outcome.failure.kind != "timeout":
            self._timeouts_in_a_row[name] = 0
            return
        count = self._timeouts_in_a_row[name] = self._timeouts_in_a_row.get(name, 0) + 1
        limit = self.max_consecutive_timeouts
        if self.on_error == "fallback" and limit is not None and count >= limit:
            detail = f"timed out on {count} calls in a row"
            raise RewardError(
                f"reward function {name!r} {detail} (time limit {self.timeout_s:g}s each, the "
                f"last on a batch of {batch_size}): it looks stuck, so the job stops rather than "
                f"wait out every remaining call (reward.max_consecutive_timeouts={limit}). Fix "
                f"the function, or raise reward.timeout_s",
                function_name=name, sample_index=None, detail=detail,
            )

    def _values_for(
        self,
        entry: _Entry,
        outcome: CallOutcome,
        prompts: list[str],
        completions: list[str],
        fields: dict[str, list],
    ) -> tuple[list[float], int]:
        """Validated values of one function for the batch, and how many samples fell back."""
        if outcome.failure is not None and outcome.failure.kind == "timeout" \
                and self.on_error == "raise":  # stop at once; localising costs more timeouts
            raise _batch_error(entry.name, prompts, outcome.failure)
        if outcome.failure is None:
            values = _as_floats(entry.name, outcome.value, len(prompts))
            failures = _non_finite(values)
        else:
            values, failures = self._localise(entry, outcome.failure, prompts, completions, fields)
        if not failures:
            return values, 0
        if self.on_error == "raise":
            index = min(failures)
            raise _sample_error(entry.name, index, prompts, completions, failures[index])
        self._warn_once(entry.name, failures, len(prompts))
        for index in failures:
            values[index] = self.fallback_reward
        return values, len(failures)

    def _localise(
        self,
        entry: _Entry,
        batch_failure: CallFailure,
        prompts: list[str],
        completions: list[str],
        fields: dict[str, list],
    ) -> tuple[list[float], dict[int, CallFailure]]:
        """Re-run a failed batch call sample by sample to find the failing samples.

        Under ``on_error="raise"`` it stops at the first failing sample.
        """
        if len(prompts) == 1:
            return [math.nan], {0: batch_failure}
        values: list[float] = []
        failures: dict[int, CallFailure] = {}
        for index in range(len(prompts)):
            sample_fields = {key: [column[index]] for key, column in fields.items()}
            outcome = self._call(entry, [prompts[index]], [completions[index]], sample_fields)
            self._count_timeouts(entry.name, outcome, 1)
            if self._stopped.is_set():
                return values, failures
            if outcome.failure is None:
                [value] = _as_floats(entry.name, outcome.value, 1)
                failure = _non_finite([value]).get(0)
            else:
                value, failure = math.nan, outcome.failure
            values.append(value)
            if failure is not None:
                failures[index] = failure
                if self.on_error == "raise":
                    return values, failures
        if not failures:
            self._batch_only_failure(entry.name, batch_failure, len(prompts))
        return values, failures

    def _batch_only_failure(self, name: str, failure: CallFailure, batch_size: int) -> None:
        """The call on the whole batch failed but every sample succeeded on its own."""
        advice = (
            "timeout_s limits one call on the whole batch; raise it"
            if failure.kind == "timeout"
            else "the function fails only on batches; check how it handles several samples"
        )
        message = (
            f"reward function {name!r} failed on the whole batch of {batch_size} "
            f"({failure.detail}) but succeeded on every sample alone; {advice}"
        )
        if self.on_error == "raise":
            raise RewardError(message, function_name=name, sample_index=None, detail=failure.detail)
        logger.warning("%s. Using the per-sample rewards.", message)

    def _warn_once(self, name: str, failures: dict[int, CallFailure], batch_size: int) -> None:
        if name in self._warned:
            return
        self._warned.add(name)
        index = min(failures)
        logger.warning(
            "reward function %r failed on %d of %d samples (first: sample %d, %s); they get "
            "fallback_reward=%g. Later failures are counted in RewardResult.num_failures, "
            "not logged.",
            name, len(failures), batch_size, index, failures[index].detail, self.fallback_reward,
        )  # fmt: skip


# ---------------------------------------------------------------------- construction helpers


def _check_options(
    reward_specs: Sequence[RewardItem],
    timeout_s: float | None,
    on_error: str,
    fallback_reward: float,
    isolate: bool | None,
) -> None:
    if isinstance(reward_specs, (str, tuple)) or not reward_specs:
        raise RewardLoadError(
            f"reward_specs must be a non-empty list of (spec_or_callable, weight) pairs, "
            f"got {reward_specs!r}"
        )
    if timeout_s is not None and not (_is_real(timeout_s) and 0 < timeout_s < math.inf):
        raise RewardLoadError(
            f"timeout_s must be a positive number of seconds or None, got {timeout_s!r}"
        )
    if on_error not in ("raise", "fallback"):
        raise RewardLoadError(f"on_error must be 'raise' or 'fallback', got {on_error!r}")
    if not (_is_real(fallback_reward) and math.isfinite(fallback_reward)):
        raise RewardLoadError(f"fallback_reward must be a finite number, got {fallback_reward!r}")
    if isolate not in (None, True, False):
        raise RewardLoadError(f"isolate must be None, True or False, got {isolate!r}")


def _check_limits(import_timeout_s: float | None, max_consecutive_timeouts: int | None) -> None:
    if import_timeout_s is not None and not (
        _is_real(import_timeout_s) and 0 < import_timeout_s < math.inf
    ):
        raise RewardLoadError(
            f"import_timeout_s must be a positive number of seconds or None, "
            f"got {import_timeout_s!r}"
        )
    if max_consecutive_timeouts is not None and not (
        isinstance(max_consecutive_timeouts, int)
        and not isinstance(max_consecutive_timeouts, bool)
        and max_consecutive_timeouts >= 1
    ):
        raise RewardLoadError(
            f"max_consecutive_timeouts must be an int >= 1 or None, "
            f"got {max_consecutive_timeouts!r}"
        )


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _build_entries(
    reward_specs: Sequence[RewardItem],
    task: Task | None,
    isolate: bool | None,
    import_timeout_s: float | None,
) -> list[_Entry]:
    entries: list[_Entry] = []
    for position, item in enumerate(reward_specs):
        spec_or_callable, weight = _split_item(position, item)
        entry = _make_entry(spec_or_callable, weight, task, isolate, import_timeout_s)
        entry.name = _unique_name(entry.name, {e.name for e in entries})
        entries.append(entry)
    return entries


def _split_item(position: int, item: RewardItem) -> tuple[str | Callable[..., Any], float]:
    if isinstance(item, (str, bytes)) or callable(item):
        return item, 1.0
    if isinstance(item, Sequence) and len(item) == 2:
        spec_or_callable, weight = item
        if not (_is_real(weight) and math.isfinite(weight)):
            raise RewardLoadError(
                f"reward_specs[{position}]: weight must be a finite number, got {weight!r}"
            )
        return spec_or_callable, float(weight)
    raise RewardLoadError(
        f"reward_specs[{position}]: expected a spec, a callable or a (spec_or_callable, weight) "
        f"pair, got {item!r}"
    )


def _make_entry(
    spec_or_callable: str | Callable[..., Any],
    weight: float,
    task: Task | None,
    isolate: bool | None,
    import_timeout_s: float | None,
) -> _Entry:
    if isinstance(spec_or_callable, str):
        spec = parse_reward_spec(spec_or_callable)
        if spec.kind != "builtin" and isolate is not False:  # the worker imports it
            return _Entry(spec.name, weight, None, spec, True, frozenset())
        if spec.kind == "builtin":
            name, function = load_reward_fn(spec_or_callable, task=task)
        else:  # in this process, where a hung import can only be abandoned
            name, function = spec.name, load_user_function_within(spec, import_timeout_s)
        isolated = False
    elif callable(spec_or_callable):
        spec, function = None, spec_or_callable
        name = getattr(function, "__name__", type(function).__name__)
        isolated = isolate is True
    else:
        raise RewardLoadError(
            f"a reward must be a spec string or a callable, got {spec_or_callable!r}"
        )
    check_reward_signature(name, function)
    return _Entry(name, weight, function, spec, isolated, required_fields(function))


def _unique_name(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    suffix = 2
    while f"{name}_{suffix}" in taken:
        suffix += 1
    return f"{name}_{suffix}"


def _worker_function(entry: _Entry, start_method: str) -> Callable[..., Any] | RewardSpec:
    """What the worker needs to run ``entry``: its spec (the worker imports it), else the
    callable (inherited under fork, pickled otherwise)."""
    if entry.spec is not None:
        return entry.spec
    assert entry.function is not None
    if start_method == "fork":
        return entry.function
    try:
        pickle.dumps(entry.function)
    except Exception as exc:
        raise RewardLoadError(
            f"reward function {entry.name!r} was passed as a callable and must be pickled to "
            f"reach a {start_method!r} worker, which failed ({exc}); pass it as a "
            f"'module:function' spec, or use isolate=False or None"
        ) from exc
    return entry.function


# ---------------------------------------------------------------------- validation helpers


def _check_batch(
    prompts: Sequence[str], completions: Sequence[str], fields: Mapping[str, Sequence[Any]] | None
) -> tuple[list[str], list[str], dict[str, list]]:
    prompts, completions = list(prompts), list(completions)
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    batch_fields: dict[str, list] = {}
    for key, column in (fields or {}).items():
        if key in _RESERVED_FIELDS:
            raise ValueError(
                f"field {key!r} clashes with a reward function argument; rename the column"
            )
        if isinstance(column, (str, bytes)) or not hasattr(column, "__len__"):
            kind = type(column).__name__
            raise ValueError(f"field {key!r} must be a list with one value per sample, got {kind}")
        if len(column) != len(prompts):
            raise ValueError(
                f"field {key!r} has {len(column)} values for a batch of {len(prompts)}"
            )
        batch_fields[key] = list(column)
    return prompts, completions, batch_fields


def _check_required_fields(entry: _Entry, fields: dict[str, list]) -> None:
    missing = sorted(entry.required_fields - set(fields))
    if missing:
        detail = f"requires field(s) {missing}, but the batch has {sorted(fields)}"
        raise RewardError(
            f"reward function {entry.name!r} {detail}. Add the column(s) to the data, or, if "
            f"these are meant to be the prompts and completions, name the parameters "
            f"`prompts` and `completions` (they are passed by keyword)",
            function_name=entry.name,
            sample_index=None,
            detail=detail,
        )


def _as_floats(name: str, value: Any, batch_size: int) -> list[float]:
    """Check that a function returned ``batch_size`` real numbers and convert them to floats."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # numpy arrays and tensors
    if not isinstance(value, (list, tuple)):
        raise _structure_error(name, f"returned a {type(value).__name__}")
    if len(value) != batch_size:
        raise _structure_error(name, f"returned {len(value)} values for a batch of {batch_size}")
    floats = []
    for index, item in enumerate(value):
        if not isinstance(item, numbers.Real):
            detail = f"returned a {type(item).__name__} ({item!r}) for sample {index}"
            raise _structure_error(name, detail, index)
        floats.append(float(item))
    return floats


def _structure_error(name: str, detail: str, index: int | None = None) -> RewardError:
    message = (
        f"reward function {name!r} {detail}; it must return one float per completion "
        f"(a list, tuple, array or 1-D tensor of numbers; use 0.0 for samples it does not apply to)"
    )
    return RewardError(message, function_name=name, sample_index=index, detail=detail)


def _non_finite(values: list[float]) -> dict[int, CallFailure]:
    return {
        index: CallFailure(
            "exception",
            f"returned {'NaN' if math.isnan(value) else value}; rewards must be finite numbers",
        )
        for index, value in enumerate(values)
        if not math.isfinite(value)
    }


def _excerpt(text: Any) -> str:
    text = str(text)
    if len(text) <= _EXCERPT_CHARS:
        return repr(text)
    return f"{text[:_EXCERPT_CHARS]!r}... ({len(text)} chars)"


def _sample_error(
    name: str, index: int, prompts: list[str], completions: list[str], failure: CallFailure
) -> RewardError:
    message = (
        f"reward function {name!r} failed on sample {index} (of {len(prompts)} in the batch): "
        f"{_one_line(failure.detail)} (prompt: {_excerpt(prompts[index])}, "
        f"completion: {_excerpt(completions[index])})"
    )
    error = RewardError(message, function_name=name, sample_index=index, detail=failure.detail)
    if failure.exception is not None:
        error.__cause__ = failure.exception
    elif failure.traceback:
        error.__cause__ = _RemoteTraceback(failure.traceback)
    return error


def _batch_error(name: str, prompts: list[str], failure: CallFailure) -> RewardError:
    """A timeout on a whole batch under on_error="raise" (not localised: that would cost more
    time limits)."""
    message = (
        f"reward function {name!r} {failure.detail} on a batch of {len(prompts)} "
        f"(first prompt: {_excerpt(prompts[0])}); make it faster, raise reward.timeout_s, or "
        f"set reward.on_error=fallback to give such samples reward.fallback_reward"
    )
    return RewardError(message, function_name=name, sample_index=None, detail=failure.detail)


def _one_line(text: str) -> str:
    """An exception message on one line (a multi-line one has its lines joined)."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())
