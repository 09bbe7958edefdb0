"""Fault injection for the long-run tests: make a save or an evaluation slower than every timeout.

``MMDIT_INJECT_DELAY="save=6,eval=6"`` sleeps that many seconds at the start of each periodic save,
validation or evaluation of a model rank (the names of :meth:`mmdit.train.trainer.Trainer._timed`). Unset in
real runs; the soak test (tests/test_long_run.py) uses it to prove that a busy peer is never taken for a dead
one, however long it is busy.
"""

from __future__ import annotations

import os
import time


def inject_delay(what: str) -> None:
    for item in filter(None, os.environ.get("MMDIT_INJECT_DELAY", "").split(",")):
        name, _, seconds = item.partition("=")
        if name.strip() == what:
            time.sleep(float(seconds))
