"""``python -m mmdit evaluate``: the in-loop metrics for any checkpoint, as JSON and CSV, and a plot.

    python -m mmdit evaluate --checkpoint models/run/step_00010000 --eval_set data/eval_256
    python -m mmdit evaluate --checkpoint models/run --all_steps --eval_set data/eval_256   # every step
    python -m mmdit evaluate --plot models/run                                            # metrics.png
    python -m mmdit evaluate --time_to_target models/run --target 0.05       # MLPerf-style time to a target

Results go to ``<run>/eval/step_<N>_<weights>.json`` and one row per (step, weights) in
``<run>/eval/metrics.csv`` (and ``metrics.jsonl``), so steps and runs can be compared after the fact.
Settings not given come from the checkpoint's ``eval`` config; ``key=value`` overrides any config key.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import time
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint_loading import load_model, resolve_checkpoint
from ..config import Config, read_config
from .eval_set import INDEX_NAME
from .evaluator import Evaluator

log = logging.getLogger(__name__)


def step_dirs(path: Path, all_steps: bool) -> list[Path]:
    """The checkpoint itself, or with ``all_steps`` every complete ``step_<N>`` of a run folder, oldest first."""
    from ..train.checkpoint import MARKER, STEP_DIR_RE

    if not all_steps:
        return [resolve_checkpoint(path)]
    found = sorted((int(m.group(1)), d) for d in Path(path).iterdir()
                   if (m := STEP_DIR_RE.match(d.name)) and (d / MARKER).is_file())
    if not found:
        raise FileNotFoundError(f"{path} has no complete step_<N> checkpoint folders; pass one with --checkpoint")
    return [d for _, d in found]


def eval_config(step_dir: Path, args: argparse.Namespace) -> Config:
    """The checkpoint's config with the eval set and the command-line settings applied."""
    from ..train.checkpoint import CONFIG_FILE

    overrides = [f"eval.parquet_folder={args.eval_set}"]
    for key in ("index", "loss_samples", "num_images", "num_timesteps", "batch_size", "dino", "clip", "seed"):
        if getattr(args, key) is not None:
            overrides.append(f"eval.{key}={getattr(args, key)}")
    merged = read_config(step_dir / CONFIG_FILE, overrides + list(args.overrides))
    index = Path(merged.eval.index or Path(merged.eval.parquet_folder) / INDEX_NAME)
    if not index.is_file():
        from ..data.indices import create_indices

        log.info("building the eval set index %s", index)
        create_indices(merged.eval.parquet_folder, index)
    return merged


def evaluate_checkpoint(step_dir: Path, cfg: Config, weights: list[str], images: bool,
                        device: torch.device, evaluator: Optional[Evaluator] = None) -> tuple[list[dict], Evaluator]:
    """One row of metrics per weights file of a step directory (the evaluator is reused across steps)."""
    evaluator = evaluator or Evaluator(cfg, device)
    step = int(m.group(1)) if (m := re.match(r"step_(\d+)$", step_dir.name)) else -1
    rows = []
    for which in weights:
        t0 = time.perf_counter()
        model, _, _ = load_model(step_dir, weights=which, device=device, dtype=torch.float32)
        values = evaluator.validation_loss(model, step, tag=which)
        if images:
            values.update(evaluator.image_metrics(model, step, step_dir.parent / "eval"))
        values = {k.replace(f"val/{which}/", "val/"): v for k, v in values.items()}
        rows.append({"step": step, "weights": which, "checkpoint": str(step_dir),
                     "eval_s": round(time.perf_counter() - t0, 2), **values})
        del model
    return rows, evaluator


def write_results(rows: list[dict], out_dir: Path) -> Path:
    """Per-row JSON files, appended JSON lines, and the CSV rewritten from all lines (union of columns)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = out_dir / "metrics.jsonl"
    with lines.open("a") as f:
        for row in rows:
            (out_dir / f"step_{row['step']:08d}_{row['weights']}.json").write_text(json.dumps(row, indent=1))
            f.write(json.dumps(row) + "\n")
    records = [json.loads(line) for line in lines.read_text().splitlines() if line.strip()]
    columns = list(dict.fromkeys(k for r in records for k in r))
    with (out_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    return out_dir / "metrics.csv"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmdit evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a step_<N> folder, or a run folder (its newest, or --all_steps)")
    parser.add_argument("--eval_set", help="held-out parquet folder (index: <folder>/bucket_indices.npz, built "
                        "if missing, or --index)")
    parser.add_argument("--all_steps", action="store_true", help="evaluate every complete step of the run folder")
    parser.add_argument("--weights", default="ema", choices=["ema", "model", "both"])
    parser.add_argument("--no_images", action="store_true", help="validation loss only (no sampling, no FD/CLIP)")
    parser.add_argument("--plot", metavar="RUN_DIR", help="draw <RUN_DIR>'s metrics against steps to a PNG")
    parser.add_argument("--time_to_target", metavar="RUN_DIR", help="report the first step, images seen and "
                        "wall-clock at which <RUN_DIR>'s in-loop --target_key reached --target (MLPerf rule)")
    parser.add_argument("--target", type=float, help="the target value for --time_to_target")
    parser.add_argument("--target_key", default="val/ema/loss", help="the logged metric (default val/ema/loss)")
    parser.add_argument("--out", help="output folder (default <run>/eval) or, with --plot, the PNG path")
    parser.add_argument("--device", default=None)
    for key, kind in (("index", str), ("loss_samples", int), ("num_images", int), ("num_timesteps", int),
                      ("batch_size", int), ("dino", str), ("clip", str), ("seed", int)):
        parser.add_argument(f"--{key}", type=kind, default=None, help=f"eval.{key} (default: the checkpoint's)")
    parser.add_argument("overrides", nargs="*", help="config key.sub=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.plot:
        from .plot import plot_run

        print(plot_run(Path(args.plot), Path(args.out) if args.out else None))
        return 0
    if args.time_to_target:
        from .time_to_target import describe_time_to_target, read_records, time_to_target

        if args.target is None:
            parser.error("--time_to_target needs --target VALUE (e.g. --target 0.05 for val/ema/loss)")
        found = time_to_target(read_records(Path(args.time_to_target)), args.target, args.target_key)
        print(describe_time_to_target(Path(args.time_to_target), args.target, args.target_key))
        print(json.dumps(found.as_dict() if found else {"key": args.target_key, "target": args.target,
                                                        "reached": False}))
        return 0
    if not args.checkpoint or not args.eval_set:
        parser.error("give --checkpoint and --eval_set (or --plot RUN_DIR, or --time_to_target RUN_DIR)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = ["ema", "model"] if args.weights == "both" else [args.weights]
    dirs = step_dirs(Path(args.checkpoint), args.all_steps)
    evaluator, rows = None, []
    for step_dir in dirs:
        cfg = eval_config(step_dir, args)
        found, evaluator = evaluate_checkpoint(step_dir, cfg, weights, not args.no_images, device, evaluator)
        rows.extend(found)
        for row in found:
            print(json.dumps(row))
    out = write_results(rows, Path(args.out) if args.out else dirs[0].parent / "eval")
    print(f"wrote {out}")
    return 0
