"""The CPU demo end to end: shapes data -> create_phase -> create_indices -> torchrun training (1 loader rank
+ 1 model rank, pixel space, the offline MiniLM text encoder) -> EMA samples, a denoising gif, the loss curve,
and a score of colour / shape / position on seen and held-out colour x shape combinations.

    python -m mmdit demo            # the full recipe (~12.5 minutes on 2 CPU cores)
    python -m mmdit demo --quick    # a one-minute smoke run of the same pipeline (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .config import REPO_ROOT, load_config
from .data.shapes import COLOURS, DEFAULT_HOLDOUT, POSITIONS, SHAPES, SIZE_FRACTION

# The recipe: what the default demo trains (the model is configs/tiny.yaml). Chosen so that colour >= 95% and
# shape >= 85% on seen combinations after the default run (see README, "The CPU demo"). max_aspect: the demo
# images are near-square (4:5 to 5:4), so at 32 px they all land in the 32x32 bucket; with the general 1:2 to
# 2:1 mix, 58% of them became 32x16 or 16x32 pictures whose shapes were 5-6 px across, and shape accuracy
# stayed at chance.
FULL = {"rows": 6000, "steps": 3000, "batch": 32, "max_aspect": 1.25}
QUICK = {"rows": 300, "steps": 12, "batch": 8, "max_aspect": 1.25}


def prompt_sets(holdout=DEFAULT_HOLDOUT) -> dict[str, list[dict]]:
    """Seen and held-out colour x shape combinations, each at a few positions, as expected attributes."""
    held = set(map(tuple, holdout))
    seen, held_out = [], []
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            target = held_out if (colour, shape) in held else seen
            for k in range(2 if (colour, shape) not in held else len(POSITIONS)):
                position = POSITIONS[(ci + si + 2 * k) % len(POSITIONS)]
                target.append({"colour": colour, "shape": shape, "position": position, "size": "large"})
    return {"seen": seen, "held_out": held_out}


def caption(attrs: dict) -> str:
    from .data.shapes import POSITION_PHRASES

    return f"a large {attrs['colour']} {attrs['shape']} {POSITION_PHRASES[attrs['position']]} of a black background"


def _step(msg: str) -> float:
    print(f"\n==> {msg}", flush=True)
    return time.perf_counter()


def prepare_data(out: Path, rows: int, resolution: int, max_aspect: float) -> tuple[Path, Path]:
    """Shapes data -> create_phase -> create_indices under ``out``, reusing an earlier run's data if it matches."""
    from .data.demo_dataset import make_demo_dataset
    from .data.indices import create_indices
    from .data.phase import create_phase

    raw, phase, index = out / "raw", out / "phase", out / "bucket_indices.npz"
    info = raw / "demo_dataset.json"
    wanted = {"num_rows": rows, "max_aspect": max_aspect, "size_fraction": SIZE_FRACTION}
    found = json.loads(info.read_text()) if info.exists() else {}
    if any(found.get(k) != v for k, v in wanted.items()):
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(phase, ignore_errors=True)
        make_demo_dataset(raw, num_rows=rows, rows_per_shard=500, seed=0, max_aspect=max_aspect)
    create_phase(raw, phase, max_resolution=resolution, n_proc=1, progress=False)
    create_indices(phase, index)
    return phase, index


def train(out: Path, phase: Path, index: Path, steps: int, batch: int, extra: list[str]) -> Path:
    """torchrun with 2 processes: rank 0 loads (decode + MiniLM), rank 1 trains."""
    overrides = [
        f"data.parquet_folder={phase}", f"data.bucket_indices_path={index}", f"data.batch_size={batch}",
        f"train.save_dir={out / 'models'}", f"train.total_steps={steps}", f"train.save_every={max(steps // 2, 1)}",
        "topology.loader_to_model={0: [1]}", "train.resume=none", *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(REPO_ROOT / "src" / "train.py"), "--config", "tiny", *overrides]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO_ROOT)
    return out / "models" / "tiny"


def plot_loss(run_dir: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_yscale("log")  # the first 100 steps fall 30x; the shape-learning part is the slow tail
    ax.set_ylabel("rectified-flow loss (velocity MSE)")
    ax.set_title("CPU demo: tiny MMDiT on shapes")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_and_score(run_dir: Path, out: Path, images_dir: Path, num_steps: int) -> dict:
    from .inference import Pipeline, image_grid, save_gif
    from .score import score_images

    pipe = Pipeline.from_checkpoint(run_dir, device="cpu")
    res = pipe.cfg.model.max_res
    results = {}
    for name, attrs in prompt_sets().items():
        prompts = [caption(a) for a in attrs]
        images = pipe.generate(prompts, width=res, height=res, num_steps=num_steps, seed=0, batch_size=16)
        grid = image_grid(images, cols=6)
        grid.resize((grid.width * 3, grid.height * 3), 0).save(images_dir / f"demo_{name}.png")
        results[name] = score_images(list(zip(images, attrs)), holdout=())
    gif_prompt = caption({"colour": "green", "shape": "triangle", "position": "left"})
    _, frames = pipe.generate([gif_prompt], width=res, height=res, num_steps=num_steps, seed=1, return_frames=True)
    save_gif([f.resize((192, 192), 0) for f in frames[0]], images_dir / "demo_denoising.gif")
    return results


def print_table(scores: dict) -> None:
    print("\n  combinations     n  colour  shape  position  all")
    for name, s in scores.items():
        print(f"  {name:<12} {s['n']:>5}  {s['colour']:>6.1%}  {s['shape']:>5.1%}  {s['position']:>8.1%}  "
              f"{s['all']:>4.0%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmdit demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run (CI)")
    parser.add_argument("--out", default=str(REPO_ROOT / "demo_out"), help="working folder (data, checkpoints)")
    parser.add_argument("--images", default=None, help="where the pictures go (default: selected_images/, "
                        "or <out>/images with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("overrides", nargs="*", help="extra training config overrides")
    args = parser.parse_args(argv)
    recipe = dict(QUICK if args.quick else FULL)
    if args.steps:
        recipe["steps"] = args.steps
    out = Path(args.out)
    images_dir = Path(args.images) if args.images else (out / "images" if args.quick else REPO_ROOT / "selected_images")
    out.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    res = load_config("tiny").model.max_res
    t = _step(f"data: {recipe['rows']} shapes images -> aspect buckets <= {res} px -> bucket index")
    phase, index = prepare_data(out, recipe["rows"], res, recipe["max_aspect"])
    print(f"    {time.perf_counter() - t:.1f}s")
    t = _step(f"train {recipe['steps']} steps, batch {recipe['batch']} (torchrun: 1 loader rank + 1 model rank)")
    run_dir = train(out, phase, index, recipe["steps"], recipe["batch"], args.overrides)
    print(f"    {time.perf_counter() - t:.1f}s")
    t = _step("sample from the EMA weights and score colour / shape / position")
    plot_loss(run_dir, images_dir / "demo_loss.png")
    scores = sample_and_score(run_dir, out, images_dir, num_steps=8 if args.quick else 24)
    (images_dir / "demo_scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    print(f"    {time.perf_counter() - t:.1f}s")
    print_table(scores)
    print(f"\nimages, gif, loss curve and scores: {images_dir}")
    print(f"checkpoints: {run_dir}   total: {time.perf_counter() - t_start:.0f}s")
