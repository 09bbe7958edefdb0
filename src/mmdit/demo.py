"""The CPU demo end to end: shapes data -> create_phase -> create_indices -> torchrun training (1 loader rank
+ 1 model rank, pixel space, the offline MiniLM text encoder) with held-out evaluation in the loop (validation
loss at fixed timesteps, and the shapes scorer on images generated from held-out captions) -> EMA samples, a
denoising gif, the training / validation / score curves, and a score of colour / shape / position / size /
background over every background and both sizes, on seen and held-out colour x shape combinations.

    python -m mmdit demo              # the full recipe (~12 minutes on 2 CPU cores)
    python -m mmdit demo --quick      # a one-minute smoke run of the same pipeline (CI)
    python -m mmdit demo --data emoji # the real latent path: Noto emoji, TAEF2 latents (mmdit.demo_emoji)

Everything is written under demo_out/ (git-ignored; the run prints where), so a run leaves the checkout
clean. ``--publish`` (maintainers) also copies the pictures to selected_images/ and rewrites the README's
tables between the ``<!-- demo-table -->`` markers.
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
from .data.shapes import (
    BACKGROUNDS,
    COLOURS,
    DEFAULT_HOLDOUT,
    POSITIONS,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    ShapeSpec,
    caption_long,
)
from .train.muon import cpu_has_bf16_matmul

# The recipe: what the default demo trains (the model is configs/tiny.yaml), sized to finish within 15 minutes
# from a fresh clone on 2 CPU cores with its evaluation (README, "The CPU demo", has the accuracy of the recipes
# tried, and what fewer steps cost). max_aspect: the demo images are near-square (4:5 to 5:4), so at 32 px they
# all land in the 32x32 bucket; with the general 1:2 to 2:1 mix, 58% of them became 32x16 or 16x32 pictures
# whose shapes were 5-6 px across, and shape accuracy stayed at chance. optimizer: Muon for the blocks' matrices
# won the ablation at this preset (bench/efficiency.py, 2 seeds: held-out validation loss 0.025 vs 0.034 after
# 2,000 steps, AdamW's final loss reached at step 1,250; README, "Training methods"), on CPUs with bf16 matrix
# units; elsewhere torch's bf16 Newton-Schulz makes a step ~6x dearer and the demo keeps AdamW (main()).
FULL = {"rows": 6000, "steps": 2000, "batch": 32, "max_aspect": 1.25, "optimizer": "muon",
        "eval_rows": 64, "loss_every": 250, "images_every": 500, "num_images": 48}
QUICK = {"rows": 300, "steps": 12, "batch": 8, "max_aspect": 1.25, "optimizer": "muon",
         "eval_rows": 24, "loss_every": 6, "images_every": 12, "num_images": 8}
# The held-out eval set: its own rows (another seed), every colour x shape combination (none held out), so the
# in-loop score covers every background, both sizes and the combinations the training data never shows.
EVAL_SEED = 1
README_BEGIN, README_END = "<!-- demo-table -->", "<!-- /demo-table -->"


def prompt_sets(holdout=DEFAULT_HOLDOUT) -> dict[str, list[dict]]:
    """The scored prompts, as expected attributes: every colour x shape combination on every background at
    both sizes, positions cycling; seen combinations once each (144 prompts), held-out ones twice (48)."""
    held = set(map(tuple, holdout))
    seen, held_out = [], []
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            is_held = (colour, shape) in held
            for bi, background in enumerate(BACKGROUNDS):
                for zi, size in enumerate(SIZES):
                    for k in range(2 if is_held else 1):
                        position = POSITIONS[(ci + si + bi + 2 * zi + 3 * k) % len(POSITIONS)]
                        (held_out if is_held else seen).append(
                            {"colour": colour, "shape": shape, "position": position, "size": size,
                             "background": background})
    return {"seen": seen, "held_out": held_out}


def caption(attrs: dict) -> str:
    """The long training caption of these attributes (``shapes.caption_long``)."""
    return caption_long(ShapeSpec(attrs["shape"], attrs["colour"], attrs["position"], attrs.get("size", "large"),
                                  attrs.get("background", "black")))


def _step(msg: str) -> float:
    print(f"\n==> {msg}", flush=True)
    return time.perf_counter()


def prepare_data(out: Path, rows: int, resolution: int, max_aspect: float, seed: int = 0, holdout=DEFAULT_HOLDOUT,
                 name: str = "") -> tuple[Path, Path]:
    """Shapes data -> create_phase -> create_indices under ``out`` (``<name>raw``, ``<name>phase``), reusing an
    earlier run's data if it matches."""
    from .data.demo_dataset import make_demo_dataset
    from .data.indices import create_indices
    from .data.phase import create_phase

    raw, phase = out / f"{name}raw", out / f"{name}phase"
    index = phase / "bucket_indices.npz" if name else out / "bucket_indices.npz"
    info = raw / "demo_dataset.json"
    wanted = {"num_rows": rows, "max_aspect": max_aspect, "size_fraction": SIZE_FRACTION, "seed": seed,
              "holdout": [list(p) for p in holdout]}
    found = json.loads(info.read_text()) if info.exists() else {}
    if any(found.get(k) != v for k, v in wanted.items()):
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(phase, ignore_errors=True)
        make_demo_dataset(raw, num_rows=rows, rows_per_shard=500, seed=seed, holdout=holdout, max_aspect=max_aspect)
    create_phase(raw, phase, max_resolution=resolution, n_proc=1, progress=False)
    create_indices(phase, index)
    return phase, index


