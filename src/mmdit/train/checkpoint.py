"""Checkpoints: one directory per step, written atomically, loaded without unpickling arbitrary objects.

Layout of ``<run_dir>/step_<N:08d>/``::

    model.safetensors    model state dict
    ema.safetensors      EMA state dict            (absent if ema_state is None)
    optimizer.pt         optimizer state dict      (absent if None)
    scheduler.pt         LR scheduler state dict   (absent if None)
    scaler.pt            AMP GradScaler state dict (absent if None)
    phema.safetensors    post-hoc EMA profiles      (only with train.phema.enabled; extra_weights)
    repa.pt              REPA projector + its optimizer state (only with train.repa.enabled; extra_states)
    trainer_state.json   step, data cursor, RNG states of every rank, wandb id, ... (JSON)
    config.yaml          the resolved config (mmdit.config.save_config)
    COMPLETE             JSON manifest (step, files, tensor file sizes); written last

Atomicity: everything is written into ``step_<N>.tmp-<pid>``, every file and the directory are fsynced,
the ``COMPLETE`` manifest is written, and the directory is renamed to ``step_<N>`` (``os.rename`` within
one directory is atomic on POSIX file systems, including Lustre/GPFS/NFS for a single client). Only
names matching ``step_<digits>`` with a ``COMPLETE`` manifest whose files all exist are ever picked
up, so a save killed at any point (even SIGKILL) leaves the previous checkpoint as the newest one.
Leftover ``.tmp-``/``.old-``/``.del-`` directories are cleaned up by the next save. Exactly one
process (global rank 0) saves into a run directory.

``.pt`` files are loaded with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only; a file holding any other pickled object is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .rng_state import from_jsonable, to_jsonable

log = logging.getLogger(__name__)

STEP_DIR_RE = re.compile(r"^step_(\d+)$")
# leftovers of interrupted saves / replacements / deletions: step_<N>.{tmp,old,del}-<pid>
_SCRATCH_RE = re.compile(r"^step_(\d+)\.(tmp|old|del)-(\d+)$")
MARKER = "COMPLETE"
WEIGHT_FILES = {"model": "model.safetensors", "ema": "ema.safetensors"}
STATE_FILES = {"optimizer": "optimizer.pt", "scheduler": "scheduler.pt", "scaler": "scaler.pt"}
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the path."""


