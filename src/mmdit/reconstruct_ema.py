"""``python -m mmdit ema``: post-hoc EMA (EDM2) — the weights of any EMA length, chosen after training.

    python -m mmdit ema --run models/run --stds 0.05,0.08,0.12                       # reconstruct, report
    python -m mmdit ema --run models/run --stds 0.03,0.05,0.08,0.12,0.18 --eval_set data/eval_256
    python -m mmdit ema --run models/run --stds 0.08 --output models/run_phema [--export exported/phema]

The run must have trained with ``train.phema.enabled=true`` (snapshots in ``<run>/phema/``). Each wanted
length (a relative std, e.g. 0.08 = an EMA 8 % as long as the training so far) is the least-squares
combination of the snapshots up to ``--images`` (default: the newest snapshot's time), coefficients
normalised to sum to 1 (:mod:`mmdit.train.phema`). With ``--eval_set`` every length is scored by the
fixed-grid validation loss (:mod:`mmdit.eval.validation_loss`) and the lowest is chosen. ``--output`` writes
the chosen (or the only) weights as a normal checkpoint ``<output>/step_<N>`` (model and EMA weights both the
reconstruction, the run's config; no optimizer state: evaluate, sample, export or ``train.init_from`` it),
``--export`` also as a Hub-style folder. A JSON summary goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file

from .train.phema import profile_residual, solve_posthoc_coefficients
from .train.phema_tracker import list_snapshots

log = logging.getLogger(__name__)


def select_snapshots(snapshots: list[dict], images: Optional[int] = None,
                     from_stds: Optional[list[float]] = None) -> tuple[list[dict], int]:
    """The snapshots a reconstruction at time ``images`` uses (all up to it, optionally of some stds only) and
    that time (default: the newest snapshot's; it must be one of the snapshots' times)."""
    if from_stds is not None:
        snapshots = [s for s in snapshots if any(abs(s["std"] - f) < 5e-4 for f in from_stds)]
    if not snapshots:
        raise ValueError("no post-hoc EMA snapshots found (train with train.phema.enabled=true; --from_stds "
                         "must name tracked stds)")
    times = sorted({s["images"] for s in snapshots})
    if images is None:
        images = times[-1]
    elif images not in times:
        raise ValueError(f"--images {images} is no snapshot time; choose one of {times}")
    return [s for s in snapshots if 0 < s["images"] <= images], images


@torch.no_grad()
def reconstruct(snapshots: list[dict], images: int, out_stds: list[float]) -> tuple[list[dict], np.ndarray,
                                                                                     np.ndarray]:
    """fp32 weights for each wanted std at time ``images``, the coefficients [snapshot, out] and each
    reconstruction's profile residual (:func:`profile_residual`). Streams over the snapshot files."""
    in_t = np.array([s["images"] for s in snapshots], dtype=np.float64)
    in_std = np.array([s["std"] for s in snapshots], dtype=np.float64)
    coefs = solve_posthoc_coefficients(in_t, in_std, float(images), np.array(out_stds, dtype=np.float64))
    residual = profile_residual(in_t, in_std, float(images), np.array(out_stds, dtype=np.float64), coefs)
    out: list[dict] = [{} for _ in out_stds]
    for i, snap in enumerate(snapshots):
        tensors = load_file(str(snap["path"]))
        for j, acc in enumerate(out):
            for name, t in tensors.items():
                if name not in acc:
                    acc[name] = torch.zeros(t.shape, dtype=torch.float32)
                acc[name].add_(t.float(), alpha=float(coefs[i, j]))
    return out, coefs, residual


