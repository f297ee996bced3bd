"""The Python heap once a job is set up.

A job's models, compiled graphs and the compiler's own records (tens of thousands of
Python objects after ``torch.compile``) live as long as the job. Python's cyclic
collector still walks all of them at every full collection: on a small CPU job one such
pause costs ~0.3 s, as much as a third of an evaluation pass, at moments no one chooses.
:func:`settle` takes what is alive after set-up out of its reach; :func:`release`, when
the job closes, gives it back, so a process that runs several jobs (tests, a notebook)
still frees the cycles of the ones that ended.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect garbage once, then freeze every object alive now (``gc.freeze``): later
    collections only walk objects made after this call. Call it when set-up is over (the
    first step taken, a graph compiled), not in the middle of work whose temporaries would
    be frozen with it."""
    gc.collect()
    gc.freeze()


def release() -> None:
    """Give every frozen object back to the collector (``gc.unfreeze``)."""
    gc.unfreeze()