class MissingCheckpointFile(CheckpointError, FileNotFoundError):
    """A file listed in a checkpoint's manifest is not there."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    optimizer_state: dict | None
    scheduler_state: dict | None
    scaler_state: dict | None
    trainer_state: dict = field(default_factory=dict)
    config: Any = None  # mmdit.config.Config; None if its config.yaml no longer fits the schema


def step_dir_name(step: int) -> str:
    return f"step_{int(step):08d}"


# ----------------------------------------------------------------------------------------------------
# writing


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prepare_tensors(state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing storage (safetensors refuses shared tensors)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, str]] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}[{key!r}] is a {type(value).__name__}, not a tensor")
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()  # a fresh copy, owns its storage
        storage_key = (t.untyped_storage().data_ptr(), str(t.device))
        if storage_key in seen and t.untyped_storage().nbytes() > 0:
            t = t.clone()
        else:
            seen.add(storage_key)
            t = t.contiguous()
        out[key] = t
    return out


def _write_safetensors(state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    save_file(_prepare_tensors(state, what), str(path), metadata={"format": "pt"})
    _fsync_path(path)


def _write_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(text: str, path: Path) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_config(config: Any, path: Path) -> None:
    if config is not None and hasattr(config, "__dataclass_fields__"):
        from mmdit.config import save_config

        save_config(config, path)
        _fsync_path(path)
    else:  # a plain dict (or None): written as YAML as is
        from omegaconf import OmegaConf

        _write_text(OmegaConf.to_yaml(OmegaConf.create(config or {})), path)


def _remove_tree(path: Path) -> None:
    """Delete a directory so that a kill midway never leaves something that looks like a checkpoint."""
    m = STEP_DIR_RE.match(path.name)
    if m:
        doomed = path.with_name(f"{path.name}.del-{os.getpid()}")
        os.rename(path, doomed)
        path = doomed
    shutil.rmtree(path, ignore_errors=True)


def _cleanup_scratch(run_dir: Path) -> None:
    """Remove leftovers of killed saves; put back a replaced checkpoint whose replacement never landed."""
    for p in sorted(run_dir.iterdir()):
        m = _SCRATCH_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        kind = m.group(2)  # saves are sequential in one process: no scratch dir is in use right now
        target = run_dir / f"step_{m.group(1)}"
        if kind == "old" and not target.exists() and _check_complete(p, raise_error=False):
            log.warning("restoring %s (its replacement was interrupted)", target)
            os.rename(p, target)
            continue
        log.info("removing leftover %s", p)
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict | None,
    scheduler_state: dict | None,
    scaler_state: dict | None,
    trainer_state: dict,
    config: Any,
    keep_last: int,
    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
    extra_states: dict[str, dict] | None = None,
) -> Path:
    """Write ``<run_dir>/step_<step>/`` atomically, then keep only the newest ``keep_last`` (<= 0: keep all).

    ``trainer_state`` must be JSON-safe after :func:`to_jsonable` (tensors/arrays are encoded);
    ``step`` is stored in it. ``extra_weights``: more tensor files, ``<key>.safetensors`` (read back with
    :func:`load_extra_weights`); ``extra_states``: more state dicts, ``<key>.pt`` (:func:`load_extra_state`).
    Call from one process only (global rank 0). Returns the step directory.
    """
    final, tmp = begin_save(run_dir, step)
    t0 = time.monotonic()

    files: list[str] = []
    _write_safetensors(model_state, tmp / WEIGHT_FILES["model"], "model_state")
    files.append(WEIGHT_FILES["model"])
    if ema_state is not None:
        _write_safetensors(ema_state, tmp / WEIGHT_FILES["ema"], "ema_state")
        files.append(WEIGHT_FILES["ema"])
    for key, state in (extra_weights or {}).items():
        _write_safetensors(state, tmp / f"{key}.safetensors", key)
        files.append(f"{key}.safetensors")
    write_states(tmp, files, optimizer=optimizer_state, scheduler=scheduler_state, scaler=scaler_state,
                 **(extra_states or {}))
    commit_save(final, tmp, step, files, trainer_state, config, keep_last)
    log.info("saved checkpoint %s in %.1fs", final, time.monotonic() - t0)
    return final


def begin_save(run_dir: str | Path, step: int) -> tuple[Path, Path]:
    """Clean up leftovers of killed saves and create the scratch directory; returns (final, tmp) paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _cleanup_scratch(run_dir)
    final = run_dir / step_dir_name(step)
    tmp = run_dir / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return final, tmp


def write_states(tmp: Path, files: list[str], **states: Any) -> None:
    """The ``.pt`` files of the states that are not None: optimizer / scheduler / scaler (STATE_FILES), any
    other key as ``<key>.pt``."""
    for key, obj in states.items():
        if obj is not None:
            name = STATE_FILES.get(key, f"{key}.pt")
            _write_torch(obj, tmp / name)
            files.append(name)