def write_checkpoint(weights: dict, run_dir: Path, output: Path, std: float, images: int,
                     snapshots: list[dict]) -> Path:
    """The reconstruction as a normal step folder ``<output>/step_<N>`` (N: the step of the snapshots used)."""
    from .checkpoint_loading import read_checkpoint_config, resolve_checkpoint
    from .train import checkpoint as ckpt

    cfg = read_checkpoint_config(resolve_checkpoint(run_dir))
    step = max(s["step"] for s in snapshots if s["images"] == images)
    state = {"step": step, "samples_seen": images,
             "phema": {"std": std, "images": images, "snapshots": [s["path"].name for s in snapshots]}}
    return ckpt.save_checkpoint(output, step, model_state=weights, ema_state=weights, optimizer_state=None,
                                scheduler_state=None, scaler_state=None, trainer_state=state, config=cfg,
                                keep_last=0)


def sweep_validation_loss(candidates: dict[float, dict], run_dir: Path, eval_set: str,
                          extra: list[str]) -> dict[float, float]:
    """``{std: val loss}`` of each reconstruction on the fixed-grid validation loss of ``eval_set``."""
    from .checkpoint_loading import resolve_checkpoint
    from .eval.evaluate import eval_config
    from .eval.evaluator import Evaluator
    from .model import MMDiT

    keys = ("index", "loss_samples", "num_images", "num_timesteps", "batch_size", "dino", "clip", "seed")
    args = argparse.Namespace(eval_set=eval_set, overrides=extra, **{k: None for k in keys})
    cfg = eval_config(resolve_checkpoint(run_dir), args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    evaluator = Evaluator(cfg, device)
    model = MMDiT(cfg.model).to(device)
    losses = {}
    for std, weights in candidates.items():
        model.load_state_dict(weights)
        losses[std] = evaluator.validation_loss(model, -1, tag="phema")["val/phema/loss"]
        log.info("std %.3f: validation loss %.6f", std, losses[std])
    return losses


def parse_stds(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmdit ema", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the run folder (its phema/ snapshots and checkpoints)")
    parser.add_argument("--stds", required=True, type=parse_stds, help="comma-separated EMA stds to reconstruct")
    parser.add_argument("--images", type=int, default=None, help="snapshot time to reconstruct at (default newest)")
    parser.add_argument("--from_stds", type=parse_stds, default=None, help="use only snapshots of these stds")
    parser.add_argument("--eval_set", help="held-out parquet folder: choose the std with the lowest validation loss")
    parser.add_argument("--output", help="write the chosen weights as a checkpoint <output>/step_<N>")
    parser.add_argument("--export", help="also write them as a Hub-style folder (python -m mmdit export)")
    parser.add_argument("overrides", nargs="*", help="config key.sub=value overrides for the evaluation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_dir = Path(args.run)
    snapshots, images = select_snapshots(list_snapshots(run_dir), args.images, args.from_stds)
    weights, coefs, residual = reconstruct(snapshots, images, args.stds)
    summary: dict = {"images": images, "snapshots": len(snapshots),
                     "stds": {f"{s:.4f}": {"profile_residual": float(r), "sum_abs_coef": float(np.abs(c).sum())}
                              for s, r, c in zip(args.stds, residual, coefs.T)}}
    chosen = args.stds[0]
    if args.eval_set:
        losses = sweep_validation_loss(dict(zip(args.stds, weights)), run_dir, args.eval_set, args.overrides)
        for s, loss in losses.items():
            summary["stds"][f"{s:.4f}"]["val_loss"] = loss
        chosen = min(losses, key=losses.get)
    elif len(args.stds) > 1 and (args.output or args.export):
        parser.error("several --stds and --output/--export: give --eval_set to choose one, or a single std")
    summary["chosen_std"] = chosen
    if args.output or args.export:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:  # --export alone: the checkpoint is only a way there
            out_dir = Path(args.output) if args.output else Path(scratch)
            step_dir = write_checkpoint(weights[args.stds.index(chosen)], run_dir, out_dir, chosen, images,
                                        snapshots)
            if args.output:
                summary["checkpoint"] = str(step_dir)
            if args.export:
                from .export import export_pretrained

                summary["export"] = str(export_pretrained(step_dir, args.export, ema=True))
    print(json.dumps(summary, indent=1))
    return 0
