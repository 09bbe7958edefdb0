"""Sharded checkpoints (``train.parallel=fsdp``) through torch.distributed.checkpoint (DCP), with the same
atomic discipline as :mod:`.checkpoint`, and the moves between sharded and full states.

Layout of ``<run_dir>/step_<N:08d>/`` (the same directory name as a full checkpoint)::

    sharded/.metadata          DCP metadata (written last by DCP, by the first model rank)
    sharded/__<r>_0.distcp     model rank r's shards of {"model", "ema", "optimizer"} (+ "phema": post-hoc EMA)
    scheduler.pt, scaler.pt    small, from the first model rank (+ repa.pt: the REPA projector, replicated)
    trainer_state.json, config.yaml, COMPLETE   as in a full checkpoint; COMPLETE lists every file above

The first model rank cleans up and creates ``step_<N>.tmp-<pid>`` and sends its name to the other model
ranks; every rank writes its shard file (fsynced); the first one then writes the small files and the
COMPLETE manifest and renames the directory (:func:`checkpoint.commit_save`). So ``latest_checkpoint``,
``is_complete`` and ``resolve_resume`` treat both kinds alike: a checkpoint missing a shard or its
manifest is never picked up. Tensors are read by DCP (no pickles of arbitrary objects: its metadata is
read with a restricted unpickler in recent torch; the ``.pt`` files with ``weights_only=True``).

Moving between layouts: a full (DDP) checkpoint loads into a sharded model (:func:`load_full_into_sharded`:
each rank keeps its part), and a sharded one loads into a full model (:func:`load_sharded`: DCP reshards
to whatever the given state dict holds, plain tensors included), so a run switches ``train.parallel``
at any resume. :func:`consolidated_weights` reads one full state dict in one process (export, inference).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import checkpoint as ckpt
from .parallel import ShardedEMA

log = logging.getLogger(__name__)

SHARDED_DIR = "sharded"


def is_sharded(path: str | Path) -> bool:
    """Whether a step directory holds a DCP checkpoint (rather than model.safetensors)."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def _broadcast_path(path: Path | None, group, src: int) -> Path:
    box = [str(path) if path is not None else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return Path(box[0])


def save_sharded(run_dir: str | Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema: ShardedEMA, scheduler_state: dict, scaler_state: dict, trainer_state: dict, config: Any,
                 keep_last: int, group, main_rank: int, is_main: bool,
                 extra: dict[str, dict[str, torch.Tensor]] | None = None,
                 extra_states: dict[str, dict] | None = None) -> Path:
    """Every model rank calls this (a collective over ``group``; ``group=None``: one process, no
    process group, e.g. a test or a conversion); ``extra``: more state dicts saved beside the model's
    (the post-hoc EMA profiles); ``extra_states``: replicated states the first model rank writes as
    ``<key>.pt`` (the REPA projector); returns the step directory."""
    t0 = time.monotonic()
    final, tmp = ckpt.begin_save(run_dir, step) if is_main else (None, None)
    if group is not None:
        tmp = _broadcast_path(tmp, group, main_rank)
    final = tmp.parent / ckpt.step_dir_name(step)
    state = {"model": get_model_state_dict(model), "ema": ema.state_dict(),
             "optimizer": get_optimizer_state_dict(model, optimizer), **(extra or {})}
    writer = dcp.FileSystemWriter(tmp / SHARDED_DIR, sync_files=True)
    with warnings.catch_warnings():  # one process without a process group: DCP warns that this is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=writer, process_group=group, no_dist=group is None)
    if is_main:  # DCP wrote .metadata after every rank's shard: the whole set is on disk
        files = sorted(str(p.relative_to(tmp)) for p in (tmp / SHARDED_DIR).iterdir() if p.is_file())
        ckpt.write_states(tmp, files, scheduler=scheduler_state, scaler=scaler_state, **(extra_states or {}))
        ckpt.commit_save(final, tmp, step, files, trainer_state, config, keep_last,
                         {"sharded": True, "ranks": dist.get_world_size(group) if group is not None else 1})
        log.info("saved sharded checkpoint %s in %.1fs", final, time.monotonic() - t0)
    if group is not None:
        dist.barrier(group=group)  # nobody moves on (or reads it) before the rename
    return final


def load_sharded(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 ema: Any, group=None, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> list[str]:
    """Read a sharded checkpoint into ``model`` / ``optimizer`` / ``ema``, sharded (FSDP) or full (a plain
    model, an :class:`~mmdit.train.optim.EMA`): DCP reads each tensor as the target holds it. ``extra``
    state dicts are filled in place when the checkpoint has them; returns the keys of those it had."""
    path = Path(path)
    ckpt._check_complete(path)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    state["ema"] = ema.state_dict()
    saved = dcp.FileSystemReader(path / SHARDED_DIR).read_metadata().state_dict_metadata
    found = [k for k in (extra or {}) if any(name.startswith(f"{k}.") for name in saved)]
    state.update({k: extra[k] for k in found})
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=path / SHARDED_DIR, process_group=group)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if not isinstance(ema, ShardedEMA):  # a plain EMA module's state_dict() tensors were filled in place
        ema.load_state_dict(state["ema"])
    return found


def load_full_into_sharded(state: ckpt.Checkpoint, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                           ema: ShardedEMA) -> None:
    """A full (DDP) checkpoint, read on every model rank, into the FSDP model: each rank keeps its shard."""
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state.model_state, options=full)
    ema.load_full_state_dict(state.ema_state if state.ema_state is not None else state.model_state)
    if state.optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_by_name(state.optimizer_state, model, optimizer),
                                 options=full)


def optimizer_by_name(saved: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``torch.optim`` state (keyed by parameter index) re-keyed by parameter name, the form
    ``set_optimizer_state_dict`` reads; indices follow ``optimizer.param_groups``, built the same way."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [dict(g) for g in saved["param_groups"]]
    if sum(len(g["params"]) for g in groups) != len(order):
        raise ckpt.CheckpointError(
            f"the checkpoint's optimizer holds {sum(len(g['params']) for g in groups)} parameters, this model "
            f"{len(order)}: it was written for another architecture; set train.reset_optimizer=true")
    for g in groups:
        g["params"] = [order[i] for i in g["params"]]
    return {"state": {order[int(i)]: s for i, s in saved["state"].items()}, "param_groups": groups}


def consolidated_weights(path: str | Path, which: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """One full state dict ("model" or "ema") of a sharded checkpoint, in this process alone (no process
    group: DCP reads every shard). ``model`` gives the names and shapes (a plain MMDiT of its config)."""
    if which not in ckpt.WEIGHT_FILES:
        raise ValueError(f"which={which!r}; choose one of {list(ckpt.WEIGHT_FILES)}")
    path = Path(path)
    ckpt._check_complete(path)
    target = {which: {k: v.detach().clone() for k, v in model.state_dict().items()}}
    with warnings.catch_warnings():  # DCP warns that no process group exists: one process is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, checkpoint_id=path / SHARDED_DIR, no_dist=True)
    return target[which]
