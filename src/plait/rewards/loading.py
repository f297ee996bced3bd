"""Resolve reward specs to callables.

A spec is one of:

* a built-in name: ``"task"`` (the active task's verifier, needs an
  ``answer`` field) or ``"exact_match"``;
* ``"package.module:function"``: imported with :func:`importlib.import_module`;
* ``"path/to/file.py:function"``: executed from the file (a relative path is
  resolved against the current directory). The file's directory is put on
  ``sys.path`` so that it can import its sibling modules, and a file is
  executed once per process however many of its functions are used.

The function part may be dotted (``"module:Class.method"``).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from plait.data.tasks import Task
from plait.errors import PlaitError
from plait.rewards.builtin import BUILTIN_REWARDS

__all__ = [
    "IMPORT_NOTICE_AFTER_S",
    "RewardLoadError",
    "RewardSpec",
    "check_reward_signature",
    "required_fields",
    "load_reward_fn",
    "load_user_function",
    "load_user_function_within",
    "parse_reward_spec",
    "wait_for_import",
]

#: An import still running after this many seconds is announced on stderr.
IMPORT_NOTICE_AFTER_S = 2.0

_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_SPEC_FORMS = "a built-in name, 'package.module:function' or 'path/to/file.py:function'"


class RewardLoadError(PlaitError, ValueError):
    """Invalid reward configuration: a spec that cannot be resolved, a bad weight or option."""


@dataclass(frozen=True)
class RewardSpec:
    """A parsed reward spec.

    Attributes:
        kind: ``"builtin"``, ``"module"`` or ``"file"``.
        target: the built-in name, the module name, or the absolute file path.
        attribute: the (possibly dotted) function name; empty for a built-in.
    """

    kind: Literal["builtin", "module", "file"]
    target: str
    attribute: str = ""

    @property
    def name(self) -> str:
        """Short name used in metrics and error messages."""
        return self.target if self.kind == "builtin" else self.attribute.rsplit(".", 1)[-1]

    def __str__(self) -> str:
        return self.target if self.kind == "builtin" else f"{self.target}:{self.attribute}"


def parse_reward_spec(spec: str) -> RewardSpec:
    """Parse ``spec`` without importing anything; file paths become absolute."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardLoadError(
            f"a reward spec must be a non-empty str ({_SPEC_FORMS}), got {spec!r}"
        )
    spec = spec.strip()
    if ":" not in spec or _is_windows_path_without_function(spec):
        return _parse_builtin(spec)
    target, attribute = spec.rsplit(":", 1)
    if not attribute or not all(part.isidentifier() for part in attribute.split(".")):
        raise RewardLoadError(
            f"reward spec {spec!r}: {attribute!r} is not a function name; write {_SPEC_FORMS}"
        )
    if target.endswith(".py") or "/" in target or "\\" in target:
        return RewardSpec("file", str(Path(target).expanduser().resolve()), attribute)
    if not _MODULE_NAME.match(target):
        raise RewardLoadError(
            f"reward spec {spec!r}: {target!r} is neither a module name nor a .py file path"
        )
    return RewardSpec("module", target, attribute)


def _is_windows_path_without_function(spec: str) -> bool:
    return bool(re.match(r"^[A-Za-z]:[\\/]", spec)) and spec.count(":") == 1


def _parse_builtin(spec: str) -> RewardSpec:
    if spec in BUILTIN_REWARDS:
        return RewardSpec("builtin", spec)
    if spec.endswith(".py"):
        raise RewardLoadError(
            f"reward spec {spec!r} names a file but no function; write '{spec}:function_name'"
        )
    nearest = difflib.get_close_matches(spec, BUILTIN_REWARDS, n=1)
    hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
    raise RewardLoadError(
        f"unknown built-in reward {spec!r}; built-ins: {sorted(BUILTIN_REWARDS)}.{hint} "
        f"A user function is given as 'package.module:function' or 'path/to/file.py:function'."
    )


def load_reward_fn(spec: str, *, task: Task | None = None) -> tuple[str, Callable[..., Any]]:
    """Resolve ``spec`` to ``(name, function)``.

    Args:
        spec: see the module docstring.
        task: the active task, needed by the built-in ``"task"`` reward.

    Raises:
        RewardLoadError: the file is missing, the module cannot be imported,
            the attribute is missing or not callable, or the built-in name is
            unknown.
    """
    parsed = parse_reward_spec(spec)
    if parsed.kind == "builtin":
        try:
            return parsed.name, BUILTIN_REWARDS[parsed.target](task)
        except ValueError as exc:
            raise RewardLoadError(str(exc)) from exc
    return parsed.name, load_user_function(parsed)


def load_user_function(parsed: RewardSpec) -> Callable[..., Any]:
    """Import the module or file of a ``"module"``/``"file"`` spec and return the function."""
    if parsed.kind == "module":
        module = _import_module(parsed)
    elif parsed.kind == "file":
        module = _import_file(parsed)
    else:
        raise RewardLoadError(f"{parsed} is a built-in reward, not a user function")
    function = _resolve_attribute(parsed, module)
    if not callable(function):
        raise RewardLoadError(
            f"reward spec '{parsed}' names a {type(function).__name__}, not a callable"
        )
    return function