def eval_overrides(eval_phase: Path, recipe: dict) -> list[str]:
    """The in-loop evaluation of the demo: validation loss (EMA and raw weights) and the shapes scorer."""
    return [f"eval.parquet_folder={eval_phase}", f"eval.loss_every={recipe['loss_every']}",
            f"eval.images_every={recipe['images_every']}", f"eval.loss_samples={recipe['eval_rows']}",
            f"eval.num_images={recipe['num_images']}", "eval.image_metrics=[shapes]", "eval.loss_weights=[ema,model]",
            "eval.batch_size=48", "eval.grid_images=16"]


def train(out: Path, phase: Path, index: Path, steps: int, batch: int, extra: list[str], config: str = "tiny") -> Path:
    """torchrun with 2 processes: rank 0 loads (decode + MiniLM, or reads a cache), rank 1 trains."""
    overrides = [
        f"data.parquet_folder={phase}", f"data.bucket_indices_path={index}", f"data.batch_size={batch}",
        f"train.save_dir={out / 'models'}", f"train.total_steps={steps}", f"train.save_every={max(steps // 2, 1)}",
        "topology.loader_to_model={0: [1]}", "train.resume=none", *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(REPO_ROOT / "src" / "train.py"), "--config", config, *overrides]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO_ROOT)
    return out / "models" / load_config(config).train.run_name


def eval_curve(run_dir: Path) -> list[dict]:
    """The in-loop evaluations of the run, one row per step: validation losses and shapes scores."""
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        found = {k: v for k, v in record.items() if k.startswith(("val/", "eval/"))}
        if found:
            rows.setdefault(record["step"], {"step": record["step"]}).update(found)
    return [rows[s] for s in sorted(rows)]


CURVE_COLUMNS = (("val/ema/loss", "val loss (EMA)", "{:.4f}"), ("val/model/loss", "val loss (raw)", "{:.4f}"),
                 ("eval/shapes/colour", "colour", "{:.0%}"), ("eval/shapes/shape", "shape", "{:.0%}"),
                 ("eval/shapes/position", "position", "{:.0%}"), ("eval/shapes/size", "size", "{:.0%}"),
                 ("eval/shapes/background", "background", "{:.0%}"), ("eval/shapes/all", "all", "{:.0%}"))


def curve_table(curve: list[dict]) -> list[list[str]]:
    """Rows of [step, then each of CURVE_COLUMNS] ('' where that step did not compute it)."""
    return [[str(row["step"])] + [fmt.format(row[key]) if key in row else "" for key, _, fmt in CURVE_COLUMNS]
            for row in curve]


def plot_curves(run_dir: Path, path: Path) -> None:
    """Training loss, validation loss and the in-loop shapes scores against steps, side by side."""
    from .eval.plot import plot_run

    plot_run(run_dir, path, title="CPU demo: tiny MMDiT on shapes (held-out eval set in the loop)")


