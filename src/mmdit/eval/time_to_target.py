"""Time to a target validation loss, the MLPerf text-to-image rule, from a run's ``metrics.jsonl``.

MLPerf trains until an evaluation of a fixed held-out metric first reaches a target and reports the time
it took. Ours: the first in-loop evaluation at which ``val/ema/loss`` (fixed timesteps, fixed noise; any
logged key may be named) is at or below the target, with its optimizer step, the images seen
(``images_seen``, logged with every evaluation) and the training wall-clock. Each process of a run (a
resume starts a new one) logs ``time_s`` from its own start, so the wall-clock is the sum over processes
of their logged time: restarts' queueing and loading gaps are not in it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

DEFAULT_KEY = "val/ema/loss"


@dataclass(frozen=True)
class TargetReached:
    """Where a run's ``key`` first reached ``target``."""

    key: str
    target: float
    value: float
    step: int
    images_seen: Optional[int]  # None for runs logged before images_seen was
    wall_clock_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def run_wall_clock(records: list[dict]) -> list[float]:
    """Each record's training wall-clock since the run began: ``time_s`` restarts at 0 in every process of
    the run, so each restart adds the previous process's last time."""
    offset, last, out = 0.0, 0.0, []
    for r in records:
        t = float(r.get("time_s", last))
        if t < last:  # a new process (resume): its clock starts again
            offset += last
        last = t
        out.append(offset + t)
    return out


def time_to_target(records: list[dict], target: float, key: str = DEFAULT_KEY) -> Optional[TargetReached]:
    """The first record (in log order) whose ``key`` is at or below ``target``; None if none is."""
    for r, clock in zip(records, run_wall_clock(records)):
        if key in r and r[key] <= target:
            seen = r.get("images_seen")
            return TargetReached(key, target, float(r[key]), int(r["step"]), None if seen is None else int(seen),
                                 round(clock, 3))
    return None


def read_records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the run folder the trainer wrote (train.save_dir/"
                                "<run_name>), which holds metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def describe_time_to_target(run_dir: Path, target: float, key: str = DEFAULT_KEY) -> str:
    """One line: where ``key`` first reached ``target`` in the run, or that it did not (and its best value)."""
    records = read_records(run_dir)
    found = time_to_target(records, target, key)
    if found is None:
        logged = [(r[key], r["step"]) for r in records if key in r]
        best = f"best {min(logged)[0]:.4g} at step {min(logged)[1]}" if logged else f"no {key} logged"
        return f"time to {key} <= {target:g}: not reached ({best})"
    seen = "?" if found.images_seen is None else f"{found.images_seen:,}"
    return (f"time to {key} <= {target:g}: step {found.step}, {seen} images seen, {found.wall_clock_s:.1f} s of "
            f"training wall-clock ({key} = {found.value:.4g})")
