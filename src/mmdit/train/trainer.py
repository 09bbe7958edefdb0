"""The training job: loader ranks stream batches, model ranks train the MMDiT with DDP, AMP and EMA.

One optimizer step = ``accumulation_steps`` micro-steps; the data cursor counts micro-steps, so a resume
(with any number of loader ranks) continues with exactly the next samples of the global schedule. Noise,
timesteps and CFG dropout are drawn from generators seeded by (seed, micro-step, model index). What to
resume from is decided once (:mod:`.resume`); how a job stops is :mod:`.stopping`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from ..config import Config, config_to_dict
from ..flow import cfg_dropout_keep, encoder_drop_probs, flow_loss, sample_timesteps
from ..model import MMDiT
from ..model.flops import device_peak_flops, hardware_flops_per_image, train_flops_per_image
from ..model.policy import compile_blocks, compile_enabled
from ..precision import precision_of
from . import checkpoint as ckpt
from . import sharded_checkpoint as sharded
from .balance import BalanceMonitor, RankBalance, balance_metrics, gather_balance
from .batches import build_schedule, local_source, make_producer, remote_source, run_loader
from .metrics import LossByT, MetricsLogger
from .optim import EMA, make_optimizer, make_scheduler
from .parallel import ParallelModel, ShardedEMA
from .resume import ResumePlan, agree_resume, check_loaded_step, data_layout
from .rng_state import capture_rng_state, restore_rng_state
from .runtime import Runtime
from .stopping import agree_step, send_end_request

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters' bytes: equal on every model rank when DDP kept them in sync (FSDP: of
    the gathered weights, a collective)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        p = p.full_tensor() if isinstance(p, DTensor) else p
        h.update(name.encode())
        h.update(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The forward's autocast dtype (one place decides every dtype: :mod:`mmdit.precision`)."""
    return precision_of(cfg.train.precision, device, cfg.train.parallel).compute


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.save_dir) / cfg.train.run_name


def train(cfg: Config, rt: Runtime) -> dict:
    """Run this rank's part of the job; returns a summary (steps done, corrupt rows, ...)."""
    plan = agree_resume(cfg, run_dir_of(cfg), rt)
    if rt.is_loader:
        return _loader_main(cfg, rt, plan)
    return Trainer(cfg, rt, plan).fit()


def _loader_main(cfg: Config, rt: Runtime, plan: ResumePlan) -> dict:
    if cfg.data.loader_threads:
        torch.set_num_threads(cfg.data.loader_threads)
    index, schedule = build_schedule(cfg, plan.segments)
    producer = make_producer(cfg, schedule, index, rt.device)
    stats = run_loader(producer, rt.topology, rt.rank, rt.data_group, plan.start_micro, plan.stop_micro, rt.stop)
    busy = stats["encode_s"] + stats["wait_for_model_s"]
    stats["loader_wait_frac"] = stats["wait_for_model_s"] / busy if busy else 0.0
    log.info("loader rank %d done: %s", rt.rank, stats)
    return stats