def sample_and_score(run_dir: Path, out: Path, images_dir: Path, num_steps: int) -> dict:
    from .inference import Pipeline, image_grid, save_gif
    from .score import score_images

    pipe = Pipeline.from_checkpoint(run_dir, device="cpu")
    res = pipe.cfg.model.max_res
    results = {}
    for name, attrs in prompt_sets().items():
        prompts = [caption(a) for a in attrs]
        images = pipe.generate(prompts, width=res, height=res, num_steps=num_steps, seed=0, batch_size=48)
        grid = image_grid(images, cols=16 if name == "seen" else 8)
        grid.resize((grid.width * 2, grid.height * 2), 0).save(images_dir / f"demo_{name}.png")
        results[name] = score_images(list(zip(images, attrs)), holdout=())
        for size in ("large", "small"):
            part = [(im, a) for im, a in zip(images, attrs) if a["size"] == size]
            results[f"{name}_{size}"] = score_images(part, holdout=())
    gif_prompt = caption({"colour": "green", "shape": "triangle", "position": "left"})
    _, frames = pipe.generate([gif_prompt], width=res, height=res, num_steps=num_steps, seed=1, return_frames=True)
    save_gif([f.resize((192, 192), 0) for f in frames[0]], images_dir / "demo_denoising.gif")
    return results


SCORE_COLUMNS = ("colour", "shape", "position", "size", "background", "all")
SCORE_ROWS = (("seen", "seen"), ("seen_large", "seen, large"), ("seen_small", "seen, small"),
              ("held_out", "held out (never in the data)"), ("held_out_large", "held out, large"),
              ("held_out_small", "held out, small"))


def print_table(scores: dict, curve: list[dict]) -> None:
    print("\n  in-loop evaluation (held-out eval set; score: images generated from its captions)")
    print("  " + "  ".join(f"{h:>14}" for h in ["step"] + [title for _, title, _ in CURVE_COLUMNS]))
    for row in curve_table(curve):
        print("  " + "  ".join(f"{v:>14}" for v in row))
    print(f"  in-loop evaluation time: {sum(row.get('eval/seconds', 0.0) for row in curve):.0f}s")
    print("\n  final prompts (every background, both sizes)")
    print("  " + f"{'combinations':<30}{'n':>5}" + "".join(f"{c:>12}" for c in SCORE_COLUMNS))
    for key, title in SCORE_ROWS:
        s = scores[key]
        print("  " + f"{title:<30}{s['n']:>5}" + "".join(f"{s.get(c, 0):>12.1%}" for c in SCORE_COLUMNS))