def commit_save(final: Path, tmp: Path, step: int, files: list[str], trainer_state: dict, config: Any,
                keep_last: int, manifest_extra: dict | None = None) -> None:
    """Write the trainer state, config and the COMPLETE manifest into ``tmp``, fsync, rename it to
    ``final`` (atomic), then keep only the newest ``keep_last`` complete checkpoints of its lineage
    (:mod:`mmdit.train.lineage`)."""
    run_dir = final.parent
    # sizes of the tensor files: a truncated or damaged one makes the checkpoint incomplete (the two text
    # files are left out: a user may edit them)
    sizes = {name: (tmp / name).stat().st_size for name in files}
    state = dict(trainer_state)
    state["step"] = int(step)
    _write_text(json.dumps(to_jsonable(state), indent=1), tmp / TRAINER_STATE)
    files.append(TRAINER_STATE)
    _write_config(config, tmp / CONFIG_FILE)
    files.append(CONFIG_FILE)
    manifest = {"format": FORMAT_VERSION, "step": int(step), "files": files, "sizes": sizes, "time": time.time(),
                **(manifest_extra or {})}
    _write_text(json.dumps(manifest), tmp / MARKER)
    _fsync_path(tmp)

    if final.exists():  # re-saving a step: move the old one aside, put the new one in, then delete the old
        aside = run_dir / f"{final.name}.old-{os.getpid()}"
        os.rename(final, aside)
        os.rename(tmp, final)
        _fsync_path(run_dir)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
        _fsync_path(run_dir)

    if keep_last > 0:  # counted within this checkpoint's lineage: other branches are the user's to delete
        mine = (trainer_state.get("lineage") or {}).get("id")
        complete = [p for _, p in _step_dirs(run_dir) if _check_complete(p, raise_error=False)
                    and (read_trainer_state(p).get("lineage") or {}).get("id") == mine]
        for old in complete[:-keep_last]:
            if old != final:
                _remove_tree(old)


# ----------------------------------------------------------------------------------------------------
# finding and reading


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """``step_<N>`` directories sorted by N (numerically); scratch names never match."""
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        m = STEP_DIR_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _check_complete(path: Path, raise_error: bool = True) -> dict | None:
    """The manifest of a complete checkpoint, else None (or a CheckpointError naming what is missing)."""

    def fail(exc: CheckpointError):
        if raise_error:
            raise exc
        return None

    path = Path(path)
    if not path.is_dir():
        return fail(CheckpointError(f"checkpoint {path} does not exist (or is not a directory)"))
    marker = path / MARKER
    if not marker.is_file():
        return fail(
            CheckpointError(f"checkpoint {path} is incomplete: no {MARKER} marker (a save was interrupted?)")
        )
    try:
        manifest = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        return fail(CheckpointError(f"checkpoint {path}: unreadable {MARKER} marker: {err}"))
    for name in manifest.get("files", []):
        if not (path / name).is_file():
            return fail(MissingCheckpointFile(f"checkpoint {path} is missing {name} (listed in its {MARKER})"))
    for name, size in manifest.get("sizes", {}).items():
        actual = (path / name).stat().st_size
        if actual != size:
            return fail(CheckpointError(f"checkpoint {path} is damaged: {name} has {actual} bytes, its {MARKER} "
                                        f"recorded {size}"))
    return manifest


def is_complete(path: str | Path) -> bool:
    return _check_complete(Path(path), raise_error=False) is not None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first."""
    return [p for _, p in _step_dirs(Path(run_dir)) if is_complete(p)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete ``step_<N>`` directory in ``run_dir``, or None."""
    for _, p in reversed(_step_dirs(Path(run_dir))):
        try:
            _check_complete(p)
            return p
        except CheckpointError as err:
            log.warning("skipping %s", err)
    return None


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """``"auto"``: newest complete checkpoint in run_dir or None; ``"none"``/``""``: None;
    otherwise a path to a step directory (absolute, relative to cwd, or a name inside run_dir) or to
    another run directory (its newest checkpoint). Raises CheckpointError if it is missing or incomplete.
    """
    if resume is None or str(resume).strip().lower() in ("", "none", "false", "no"):
        return None
    if str(resume).strip().lower() == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume).expanduser()
    if not path.exists() and (Path(run_dir) / resume).exists():
        path = Path(run_dir) / resume
    if not path.exists():
        raise CheckpointError(f"train.resume={resume!r}: no such checkpoint (also looked in {run_dir})")
    if not (path / MARKER).exists() and not STEP_DIR_RE.match(path.name) and _step_dirs(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"train.resume={resume!r}: run directory has no complete checkpoint")
        return latest
    _check_complete(path)
    return path


