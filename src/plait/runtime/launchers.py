"""Starting a job's ranks with the launcher runtime.launcher names."""

from __future__ import annotations

from plait.config import Config
from plait.runtime.worker import job_reference


def launch(config: Config, job) -> dict:
    """Run ``config``'s ranks, each calling the module-level job function ``job``:
    through Ray with runtime.launcher=ray, else as local processes; the summary."""
    if config.runtime.launcher == "ray":
        from plait.runtime.ray_launcher import launch_ray

        return launch_ray(config, job_reference(job))
    from plait.runtime.launch import launch_local

    return launch_local(config, job_reference(job))
