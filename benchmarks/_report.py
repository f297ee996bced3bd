"""The tail every standalone benchmark shares: stamp the result with the machine and the
command that made it, and write it as JSON."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


def save(result: dict, out: Path | None) -> dict:
    """Add ``machine`` and ``command`` to ``result``; write it to ``out`` (if given)."""
    import torch

    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                         "python": platform.python_version(), "torch": torch.__version__}
    result["command"] = " ".join(["python", *sys.argv])
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result
