"""One rank of a launched job: ``python -m plait.runtime.worker CONFIG.yaml MODULE:JOB``.

``JOB`` is the function the rank runs, ``job(config, dist) -> summary`` (the launcher's
caller names it: :func:`plait.recipes.rl.run_job` for ``plait train``).

The launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` and ``PLAIT_HEARTBEAT_DIR``. The rank beats
its heartbeat from its first instant, joins the process group, runs the job,
and on failure leaves its error in the heartbeat for the launcher to report.
A rank on the terminal also gets ``PLAIT_RANK_LOG``: a traceback that is only a
symptom (its collective lost a peer) goes there, so the terminal shows the
launcher's account of the cause instead.
"""

from __future__ import annotations

import os
import sys
import traceback

from plait.parallel.heartbeat import Heartbeat, install, is_peer_failure

EXIT_FAILURE = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphans, even when the
    launcher itself is killed). A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def job_reference(job) -> str:
    """``MODULE:NAME`` of a job function, for a rank process to import."""
    return f"{job.__module__}:{job.__qualname__}"


def resolve_job(reference: str):
    """The job function ``MODULE:NAME`` names."""
    import importlib

    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def run_rank(config_path: str, job: str, heartbeat_dir: str | None = None, sink=None) -> dict:
    """Run this process's rank of the job in ``config_path`` with the job function
    ``job`` (``MODULE:NAME``); returns its summary. Raises on failure, after writing the
    error into the heartbeat (a file in ``heartbeat_dir``, or ``sink(record)``)."""
    rank = int(os.environ.get("RANK", "0"))
    beat = Heartbeat(heartbeat_dir, rank, sink=sink)
    install(beat)
    dist = None
    try:
        from plait.config import load_config
        from plait.parallel.dist import Dist

        config = load_config(config_path)
        run_job = resolve_job(job)
        beat.set("joining the process group")
        dist = Dist.from_env(backend=config.runtime.backend,
                             timeout_s=config.runtime.collective_timeout_s,
                             device=config.train.device)
        summary = run_job(config, dist)
        beat.finish("done")
        return summary
    except BaseException as err:
        beat.finish("error", f"{type(err).__name__}: {err}".strip()[:2000],
                    peer=is_peer_failure(err))
        raise
    finally:
        if dist is not None:
            dist.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m plait.runtime.worker CONFIG.yaml MODULE:JOB", file=sys.stderr)
        return 2
    die_with_parent()
    rank = os.environ.get("RANK", "0")
    try:
        run_rank(argv[0], argv[1], os.environ.get("PLAIT_HEARTBEAT_DIR"))
    except KeyboardInterrupt:
        return 130
    except BaseException as err:
        report_failure(err, rank, os.environ.get("PLAIT_RANK_LOG"))
        return EXIT_FAILURE
    return 0


def report_failure(err: BaseException, rank: str, log: str | None) -> None:
    """One line for an error the user can fix; a traceback otherwise, written to ``log``
    (when given) if it is a collective that failed because a peer went away: the
    launcher leads with that peer, and this rank's traceback would bury it."""
    from plait.errors import known_errors

    if isinstance(err, known_errors()):
        print(f"plait: rank {rank}: error: {err}", file=sys.stderr)
    elif log and is_peer_failure(err):
        with open(log, "a") as handle:
            traceback.print_exception(err, file=handle)
    else:
        traceback.print_exception(err)


if __name__ == "__main__":
    sys.exit(main())
