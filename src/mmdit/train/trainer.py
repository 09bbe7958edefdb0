"""The training job: loader ranks stream batches, model ranks train the MMDiT with DDP, AMP and EMA.

One optimizer step = ``accumulation_steps`` micro-steps; the data cursor counts micro-steps, so a resume
(with any number of loader ranks) continues with exactly the next samples of the global schedule. Noise,
timesteps and CFG dropout are drawn from generators seeded by (seed, micro-step, model index). What to
resume from is decided once (:mod:`.resume`); how a job stops is :mod:`.stopping`.
"""

from __future__ import annotations

import functools
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
from ..model.flops import batch_train_flops, device_peak_flops, skips_padded_keys
from ..model.policy import compile_blocks, compile_enabled
from ..model.routing import route_generator, route_indices
from ..precision import precision_of
from .balance import BalanceMonitor, RankBalance, balance_metrics, gather_balance, mean_loss
from .batches import build_schedule, local_source, make_producer, remote_source, run_loader
from .metrics import LossByT, MetricsLogger
from .optim import EMA, make_optimizer, make_scheduler
from .parallel import ParallelModel, ShardedEMA
from .phema_tracker import PowerFunctionEMA
from .repa import RepaHead, aligned_targets, teacher_width
from .resume import ResumePlan, agree_resume
from .runtime import Runtime
from .stopping import agree_step, send_end_request
from .trainer_checkpoints import TrainerCheckpoints
from .window import MetricWindow

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


def _keep_hidden(net, kept: list, *args):
    """Call ``net`` (asked for the aligned block's tokens too) as the flow loss calls a model: keep the tokens in
    ``kept``, return the velocity."""
    velocity, hidden = net(*args)
    kept.append(hidden)
    return velocity


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


