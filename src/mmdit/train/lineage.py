"""Run lineage: which chain of checkpoints a job continues, so that going back never goes forward again.

A run directory can hold more than one branch: resume from step 3000 while step 5000 exists (the classic
"go back before the loss spike") and the new branch's steps 3000-5000 are not the old ones. Each job
belongs to a *lineage*, an id recorded in every checkpoint it writes (``trainer_state.json``:
``lineage: {id, parent}``) and in ``<run_dir>/lineage.json`` (the current one, with the checkpoint it branched
from). Then

* ``train.resume=auto`` continues the newest checkpoint of the current lineage, or its parent when the
  branch has not saved yet (a job preempted before its first save);
* an explicit ``train.resume=<step>`` that leaves newer checkpoints behind starts a new lineage from that
  step and says so in one line; resuming the newest checkpoint continues its lineage;
* ``train.keep_last`` counts and deletes only the current lineage's checkpoints (:mod:`.checkpoint`):
  other branches are left for the user to delete. A later step of the new branch replaces the old
  branch's directory of the same step number (atomically).

Checkpoints written before lineages existed have none; a run directory without ``lineage.json`` resumes the
newest checkpoint, as before.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt

LINEAGE_FILE = "lineage.json"


@dataclass(frozen=True)
class ResumeChoice:
    path: Path | None  # the checkpoint to resume (None: from scratch)
    lineage: str  # the lineage this job writes
    parent: str | None  # the checkpoint the lineage branched from (None: from scratch)
    note: str | None = None  # one line for the log when newer checkpoints are left behind


def new_lineage_id() -> str:
    return uuid.uuid4().hex[:12]


def lineage_of(step_dir: Path) -> str | None:
    """The lineage a checkpoint was written in (None for checkpoints older than lineages)."""
    return (ckpt.read_trainer_state(step_dir).get("lineage") or {}).get("id")


def read_current(run_dir: Path) -> dict | None:
    path = Path(run_dir) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_current(run_dir: Path, lineage: str, parent: str | None) -> None:
    """Record the job's lineage (atomically: a half-written file is never read)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f"{LINEAGE_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"id": lineage, "parent": parent}))
    os.replace(tmp, run_dir / LINEAGE_FILE)


def newest_of(run_dir: Path, lineage: str) -> Path | None:
    """The newest complete checkpoint of ``lineage`` in ``run_dir``."""
    for path in reversed(ckpt.list_checkpoints(run_dir)):
        if lineage_of(path) == lineage:
            return path
    return None


def _parent_path(run_dir: Path, parent: str | None) -> Path | None:
    if not parent:
        return None
    path = Path(parent) if Path(parent).is_absolute() else Path(run_dir) / parent
    return path if ckpt.is_complete(path) else None


def _parent_name(run_dir: Path, path: Path) -> str:
    """A checkpoint inside the run directory is named relative to it (the directory may move)."""
    return path.name if path.parent.resolve() == Path(run_dir).resolve() else str(path.resolve())


def choose(run_dir: Path, resume: str | None) -> ResumeChoice:
    """What this job resumes from and which lineage it writes (see the module docstring)."""
    run_dir = Path(run_dir)
    current = read_current(run_dir)
    if resume is not None and str(resume).strip().lower() == "auto":
        if current is not None:
            path = newest_of(run_dir, current["id"]) or _parent_path(run_dir, current.get("parent"))
            return ResumeChoice(path, current["id"], current.get("parent"))
        path = ckpt.latest_checkpoint(run_dir)  # no lineage recorded yet: the newest, as before lineages
        recorded = lineage_of(path) if path is not None else None
        return ResumeChoice(path, recorded or new_lineage_id(), None)
    path = ckpt.resolve_resume(run_dir, resume)
    if path is None:
        return ResumeChoice(None, new_lineage_id(), None)
    recorded = lineage_of(path)
    step = int(ckpt.read_trainer_state(path)["step"])
    newer = [p for p in ckpt.list_checkpoints(run_dir) if int(ckpt.read_trainer_state(p)["step"]) > step]
    if not newer and recorded is not None and (current is None or current["id"] == recorded):
        return ResumeChoice(path, recorded, current.get("parent") if current else None)  # carry on
    lineage = new_lineage_id()
    note = None
    if newer:
        note = (f"resuming {path} (step {step}) although newer checkpoints exist ({', '.join(p.name for p in newer)}): "
                f"they are kept, not continued; this run starts lineage {lineage}, which train.resume=auto continues")
    return ResumeChoice(path, lineage, _parent_name(run_dir, path), note)