class Trainer:
    """State and loop of a model rank."""

    def __init__(self, cfg: Config, rt: Runtime, plan: ResumePlan):
        self.cfg, self.rt, self.plan = cfg, rt, plan
        self.device = rt.device
        self.dtype = autocast_dtype(cfg, rt.device)
        self.model_index = rt.topology.model_index(rt.rank)
        self.run_dir = run_dir_of(cfg)
        torch.manual_seed(cfg.train.seed)
        self.model = MMDiT(cfg.model).to(self.device)
        self.fsdp = cfg.train.parallel == "fsdp"
        compiled = compile_enabled(cfg.train.compile, self.device)
        if self.fsdp:  # torchtitan's order: checkpointing (in the blocks), compile, then shard
            if compiled:
                compile_blocks(self.model)
            self.parallel = ParallelModel(self.model, "fsdp", rt, precision_of(cfg.train.precision, rt.device, "fsdp"))
            self.ema: EMA | ShardedEMA = ShardedEMA(self.model)
        else:
            self.ema = EMA(self.model)
        self.optimizer = make_optimizer(self.model, cfg.train)
        self.scheduler = make_scheduler(self.optimizer, cfg.train)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step = 0
        self.skipped = 0
        self.nonfinite_in_row = 0
        self.corrupt = 0
        self.wandb_id: str | None = None
        self.samples_seen = plan.samples_seen
        self._restore()
        if not self.fsdp:
            if compiled:  # regional: each JointBlock, after the EMA copy
                compile_blocks(self.model)
            self.parallel = ParallelModel(self.model, "ddp", rt)

    # ---------------------------------------------------------------- checkpoints
    def _restore(self) -> None:
        if self.plan.path is not None:
            path = Path(self.plan.path)
            ts = self._load_states(path)
            check_loaded_step(self.plan, int(ts["step"]), self.rt.rank)
            self.step, self.skipped, self.corrupt = ts["step"], ts.get("skipped", 0), ts.get("corrupt", 0)
            self.wandb_id = ts.get("wandb_id")
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

    def _load_states(self, path: Path) -> dict:
        """Weights, EMA, optimizer, scheduler and scaler from a full or a sharded checkpoint, whichever this
        run's ``train.parallel`` (a run may switch at a resume); returns the trainer state."""
        if sharded.is_sharded(path):
            sharded.load_sharded(path, model=self.model, optimizer=self.optimizer, ema=self.ema,
                                 group=self.rt.model_group if self.rt.distributed else None)
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
        }
        if self.fsdp:  # every model rank writes its shard
            sharded.save_sharded(
                self.run_dir, self.step, model=self.model, optimizer=self.optimizer, ema=self.ema,
                scheduler_state=self.scheduler.state_dict(), scaler_state=self.scaler.state_dict(),
                trainer_state=trainer_state, config=self.cfg, keep_last=self.cfg.train.keep_last,
                group=self.rt.model_group, main_rank=self.rt.topology.model_ranks[0], is_main=self.rt.is_main)
            return
        path = ckpt.save_checkpoint(
            self.run_dir, self.step, model_state=self.model.state_dict(), ema_state=self.ema.state_dict(),
            optimizer_state=self.optimizer.state_dict(), scheduler_state=self.scheduler.state_dict(),
            scaler_state=self.scaler.state_dict(), trainer_state=trainer_state, config=self.cfg,
            keep_last=self.cfg.train.keep_last,
        )
        log.info("saved %s", path)

    # ---------------------------------------------------------------- one step
    def _generator(self, micro: int) -> torch.Generator:
        seed = int(np.random.SeedSequence([self.cfg.train.seed, micro, self.model_index]).generate_state(1)[0])
        return torch.Generator(self.device).manual_seed(seed)

    def _micro_step(self, batch, micro: int, sync: bool, loss_by_t: LossByT) -> torch.Tensor:
        x0 = batch.latents.float()
        g = self._generator(micro)
        n = x0.shape[0]
        tokens = (x0.shape[2] // self.cfg.model.patch_size) * (x0.shape[3] // self.cfg.model.patch_size)
        t = sample_timesteps(n, self.cfg.flow, generator=g, device=self.device, num_tokens=tokens)
        eps = torch.randn(x0.shape, generator=g, device=self.device, dtype=x0.dtype)
        keep = cfg_dropout_keep(n, batch.cond.num_encoders, self.cfg.flow.p_uncond,
                                encoder_drop_probs(self.cfg.encoders.text) or None, generator=g, device=self.device)
        cond = batch.cond.keep(keep)
        net = self.parallel.net
        with self.parallel.grad_sync(sync):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                loss, per_sample = flow_loss(net, x0, cond, t, eps, weighting=self.cfg.flow.loss_weighting)
            self.scaler.scale(loss / self.cfg.train.accumulation_steps).backward()
        loss_by_t.add(t, per_sample)
        return loss.detach()

    def _optimizer_step(self, stop_local: bool = False) -> tuple[torch.Tensor, bool, bool]:
        """Clip, then step unless any model rank's gradients are not finite; returns (grad norm, finite,
        stop: whether any model rank asked to stop). The step's one host sync is :func:`agree_step`."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = self.parallel.clip_grad_norm_(self.cfg.train.grad_clip)
        finite, stop = agree_step(grad_norm, stop_local, self.rt.model_group if self.rt.distributed else None,
                                  self.rt.num_model_ranks)
        if finite:
            self.scaler.step(self.optimizer)
            self.nonfinite_in_row = 0
        else:
            self.skipped += 1
            self.nonfinite_in_row += 1
            if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
                raise NonFiniteError(f"{self.nonfinite_in_row} optimizer steps in a row had non-finite gradients "
                                     f"(step {self.step}); lower train.lr or check the data")
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm.detach(), finite, stop

    # ---------------------------------------------------------------- the loop
    def _open_source(self):
        cfg, rt, plan = self.cfg, self.rt, self.plan
        if rt.topology.has_loaders:
            return remote_source(rt.topology.loader_of(rt.rank), rt.data_group, plan.start_micro, plan.stop_micro,
                                 self.device)
        index, schedule = build_schedule(cfg, plan.segments)
        producer = make_producer(cfg, schedule, index, self.device)
        return local_source(producer, self.model_index, plan.start_micro, plan.stop_micro)

    def _end_stream(self, source, micro: int) -> None:
        """Tell the loader where the stream ends and drain it (steps 4-5 of :mod:`.stopping`)."""
        loader = self.rt.topology.loader_of(self.rt.rank)
        work = send_end_request(loader, micro, self.rt.data_group) if loader is not None else None
        dropped = source.close()
        if work is not None:
            work.wait()
        if dropped:
            log.info("rank %d: dropped %d batches streamed past micro-step %d", self.rt.rank, dropped, micro)

    def fit(self) -> dict:
        cfg, rt = self.cfg, self.rt
        accum = cfg.train.accumulation_steps
        source = self._open_source()
        validator = None
        if rt.is_main and cfg.train.validate_every and cfg.train.validation_prompts:
            from .validation import Validator

            validator = Validator(cfg, self.device)
        evaluator = None  # every model rank holds its share of the eval set (mmdit.eval)
        if cfg.eval.parquet_folder and (cfg.eval.loss_every or cfg.eval.images_every):
            from ..eval.evaluator import Evaluator

            evaluator = Evaluator(cfg, self.device, rt.model_group if rt.distributed else None, self.model_index,
                                  rt.num_model_ranks, dtype=self.dtype)
        logger = None
        if rt.is_main:
            logger = MetricsLogger(self.run_dir, cfg.train.wandb_mode, cfg.train.wandb_project, cfg.train.run_name,
                                   config_to_dict(cfg), None if cfg.train.reset_wandb and self.step == 0 and
                                   not self.wandb_id else self.wandb_id, cfg.train.total_steps, self.step)
            self.wandb_id = logger.wandb_id
        peak = cfg.train.peak_flops or device_peak_flops()
        loss_by_t = LossByT(self.device)
        self.balance = BalanceMonitor(len(rt.topology.loader_ranks), rt.num_model_ranks,
                                      window_steps=cfg.train.balance_window, warmup_until=self.step + 10)
        window = {"loss": torch.zeros((), device=self.device), "n": 0, "images": 0, "tokens": 0, "flops": 0.0,
                  "hw_flops": 0.0, "wait": source.wait_s, "t": time.perf_counter(), "step": self.step}
        sample_log = None
        if cfg.train.log_samples:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            sample_log = (self.run_dir / f"samples_rank{rt.rank}.jsonl").open("a")
        self.model.train()
        micro = self.plan.start_micro
        stopped = False
        while self.step < cfg.train.total_steps:
            flagged = False  # a batch of this step says its loader was asked to stop
            for k in range(accum):
                batch = source.get(micro).to(self.device)
                flagged |= batch.stop_requested
                self.corrupt += batch.corrupt
                if sample_log is not None:
                    sample_log.write(json.dumps({"micro": micro, "bucket": list(batch.latents.shape[2:]),
                                                 "ids": batch.sample_ids.tolist()}) + "\n")
                    sample_log.flush()  # current even if the process is killed next
                window["loss"] += self._micro_step(batch, micro, sync=k == accum - 1, loss_by_t=loss_by_t)
                window["n"] += 1
                b, _, h, w = batch.latents.shape
                self.samples_seen += b * rt.num_model_ranks
                window["images"] += b
                window["tokens"] += b * (h // cfg.model.patch_size) * (w // cfg.model.patch_size)
                text_lengths = [m.shape[1] for m in batch.cond.masks]  # as trimmed by the loader
                pixels = (h * cfg.model.latent_factor, w * cfg.model.latent_factor)
                window["flops"] += b * train_flops_per_image(cfg.model, *pixels, text_lengths)
                window["hw_flops"] += b * hardware_flops_per_image(cfg.model, *pixels, text_lengths)
                micro += 1
            grad_norm, _, stopped = self._optimizer_step(rt.stop.requested or flagged)
            self.step += 1
            if self.step % cfg.train.ema_update_every == 0:
                self.ema.update(self.model, cfg.train.ema_decay)
            if logger is not None:
                logger.advance()
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.total_steps:
                self._report(logger, window, grad_norm, loss_by_t, source, peak, batch.loader_busy)
            if stopped or self.step == cfg.train.total_steps:
                break
            if self.step % cfg.train.save_every == 0:
                self.save(micro)
            if validator is not None and self.step % cfg.train.validate_every == 0:
                logger.log_images(self.step, "validation", validator.run(self.ema.model, self.step,
                                                                         self.run_dir / "validation", self.dtype))
            self._evaluate(evaluator, logger)
        self._end_stream(source, micro)
        if self.step > self.plan.step or self.plan.path is None:  # the final save: every model rank takes part
            t0 = time.perf_counter()
            self.save(micro)
            if stopped:
                log.warning("stop requested: checkpoint of step %d written in %.1fs, exiting", self.step,
                            time.perf_counter() - t0)
        if not stopped:  # no optional work on the stop step: the grace period is for the checkpoint
            if validator is not None and self.step % cfg.train.validate_every == 0:
                logger.log_images(self.step, "validation", validator.run(self.ema.model, self.step,
                                                                         self.run_dir / "validation", self.dtype))
            self._evaluate(evaluator, logger)
        if logger is not None:
            logger.close()
        if sample_log is not None:
            sample_log.close()
        summary = {"rank": rt.rank, "step": self.step, "micro": micro, "samples_seen": self.samples_seen,
                   "skipped": self.skipped, "corrupt": self.corrupt, "stopped": stopped,
                   "data_wait_s": source.wait_s, "weights_sha256": weights_digest(self.model)}
        (self.run_dir / f"summary_rank{rt.rank}.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _evaluate(self, evaluator, logger: MetricsLogger | None) -> None:
        """Held-out metrics when due (every model rank takes part: the work is split and gathered)."""
        ev = self.cfg.eval
        if evaluator is None:
            return
        t0 = time.perf_counter()
        values = {}
        if ev.loss_every and self.step % ev.loss_every == 0:
            weights = {"ema": self.ema.model, "model": self.model}
            values.update(evaluator.validation_losses({k: weights[k] for k in ev.loss_weights}, self.step))
        if ev.images_every and self.step % ev.images_every == 0:
            values.update(evaluator.image_metrics(self.ema.model, self.step, self.run_dir / "eval"))
            if logger is not None and evaluator.last_grid is not None:
                logger.log_images(self.step, "eval/grid", [evaluator.last_grid])
        if values and logger is not None:
            values["eval/seconds"] = time.perf_counter() - t0  # what this evaluation cost the run
            logger.log(self.step, values)

    def _report(self, logger: MetricsLogger | None, window: dict, grad_norm: torch.Tensor, loss_by_t: LossByT, source,
                peak: float, loader_busy: float) -> None:
        """Every model rank: the balance figures of the interval; the first one also logs everything."""
        now = time.perf_counter()
        elapsed = now - window["t"]
        mine = RankBalance(self.rt.rank, source.wait_s - window["wait"], elapsed,
                           self.rt.topology.loader_of(self.rt.rank), loader_busy)
        ranks = gather_balance(mine, self.rt.model_group if self.rt.distributed else None, self.rt.num_model_ranks)
        steps = self.step - window["step"]
        if logger is None:
            window.update(wait=source.wait_s, t=now, step=self.step)
            return
        warning = self.balance.update(self.step, steps, ranks)
        if warning:
            log.warning("%s", warning)
        values = {
            "loss": float(window["loss"]) / max(1, window["n"]),  # the one host read of the losses
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "images_per_s": window["images"] * self.rt.num_model_ranks / elapsed,
            "tokens_per_s": window["tokens"] * self.rt.num_model_ranks / elapsed,
            "data_wait_frac": max(r.wait_s / max(1e-9, r.elapsed_s) for r in ranks),  # the most-waiting rank
            **balance_metrics(ranks),
            "skipped_steps": self.skipped,
            "corrupt_images": self.corrupt,
            **loss_by_t.report(),
        }
        if peak:
            values["mfu"] = window["flops"] / elapsed / peak
            values["hfu"] = window["hw_flops"] / elapsed / peak  # with the recompute of checkpointed blocks
        if self.device.type == "cuda":
            values["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        logger.log(self.step, values)
        window.update(loss=torch.zeros((), device=self.device), n=0, images=0, tokens=0, flops=0.0, hw_flops=0.0,
                      wait=source.wait_s, t=now, step=self.step)
