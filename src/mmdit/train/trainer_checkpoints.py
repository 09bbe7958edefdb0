"""How a model rank's state goes into a checkpoint and comes back: weights, EMA, post-hoc EMA profiles,
optimizer (with the config's hyper-parameters re-applied: :mod:`.hyperparams`), scheduler, scaler, RNG states,
the data cursor and the lineage. Full checkpoints under DDP, sharded ones under FSDP; a run may switch at a
resume. A mixin of :class:`mmdit.train.trainer.Trainer`, which owns the attributes used here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import hyperparams
from . import sharded_checkpoint as sharded
from .resume import check_loaded_step, data_layout
from .rng_state import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)


class TrainerCheckpoints:
    def _restore(self) -> None:
        if self.plan.path is not None:
            path = Path(self.plan.path)
            configured = hyperparams.snapshot(self.optimizer)
            ts = self._load_states(path)
            for change in hyperparams.apply(self.optimizer, self.scheduler, configured):
                if self.rt.is_main:
                    log.warning("resume: %s", change)
            check_loaded_step(self.plan, int(ts["step"]), self.rt.rank)
            self.step, self.skipped, self.corrupt = ts["step"], ts.get("skipped", 0), ts.get("corrupt", 0)
            self.wandb_id = ts.get("wandb_id")
            self._restore_phema(path, ts)
            self._restore_repa(path)
            rng = ts.get("rng", [])
            if self.model_index < len(rng):
                restore_rng_state(rng[self.model_index])
            else:
                log.warning("rank %d: %s holds RNG states of %d model ranks, none for model index %d (the layout "
                            "changed); this rank's global RNGs start fresh", self.rt.rank, path, len(rng),
                            self.model_index)
            if self.rt.is_main:
                log.info("resumed from %s at step %d (micro-step %d)", path, self.step, self.plan.start_micro)
        elif self.cfg.train.init_from:
            source = Path(self.cfg.train.init_from)
            if self.fsdp or sharded.is_sharded(source):
                raise ckpt.CheckpointError(f"train.init_from={source} with train.parallel=fsdp or a sharded "
                                           "checkpoint: export it first (python -m mmdit export --checkpoint "
                                           f"{source} --consolidate) and start with train.parallel=ddp")
            weights = ckpt.load_weights(source, which="ema", device=str(self.device))
            self.model.load_state_dict(weights)
            self.ema.load_state_dict(weights)
            if not self.cfg.train.reset_optimizer:
                self.optimizer.load_state_dict(ckpt.load_checkpoint(source).optimizer_state)
            if not self.cfg.train.reset_wandb:
                self.wandb_id = ckpt.read_trainer_state(source).get("wandb_id")
            if self.rt.is_main:
                log.info("initialised weights from %s (EMA weights)", source)

    def _restore_phema(self, path: Path, ts: dict) -> None:
        if self.phema is None:
            return
        if "phema" in ts and self._phema_loaded:  # read in place with the sharded checkpoint
            self.phema.load_meta(ts["phema"])
            return
        tensors = ckpt.load_extra_weights(path, "phema", device=str(self.device))
        if tensors is None or "phema" not in ts:
            log.warning("%s holds no post-hoc EMA profiles: they start from its weights at %d images", path,
                        self.samples_seen)
            self.phema.start_from(self.model, self.samples_seen, int(ts["step"]))
        else:
            self.phema.load_state_dict(tensors, ts["phema"])

    def _restore_repa(self, path: Path) -> None:
        if self.repa is None:
            return
        state = ckpt.load_extra_state(path, "repa", map_location=self.device)
        if state is None:
            log.warning("%s holds no REPA projector (train.repa was off): it starts fresh", path)
        else:
            self.repa.load_state_dict(state, path)

    def _load_states(self, path: Path) -> dict:
        """Weights, EMA, optimizer, scheduler and scaler from a full or a sharded checkpoint, whichever this
        run's ``train.parallel`` (a run may switch at a resume); returns the trainer state."""
        self._phema_loaded = False
        if sharded.is_sharded(path):
            found = sharded.load_sharded(path, model=self.model, optimizer=self.optimizer, ema=self.ema,
                                         group=self.rt.model_group if self.rt.distributed else None,
                                         extra={"phema": self.phema.state_dict()} if self.phema is not None else None)
            self._phema_loaded = "phema" in found
            states = {k: ckpt._load_torch(path, ckpt.STATE_FILES[k], self.device) for k in ("scheduler", "scaler")}
            self.scheduler.load_state_dict(states["scheduler"])
            self.scaler.load_state_dict(states["scaler"])
            return ckpt.read_trainer_state(path)
        state = ckpt.load_checkpoint(path, map_location=self.device)
        if self.fsdp:
            sharded.load_full_into_sharded(state, model=self.model, optimizer=self.optimizer, ema=self.ema)
        else:
            self.model.load_state_dict(state.model_state)
            self.ema.load_state_dict(state.ema_state)
            self.optimizer.load_state_dict(state.optimizer_state)
        self.scheduler.load_state_dict(state.scheduler_state)
        self.scaler.load_state_dict(state.scaler_state)
        return state.trainer_state

    def save(self, micro: int) -> None:
        """Write the checkpoint of this step; ``micro`` is the data cursor (the next micro-step to train).

        Every model rank calls this (they hand their RNG states to the first one, which writes).
        """
        rng = [capture_rng_state()]
        if self.rt.distributed and self.rt.num_model_ranks > 1:
            gathered = [None] * self.rt.num_model_ranks
            torch.distributed.all_gather_object(gathered, rng[0], group=self.rt.model_group)
            rng = gathered
        if not self.rt.is_main and not self.fsdp:
            return
        trainer_state = {
            "step": self.step,
            "data_cursor": micro,
            "samples_seen": self.samples_seen,
            "data_layout": data_layout(self.cfg, self.rt.num_model_ranks),
            "schedule_segments": self.plan.segments,
            "skipped": self.skipped,
            "corrupt": self.corrupt,
            "wandb_id": self.wandb_id,
            "rng": rng,
            "lineage": {"id": self.plan.lineage, "parent": self.plan.parent},
        }
        if self.phema is not None:
            trainer_state["phema"] = self.phema.meta()
        repa = {"repa": self.repa.state_dict()} if self.repa is not None else None  # replicated: one copy
        if self.fsdp:  # every model rank writes its shard
            sharded.save_sharded(
                self.run_dir, self.step, model=self.model, optimizer=self.optimizer, ema=self.ema,
                scheduler_state=self.scheduler.state_dict(), scaler_state=self.scaler.state_dict(),
                trainer_state=trainer_state, config=self.cfg, keep_last=self.cfg.train.keep_last,
                group=self.rt.model_group, main_rank=self.rt.topology.model_ranks[0], is_main=self.rt.is_main,
                extra={"phema": self.phema.state_dict()} if self.phema is not None else None,
                extra_states=repa)
            return
        path = ckpt.save_checkpoint(
            self.run_dir, self.step, model_state=self.model.state_dict(), ema_state=self.ema.state_dict(),
            optimizer_state=self.optimizer.state_dict(), scheduler_state=self.scheduler.state_dict(),
            scaler_state=self.scaler.state_dict(), trainer_state=trainer_state, config=self.cfg,
            keep_last=self.cfg.train.keep_last,
            extra_weights={"phema": self.phema.state_dict()} if self.phema is not None else None,
            extra_states=repa,
        )
        log.info("saved %s", path)