def _require(path: Path, name: str) -> Path:
    f = path / name
    if not f.is_file():
        raise MissingCheckpointFile(f"checkpoint {path} is missing {name}")
    return f


def _load_torch(path: Path, name: str, map_location: Any) -> Any:
    f = _require(path, name)
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError for anything outside the weights-only allowlist
        raise CheckpointError(
            f"refusing to load {f}: it is not a plain state dict (torch.load weights_only=True failed: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from err


def _device_str(map_location: Any) -> str:
    return str(map_location) if map_location is not None else "cpu"


def load_checkpoint(path: str | Path, *, map_location: Any = "cpu") -> Checkpoint:
    """Read everything in a complete step directory. Files not saved (None states) come back as None."""
    path = Path(path)
    manifest = _check_complete(path)
    files = set(manifest["files"])
    device = _device_str(map_location)
    model_state = load_file(str(_require(path, WEIGHT_FILES["model"])), device=device)
    ema_state = None
    if WEIGHT_FILES["ema"] in files:
        ema_state = load_file(str(_require(path, WEIGHT_FILES["ema"])), device=device)
    states = {
        key: _load_torch(path, name, map_location) if name in files else None for key, name in STATE_FILES.items()
    }
    trainer_state = from_jsonable(json.loads(_require(path, TRAINER_STATE).read_text()))
    from mmdit.config import ConfigError, read_config

    try:
        config = read_config(_require(path, CONFIG_FILE))
    except ConfigError as err:  # written by an older schema: the states are still usable
        log.warning("checkpoint %s: its config.yaml no longer matches the config schema (%s); config=None",
                    path, err)
        config = None
    return Checkpoint(
        path=path,
        step=int(trainer_state.get("step", manifest["step"])),
        model_state=model_state,
        ema_state=ema_state,
        optimizer_state=states["optimizer"],
        scheduler_state=states["scheduler"],
        scaler_state=states["scaler"],
        trainer_state=trainer_state,
        config=config,
    )


def load_weights(path: str | Path, which: str = "ema", *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """One weights file: ``which`` = "ema" or "model". ``path`` is a step dir, a run dir (newest
    checkpoint) or a ``.safetensors`` file."""
    path = Path(path)
    if path.is_file():
        return load_file(str(path), device=device)
    if which not in WEIGHT_FILES:
        raise ValueError(f"which={which!r}; choose one of {list(WEIGHT_FILES)}")
    if not (path / MARKER).exists() and not STEP_DIR_RE.match(path.name) and _step_dirs(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path} has no complete checkpoint")
        path = latest
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return load_file(str(_require(path, WEIGHT_FILES[which])), device=device)


def load_extra_weights(path: str | Path, key: str, *, device: str = "cpu") -> dict[str, torch.Tensor] | None:
    """``<key>.safetensors`` of a step directory (``save_checkpoint(extra_weights=...)``), None if absent."""
    f = Path(path) / f"{key}.safetensors"
    return load_file(str(f), device=device) if f.is_file() else None


def load_extra_state(path: str | Path, key: str, *, map_location: Any = "cpu") -> dict | None:
    """``<key>.pt`` of a step directory (``extra_states``), None if absent; loaded with weights_only=True."""
    return _load_torch(Path(path), f"{key}.pt", map_location) if (Path(path) / f"{key}.pt").is_file() else None


def read_trainer_state(path: str | Path) -> dict:
    """Just the trainer state of a step directory (cheap: no tensors loaded)."""
    return from_jsonable(json.loads(_require(Path(path), TRAINER_STATE).read_text()))