def markdown_tables(scores: dict, curve: list[dict], recipe: dict, seconds: float) -> str:
    """The README's demo tables, as written by the run that measured them."""
    eval_s = sum(row.get("eval/seconds", 0.0) for row in curve)
    lines = [f"Written by `python -m mmdit demo` itself ({recipe['steps']} steps of {recipe['batch']}, "
             f"{seconds / 60:.1f} minutes in all on this run's machine, {eval_s:.0f} s of it the in-loop "
             "evaluation).", "",
             f"In the loop, on the held-out eval set ({recipe['eval_rows']} rows of another seed, every colour x "
             f"shape combination, every background and size): validation loss at 8 fixed timesteps, and the "
             f"scorer on {recipe['num_images']} images generated from its captions:", "",
             "| step | " + " | ".join(title for _, title, _ in CURVE_COLUMNS) + " |",
             "| --- " * (len(CURVE_COLUMNS) + 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in curve_table(curve)]
    lines += ["", f"At the end, on the {scores['seen']['n'] + scores['held_out']['n']} demo prompts (every seen "
              "colour x shape combination on every background at both sizes; every held-out one twice):", "",
              "| combinations | images | " + " | ".join(SCORE_COLUMNS) + " |",
              "| --- " * (len(SCORE_COLUMNS) + 2) + "|"]
    for key, title in SCORE_ROWS:
        s = scores[key]
        lines.append(f"| {title} | {s['n']} | " + " | ".join(f"{s.get(c, 0):.1%}".replace("%", " %")
                                                              for c in SCORE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, table: str, begin: str = README_BEGIN, end: str = README_END) -> bool:
    """Replace the text between the ``begin`` / ``end`` markers; False (and nothing written) if they are missing."""
    text = readme.read_text() if readme.is_file() else ""
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{table}{end}{tail}")
    return True


def publish(images_dir: Path, table: str, begin: str = README_BEGIN, end: str = README_END,
            target: Path = REPO_ROOT / "selected_images", readme: Path = REPO_ROOT / "README.md") -> None:
    """``--publish``: copy the run's pictures and scores to ``target`` (selected_images/) and rewrite the
    README's tables between ``begin`` and ``end`` (what a maintainer commits after a run worth showing)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(images_dir.iterdir()):
        if path.is_file() and path.suffix in (".png", ".gif", ".json", ".md"):
            shutil.copy2(path, target / path.name)
    print(f"published: {images_dir} -> {target}")
    if update_readme(readme, table, begin, end):
        print(f"{readme.name}: tables rewritten from this run")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmdit demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run (CI)")
    parser.add_argument("--out", default=str(REPO_ROOT / "demo_out"), help="working folder (data, checkpoints)")
    parser.add_argument("--images", default=None, help="where the pictures go (default: <out>/images)")
    parser.add_argument("--publish", action="store_true", help="maintainers: also copy the pictures to "
                        "selected_images/ and rewrite the README's demo tables from this run")
    parser.add_argument("--data", choices=("shapes", "emoji"), default="shapes",
                        help="shapes (pixel space, drawn shapes) or emoji (real images, TAEF2 latents)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--taef2", default=None, help="emoji: folder with taef2_encoder.pth + taef2_decoder.pth "
                        "(default: ../shared/assets/taef2)")
    parser.add_argument("--emoji_source", default=None, help="emoji: an unpacked emoji-datasource-google package/ "
                        "folder (default: fetched once with npm into ~/.cache/mmdit)")
    parser.add_argument("overrides", nargs="*", help="extra training config overrides")
    args = parser.parse_args(argv)
    if args.data == "emoji":
        from .data.emoji import EmojiSourceError
        from .demo_emoji import MissingAssetError, run_emoji_demo

        try:
            run_emoji_demo(args)
        except (MissingAssetError, EmojiSourceError) as err:
            raise SystemExit(f"error: {err}") from None
        return
    recipe = dict(QUICK if args.quick else FULL)
    if recipe["optimizer"] == "muon" and not cpu_has_bf16_matmul():
        recipe["optimizer"] = "adamw"
        print("note: this CPU has no bf16 matrix units (avx512_bf16 / amx_bf16); torch's Muon runs Newton-Schulz in "
              "bf16, ~6 demo steps of work per step on such a CPU, so the demo trains with AdamW (README, "
              "'Training methods')", flush=True)
    if args.steps:
        recipe["steps"] = args.steps
    out = Path(args.out)
    images_dir = Path(args.images) if args.images else out / "images"
    out.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    res = load_config("tiny").model.max_res
    t = _step(f"data: {recipe['rows']} shapes images -> aspect buckets <= {res} px -> bucket index; "
              f"eval set: {recipe['eval_rows']} more (another seed, no combination held out)")
    phase, index = prepare_data(out, recipe["rows"], res, recipe["max_aspect"])
    eval_phase, _ = prepare_data(out, recipe["eval_rows"], res, recipe["max_aspect"], seed=EVAL_SEED, holdout=(),
                                 name="eval_")
    print(f"    {time.perf_counter() - t:.1f}s")
    t = _step(f"train {recipe['steps']} steps, batch {recipe['batch']} (torchrun: 1 loader rank + 1 model rank), "
              f"validation loss every {recipe['loss_every']}, scorer every {recipe['images_every']}")
    run_dir = train(out, phase, index, recipe["steps"], recipe["batch"],
                    [f"train.optimizer={recipe['optimizer']}", *eval_overrides(eval_phase, recipe), *args.overrides])
    print(f"    {time.perf_counter() - t:.1f}s")
    t = _step("sample from the EMA weights and score colour / shape / position / size / background")
    plot_curves(run_dir, images_dir / "demo_curves.png")
    scores = sample_and_score(run_dir, out, images_dir, num_steps=8 if args.quick else 24)
    curve = eval_curve(run_dir)
    (images_dir / "demo_scores.json").write_text(json.dumps({"final": scores, "in_loop": curve}, indent=2) + "\n")
    print(f"    {time.perf_counter() - t:.1f}s")
    print_table(scores, curve)
    from .eval.time_to_target import describe_time_to_target  # MLPerf-style: first eval with val loss <= target

    print("  " + describe_time_to_target(run_dir, 0.05))
    seconds = time.perf_counter() - t_start
    table = markdown_tables(scores, curve, recipe, seconds)
    (images_dir / "demo_tables.md").write_text(table)
    print(f"\nimages, gif, curves and scores: {images_dir}")
    if args.publish:
        publish(images_dir, table, README_BEGIN, README_END)
    print(f"checkpoints: {run_dir}   total: {seconds:.0f}s")
