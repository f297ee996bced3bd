"""A job killed with SIGKILL inside a step, for the resume tests of the pair commands."""

import os
import subprocess
import sys
import textwrap


def kill_in_step(module: str, trainer: str, entry: str, overrides: list[str], step: int):
    """Run ``plait.recipes.<module>.<entry>(config)`` in a subprocess whose ``<trainer>``
    is killed with SIGKILL as it begins step ``step + 1``; the finished process."""
    script = textwrap.dedent(f"""
        import os, signal
        from plait.config import load_config
        from plait.recipes import {module} as recipe

        step = recipe.{trainer}.step

        def killed(trainer):
            if trainer.global_step == {step}:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(trainer)

        recipe.{trainer}.step = killed
        recipe.{entry}(load_config(None, {overrides!r}))
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PLAIT_PROGRESS": "0"}, timeout=300)