class Trainer(TrainerCheckpoints):
    """State and loop of a model rank (its checkpoint side: :class:`.trainer_checkpoints.TrainerCheckpoints`)."""

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
        # REPA's projector: the trainer's, beside the model (replicated, its own optimizer; mmdit.train.repa)
        self.repa = RepaHead(cfg, teacher_width(cfg), self.device) if cfg.train.repa.enabled else None
        extra = list(self.repa.projector.parameters()) if self.repa is not None else None
        if self.fsdp:  # torchtitan's order: checkpointing (in the blocks), compile, then shard
            if compiled:
                compile_blocks(self.model)
            self.parallel = ParallelModel(self.model, "fsdp", rt, precision_of(cfg.train.precision, rt.device, "fsdp"),
                                          extra=extra)
            self.ema: EMA | ShardedEMA = ShardedEMA(self.model)
        else:
            self.ema = EMA(self.model)
        ph = cfg.train.phema  # post-hoc EMA profiles: on the first model rank (DDP) or sharded on all (FSDP)
        self.phema = PowerFunctionEMA(self.model, ph.stds) if ph.enabled and (rt.is_main or self.fsdp) else None
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
            self.parallel = ParallelModel(self.model, "ddp", rt, extra=extra)

    # ---------------------------------------------------------------- one step
    def _generator(self, micro: int) -> torch.Generator:
        seed = int(np.random.SeedSequence([self.cfg.train.seed, micro, self.model_index]).generate_state(1)[0])
        return torch.Generator(self.device).manual_seed(seed)

    def _micro_step(self, batch, micro: int, sync: bool, loss_by_t: LossByT) -> tuple[torch.Tensor, int]:
        """Forward and backward of one micro-batch; returns its flow loss (on the device) and the image tokens
        REPA's projector saw (0 without the term)."""
        x0 = batch.latents.float()
        g = self._generator(micro)
        n = x0.shape[0]
        tokens = (x0.shape[2] // self.cfg.model.patch_size) * (x0.shape[3] // self.cfg.model.patch_size)
        t = sample_timesteps(n, self.cfg.flow, generator=g, device=self.device, num_tokens=tokens)
        eps = torch.randn(x0.shape, generator=g, device=self.device, dtype=x0.dtype)
        keep = cfg_dropout_keep(n, batch.cond.num_encoders, self.cfg.flow.p_uncond,
                                encoder_drop_probs(self.cfg.encoders.text) or None, generator=g, device=self.device)
        cond = batch.cond.keep(keep)
        net, route = self.parallel.net, None
        if self.cfg.model.route:  # TREAD: this micro-step's routed tokens, the same on every model rank
            g_route = route_generator(self.cfg.train.seed, micro, self.device)
            route = route_indices(n, tokens, self.cfg.model.route, g_route)
            net = functools.partial(net, route=route)
        aligned: list[torch.Tensor] = []  # REPA: the aligned block's image tokens, from the same forward
        if self.repa is not None and self.repa.active(micro):
            if batch.repa is None:
                raise RuntimeError(f"micro-step {micro} has train.repa on but its batch carries no teacher targets")
            net = functools.partial(_keep_hidden, functools.partial(net, hidden_at=self.cfg.train.repa.block),
                                    aligned)
        with self.parallel.grad_sync(sync):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                loss, per_sample = flow_loss(net, x0, cond, t, eps, weighting=self.cfg.flow.loss_weighting)
                total = loss
                if aligned:
                    targets = aligned_targets(batch.repa, self.cfg, route)
                    total = loss + self.cfg.train.repa.weight * self.repa.loss(aligned[0], targets)
            self.scaler.scale(total / self.cfg.train.accumulation_steps).backward()
        loss_by_t.add(t, per_sample)
        return loss.detach(), (n * aligned[0].shape[1] if aligned else 0)

    def _optimizer_step(self, stop_local: bool = False, repa: bool = False) -> tuple[torch.Tensor, bool, bool]:
        """Clip, then step unless any model rank's gradients are not finite; returns (grad norm, finite,
        stop: whether any model rank asked to stop). The step's one host sync is :func:`agree_step`. ``repa``:
        the REPA projector has gradients in this step: it steps too."""
        optimizers = [self.optimizer, *([self.repa.optimizer] if repa else [])]
        if repa:
            self.repa.set_lr(self.step)
        for optimizer in optimizers:
            self.scaler.unscale_(optimizer)
        grad_norm = self.parallel.clip_grad_norm_(self.cfg.train.grad_clip)
        finite, stop = agree_step(grad_norm, stop_local, self.rt.model_group if self.rt.distributed else None,
                                  self.rt.num_model_ranks)
        if finite:
            for optimizer in optimizers:
                self.scaler.step(optimizer)
            self.nonfinite_in_row = 0
        else:
            self.skipped += 1
            self.nonfinite_in_row += 1
            if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
                raise NonFiniteError(f"{self.nonfinite_in_row} optimizer steps in a row had non-finite gradients "
                                     f"(step {self.step}); lower train.lr or check the data")
        self.scaler.update()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm.detach(), finite, stop

    def _phema_update(self) -> None:
        """Move the post-hoc EMA profiles to this step's time (images seen); a snapshot when due."""
        self.phema.update(self.model, self.samples_seen, self.step)
        ph = self.cfg.train.phema
        if self.step % ph.snapshot_every == 0 or self.step == self.cfg.train.total_steps:
            with self.window.paused("phema_snapshot"):  # I/O: out of the metric window
                self.phema.write_snapshots(self.run_dir, ph.snapshot_dtype, write=self.rt.is_main)

    # ---------------------------------------------------------------- the loop
    def _open_source(self):
        cfg, rt, plan = self.cfg, self.rt, self.plan
        if rt.topology.has_loaders:
            return remote_source(rt.topology.loader_of(rt.rank), rt.data_group, plan.start_micro, plan.stop_micro,
                                 self.device)
        index, schedule = build_schedule(cfg, plan.segments)
        producer = make_producer(cfg, schedule, index, self.device)
        return local_source(producer, self.model_index, plan.start_micro, plan.stop_micro)

    def _end_stream(self, source, micro: int) -> str | None:
        """Tell the loader where the stream ends and drain it (steps 5-6 of :mod:`.stopping`), after the final
        save. A stream that broke (its loader died) is abandoned: the error is returned, not raised."""
        loader = self.rt.topology.loader_of(self.rt.rank)
        try:
            work = send_end_request(loader, micro, self.rt.data_group) if loader is not None else None
            dropped = source.close()
            if work is not None:
                work.wait()
        except RuntimeError as err:
            log.error("rank %d: the data stream broke after the final checkpoint (step %d is complete): %s",
                      self.rt.rank, self.step, err)
            return str(err)
        if dropped:
            log.info("rank %d: dropped %d batches streamed past micro-step %d", self.rt.rank, dropped, micro)
        return None

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
        skip_padded = skips_padded_keys(cfg.model.attention, self.device.type)  # FLOPs of the keys that run
        loss_by_t = LossByT(self.device)
        self.balance = BalanceMonitor(len(rt.topology.loader_ranks), rt.num_model_ranks,
                                      window_steps=cfg.train.balance_window, warmup_until=self.step + 10)
        self.window = MetricWindow(self.device, source.wait_s, self.step)
        sample_log = None
        if cfg.train.log_samples:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            sample_log = (self.run_dir / f"samples_rank{rt.rank}.jsonl").open("a")
        self.model.train()
        micro = self.plan.start_micro
        stopped = False
        while self.step < cfg.train.total_steps:
            flagged = False  # a batch of this step says its loader was asked to stop
            repa_tokens = 0  # image tokens the REPA projector saw in this step
            for k in range(accum):
                # after micro-step 0 the host runs ahead of queued device work: a wait hidden behind it is no wait
                batch = source.get(micro, hidden=self._device_busy if k else None).to(self.device)
                flagged |= batch.stop_requested
                self.corrupt += batch.corrupt
                if sample_log is not None:
                    sample_log.write(json.dumps({"micro": micro, "bucket": list(batch.latents.shape[2:]),
                                                 "ids": batch.sample_ids.tolist()}) + "\n")
                    sample_log.flush()  # current even if the process is killed next
                loss, aligned = self._micro_step(batch, micro, sync=k == accum - 1, loss_by_t=loss_by_t)
                repa_tokens += aligned
                b, _, h, w = batch.latents.shape
                self.samples_seen += b * rt.num_model_ranks
                pixels = (h * cfg.model.latent_factor, w * cfg.model.latent_factor)
                # a device tensor where padded keys are skipped (no host sync): read at the report
                flops, hw_flops = batch_train_flops(cfg.model, *pixels, batch.cond.masks, skip_padded)
                if aligned:  # the projector trains: model FLOPs (the teacher, frozen on the loaders, is not)
                    flops, hw_flops = (f + self.repa.train_flops(aligned) for f in (flops, hw_flops))
                self.window.add(loss, b, b * (h // cfg.model.patch_size) * (w // cfg.model.patch_size), flops,
                                hw_flops)
                micro += 1
            grad_norm, _, stopped = self._optimizer_step(rt.stop.requested or flagged, repa=repa_tokens > 0)
            self.step += 1
            if self.step % cfg.train.ema_update_every == 0:
                self.ema.update(self.model, cfg.train.ema_decay)
            if self.phema is not None:
                self._phema_update()
            if logger is not None:
                logger.advance()
            if self.step == self.plan.step + 1:  # compile, allocator and pipeline warm-up: timed, not windowed
                self.window.end_warmup(source.wait_s, self.step)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.total_steps:
                self._report(logger, grad_norm, loss_by_t, source, peak, batch.loader_busy)
            if stopped or self.step == cfg.train.total_steps:
                break
            self._periodic_work(validator, evaluator, logger, micro, save=True)
        if not stopped:  # the run's end: its last metrics before the final save, so nothing heavy follows it
            self._periodic_work(validator, evaluator, logger, micro, save=False)
        if self.step > self.plan.step or self.plan.path is None:  # the final save: every model rank takes part
            t0 = time.perf_counter()
            with self.window.paused("save"):
                self.save(micro)  # first: a loader that dies during the stop cannot cost the checkpoint
            if stopped:
                log.warning("stop requested: checkpoint of step %d written in %.1fs, exiting", self.step,
                            time.perf_counter() - t0)
        stream_error = self._end_stream(source, micro)
        if logger is not None:
            logger.close()
        if sample_log is not None:
            sample_log.close()
        summary = {"rank": rt.rank, "step": self.step, "micro": micro, "samples_seen": self.samples_seen,
                   "skipped": self.skipped, "corrupt": self.corrupt, "stopped": stopped,
                   "data_wait_s": source.wait_s, "stream_error": stream_error}
        if cfg.train.weights_digest:  # a gather of every weight under FSDP: only when asked (tests)
            summary["weights_sha256"] = weights_digest(self.model)
            if self.repa is not None:  # replicated on every model rank: equal when its gradients were averaged
                summary["repa_sha256"] = weights_digest(self.repa.projector)
        (self.run_dir / f"summary_rank{rt.rank}.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _periodic_work(self, validator, evaluator, logger: MetricsLogger | None, micro: int, save: bool) -> None:
        """What is due at this step besides training: the periodic save, validation images, held-out metrics.
        Each is timed and logged as its own duration (``time/<what>_s``), outside the metric window."""
        cfg = self.cfg
        if save and self.step % cfg.train.save_every == 0:
            with self.window.paused("save"):
                self.save(micro)
        if validator is not None and self.step % cfg.train.validate_every == 0:
            with self.window.paused("validation"):
                images = validator.run(self.ema.model, self.step, self.run_dir / "validation", self.dtype)
            logger.log_images(self.step, "validation", images)
        self._evaluate(evaluator, logger)

    def _evaluate(self, evaluator, logger: MetricsLogger | None) -> None:
        """Held-out metrics when due (every model rank takes part: the work is split and gathered)."""
        ev = self.cfg.eval
        loss_due = bool(ev.loss_every and self.step % ev.loss_every == 0)
        images_due = bool(ev.images_every and self.step % ev.images_every == 0)
        if evaluator is None or not (loss_due or images_due):
            return
        t0 = time.perf_counter()
        values = {}
        with self.window.paused("eval"):
            if loss_due:
                weights = {"ema": self.ema.model, "model": self.model}
                values.update(evaluator.validation_losses({k: weights[k] for k in ev.loss_weights}, self.step))
            if images_due:
                values.update(evaluator.image_metrics(self.ema.model, self.step, self.run_dir / "eval"))
                if logger is not None and evaluator.last_grid is not None:
                    logger.log_images(self.step, "eval/grid", [evaluator.last_grid])
        if values and logger is not None:
            values["eval/seconds"] = time.perf_counter() - t0  # what this evaluation cost the run
            values["images_seen"] = self.samples_seen  # for the time to a target (mmdit.eval.time_to_target)
            logger.log(self.step, values)

    def _device_busy(self) -> bool:
        """Whether the device still has queued work (a non-blocking query; always False on the CPU)."""
        return self.device.type == "cuda" and not torch.cuda.current_stream(self.device).query()

    def _report(self, logger: MetricsLogger | None, grad_norm: torch.Tensor, loss_by_t: LossByT, source,
                peak: float, loader_busy: float) -> None:
        """Every model rank: the balance figures and losses of the window (one small all-gather, the log's
        one host read); the first model rank logs them."""
        window = self.window
        elapsed = window.elapsed()
        mine = RankBalance(self.rt.rank, source.wait_s - window.wait_start, elapsed,
                           self.rt.topology.loader_of(self.rt.rank), loader_busy, float(window.loss), window.n)
        group = self.rt.model_group if self.rt.distributed else None
        ranks = gather_balance(mine, group, self.rt.num_model_ranks)
        repa = self.repa.report(group, self.rt.num_model_ranks) if self.repa is not None else {}
        if logger is not None:
            warning = self.balance.update(self.step, self.step - window.step, ranks)
            if warning:
                log.warning("%s", warning)
            values = {
                "loss": mean_loss(ranks),  # every model rank's micro-steps
                **repa,  # repa_loss: the REPA term's mean (unweighted), while it is on
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "skipped_steps": self.skipped,
                "corrupt_images": self.corrupt,
                **loss_by_t.report(),
                **window.pauses,
                **window.throughput(self.rt.num_model_ranks, peak),
            }
            if window.images:  # the data wait of the training time in the window
                values["data_wait_frac"] = max(r.wait_s / max(1e-9, r.elapsed_s) for r in ranks)  # most-waiting
                values.update(balance_metrics(ranks))
            if self.device.type == "cuda":
                values["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            logger.log(self.step, values)
        window.reset(source.wait_s, self.step)