def load_user_function_within(parsed: RewardSpec, limit_s: float | None) -> Callable[..., Any]:
    """:func:`load_user_function` with a time limit, in this process.

    The import runs in a daemon thread; past ``limit_s`` it is abandoned (a thread cannot be
    stopped, so it keeps running) and :class:`RewardLoadError` is raised. The reward worker
    imports under the same limit, where the import is ended by killing the worker.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["function"] = load_user_function(parsed)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="plait-reward-import", daemon=True)
    thread.start()

    def finished(wait_s: float | None) -> bool:
        thread.join(wait_s)
        return not thread.is_alive()

    wait_for_import(parsed, limit_s, finished)
    if "error" in box:
        raise box["error"]
    return box["function"]


def wait_for_import(
    parsed: RewardSpec, limit_s: float | None, finished: Callable[[float | None], bool]
) -> None:
    """Wait for the import of ``parsed``: ``finished(wait_s)`` waits up to ``wait_s`` seconds
    (None: without limit) and says whether it is done.

    An import still running after :data:`IMPORT_NOTICE_AFTER_S` is announced on stderr, so
    that a slow or stuck module-level statement is never a silent hang.

    Raises:
        RewardLoadError: the import took longer than ``limit_s`` (None: no limit).
    """
    first = IMPORT_NOTICE_AFTER_S if limit_s is None else min(IMPORT_NOTICE_AFTER_S, limit_s)
    if finished(first):
        return
    if limit_s is None or limit_s > first:
        limit = "no time limit" if limit_s is None else f"time limit {limit_s:g}s"
        print(f"plait: importing reward module {import_label(parsed)} ... ({limit})",
              file=sys.stderr, flush=True)
        if finished(None if limit_s is None else limit_s - first):
            return
    raise RewardLoadError(
        f"reward spec '{parsed}': importing {import_label(parsed)} did not finish within "
        f"{limit_s:g}s (reward.import_timeout_s, default reward.timeout_s); code at module "
        f"level must not block: load models and data inside the function (once, lazily), or "
        f"raise the limit"
    )


def import_label(parsed: RewardSpec) -> str:
    """The name a user knows the module by: its file name, or its module name."""
    return Path(parsed.target).name if parsed.kind == "file" else parsed.target


def _import_module(parsed: RewardSpec) -> ModuleType:
    try:
        return importlib.import_module(parsed.target)
    except ModuleNotFoundError as exc:
        if exc.name and parsed.target.startswith(exc.name):
            raise RewardLoadError(
                f"reward spec '{parsed}': cannot import module {parsed.target!r} ({exc}). "
                f"Install it or add its directory to PYTHONPATH, or give a file path instead: "
                f"'path/to/file.py:{parsed.attribute}'"
            ) from exc
        raise RewardLoadError(_import_failure(parsed, exc)) from exc
    except Exception as exc:
        raise RewardLoadError(_import_failure(parsed, exc)) from exc


def _import_failure(parsed: RewardSpec, exc: BaseException) -> str:
    return f"reward spec '{parsed}': importing {parsed.target!r} raised {type(exc).__name__}: {exc}"


def _import_file(parsed: RewardSpec) -> ModuleType:
    path = Path(parsed.target)
    if not path.is_file():
        raise RewardLoadError(
            f"reward spec '{parsed}': file {str(path)!r} not found "
            f"(relative paths are resolved against the current directory, {Path.cwd()})"
        )
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"plait_reward_file_{stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardLoadError(f"reward spec '{parsed}': cannot load {str(path)!r} as Python")
    module = importlib.util.module_from_spec(module_spec)
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise RewardLoadError(_import_failure(parsed, exc)) from exc
    return module


def _resolve_attribute(parsed: RewardSpec, module: ModuleType) -> Any:
    owner: Any = module
    for part in parsed.attribute.split("."):
        if not hasattr(owner, part):
            raise RewardLoadError(_missing_attribute_message(parsed, owner, part))
        owner = getattr(owner, part)
    return owner


def _missing_attribute_message(parsed: RewardSpec, owner: Any, part: str) -> str:
    defined_here = getattr(owner, "__name__", None)
    callables = sorted(
        name
        for name, value in vars(owner).items()
        if callable(value)
        and not name.startswith("_")
        and (
            not isinstance(owner, ModuleType) or getattr(value, "__module__", None) == defined_here
        )
    )
    nearest = difflib.get_close_matches(part, callables or list(vars(owner)), n=1)
    hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
    where = parsed.target if parsed.kind == "module" else repr(parsed.target)
    return (
        f"reward spec '{parsed}': {where} has no attribute {part!r}; "
        f"callables defined there: {callables or 'none'}.{hint}"
    )


def check_reward_signature(name: str, function: Callable[..., Any]) -> None:
    """Raise :class:`RewardLoadError` unless ``function`` takes ``prompts=``, ``completions=``
    and ``**kwargs``.

    Parameters named after dataset fields (``def f(completions, answer, **kwargs)``)
    are allowed; whether the batch has those fields is only known when scoring.
    """
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    try:
        signature.bind_partial(prompts=[], completions=[])
    except TypeError as exc:
        problem = str(exc)
    else:
        problem = "" if accepts_kwargs else "it does not accept **kwargs"
    if problem:
        raise RewardLoadError(
            f"reward function {name!r} has signature {signature}, which cannot be called as "
            f"fn(prompts=..., completions=..., **fields) ({problem}); define it as "
            f"`def {name}(prompts, completions, **kwargs) -> list[float]`"
        )


def required_fields(function: Callable[..., Any]) -> frozenset[str]:
    """Names of ``function``'s required parameters other than ``prompts``/``completions``.

    They must be fields of every scored batch (``answer`` in
    ``def f(completions, answer, **kwargs)``).
    """
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(
        p.name
        for p in parameters
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in ("prompts", "completions")
    )
