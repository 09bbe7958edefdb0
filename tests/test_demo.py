"""A shortened `make demo`: the whole pipeline end to end in about a minute, checking what it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from PIL import Image

from mmdit.train.muon import cpu_has_bf16_matmul

ROOT = Path(__file__).resolve().parents[1]


def _tracked_state() -> str:
    """The bytes of what a demo must not touch: README.md and every file of selected_images/."""
    paths = [ROOT / "README.md", *sorted((ROOT / "selected_images").glob("*"))]
    return "".join(f"{p.name}:{hash(p.read_bytes())}\n" for p in paths if p.is_file())


def test_quick_demo_writes_images_gif_curves_scores_and_tables(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = _tracked_state()
    result = subprocess.run([sys.executable, "-m", "mmdit", "demo", "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _tracked_state() == before  # the checkout stays clean: only --publish writes README/selected_images
    config = yaml.safe_load(next((tmp_path / "models").glob("*/step_*/config.yaml")).read_text())
    # the recipe the ablation chose (bench/efficiency.py), where the CPU multiplies bf16 in hardware
    assert config["train"]["optimizer"] == ("muon" if cpu_has_bf16_matmul() else "adamw")
    images = tmp_path / "images"
    for name in ("demo_seen.png", "demo_held_out.png", "demo_curves.png"):
        assert Image.open(images / name).size[0] > 0
    gif = Image.open(images / "demo_denoising.gif")
    assert gif.n_frames >= 1  # Pillow merges identical frames: a 12-step model may still draw the same one
    scores = json.loads((images / "demo_scores.json").read_text())
    final = scores["final"]
    assert final["seen"]["n"] == 144 and final["held_out"]["n"] == 48  # every background, both sizes
    assert final["seen_small"]["n"] == final["seen_large"]["n"] == 72
    assert 0.0 <= final["seen"]["colour"] <= 1.0 and 0.0 <= final["held_out"]["background"] <= 1.0
    # the in-loop evaluation: validation loss every 6 steps (EMA and raw), the scorer at step 12
    steps = {row["step"]: row for row in scores["in_loop"]}
    assert sorted(steps) == [6, 12]
    assert steps[6]["val/ema/loss"] > 0 and steps[6]["val/model/loss"] > 0 and "eval/shapes/all" not in steps[6]
    assert 0.0 <= steps[12]["eval/shapes/shape"] <= 1.0
    tables = (images / "demo_tables.md").read_text()
    assert "| 6 |" in tables and "| 12 |" in tables and "held out, small" in tables
    out = result.stdout
    assert "in-loop evaluation" in out and "val loss (EMA)" in out and "held out (never in the data)" in out
    assert "README.md" not in out and "published" not in out  # only --publish rewrites the README
    assert f"images, gif, curves and scores: {images}" in out  # says where it wrote


def test_publish_copies_pictures_and_rewrites_the_tables(tmp_path):
    from mmdit.demo import README_BEGIN, README_END, publish

    run = tmp_path / "run"
    run.mkdir()
    (run / "demo_seen.png").write_bytes(b"png")
    (run / "demo_scores.json").write_text("{}")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold\n{README_END}\n")
    publish(run, "| new |\n", target=tmp_path / "selected", readme=readme)
    assert (tmp_path / "selected" / "demo_seen.png").read_bytes() == b"png"
    assert (tmp_path / "selected" / "demo_scores.json").is_file()
    assert "| new |" in readme.read_text() and "old" not in readme.read_text()


def test_demo_images_are_near_square_and_share_the_32px_bucket():
    """The demo recipe relies on every image landing in the 32x32 bucket, where a large shape is 16 px across."""
    import numpy as np
    import pytest

    from mmdit.data.buckets import bucket_size
    from mmdit.data.shapes import random_image_size
    from mmdit.demo import FULL

    rng = np.random.default_rng(0)
    sizes = [random_image_size(rng, 64, 160, FULL["max_aspect"]) for _ in range(2000)]
    ratios = [w / h for w, h in sizes]
    assert 1 / 1.25 - 0.02 <= min(ratios) < 0.85 and 1.18 < max(ratios) <= 1.25 + 0.02
    assert {bucket_size(w, h, step=16, max_resolution=32) for w, h in sizes} == {(32, 32)}
    wide = [random_image_size(rng, 64, 160) for _ in range(2000)]  # the general default: 1:2 to 2:1
    assert min(w / h for w, h in wide) < 0.55 and max(w / h for w, h in wide) > 1.8
    with pytest.raises(ValueError, match="max_aspect"):
        random_image_size(rng, 64, 160, 0.5)


def test_readme_tables_are_replaced_between_the_markers_only(tmp_path):
    from mmdit.demo import README_BEGIN, README_END, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold table\n{README_END}\nrest\n")
    assert update_readme(readme, "| new |\n")
    assert readme.read_text() == f"intro\n{README_BEGIN}\n| new |\n{README_END}\nrest\n"
    assert update_readme(readme, "| newer |\n") and "| new |" not in readme.read_text()
    readme.write_text("no markers\n")
    assert not update_readme(readme, "| new |\n") and readme.read_text() == "no markers\n"


def test_prompt_sets_cover_every_background_size_and_combination():
    from mmdit.data.shapes import BACKGROUNDS, COLOURS, DEFAULT_HOLDOUT, SHAPES, SIZES
    from mmdit.demo import caption, prompt_sets
    from mmdit.score import expected_from_text

    sets = prompt_sets()
    seen = {(a["colour"], a["shape"], a["background"], a["size"]) for a in sets["seen"]}
    held = {(a["colour"], a["shape"], a["background"], a["size"]) for a in sets["held_out"]}
    combos = {(c, s) for c in COLOURS for s in SHAPES}
    assert seen == {(c, s, b, z) for c, s in combos - set(DEFAULT_HOLDOUT) for b in BACKGROUNDS for z in SIZES}
    assert held == {(c, s, b, z) for c, s in DEFAULT_HOLDOUT for b in BACKGROUNDS for z in SIZES}
    for attrs in sets["seen"] + sets["held_out"]:  # the caption spells what the scorer will check
        assert expected_from_text(caption(attrs)) == attrs


def test_emoji_demo_names_a_missing_asset_and_how_to_get_it(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mmdit", "demo", "--data", "emoji", "--quick", "--out",
                             str(tmp_path), "--taef2", str(tmp_path / "no-taef2")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "TAEF2 weights" in result.stderr and "taef2_encoder.pth" in result.stderr
    assert "github.com/madebyollin/taesd" in result.stderr and "--taef2" in result.stderr
    assert "Traceback" not in result.stderr and not any(tmp_path.iterdir())  # refused before any work


def test_quick_emoji_demo_writes_grids_gif_curves_and_fd(tmp_path):
    """The real-image demo's pipeline end to end on 120 emoji (skipped without TAEF2 or the emoji package)."""
    import pytest

    from mmdit.data.emoji import EmojiSourceError, fetch_package
    from mmdit.demo_emoji import TAEF2_DEFAULT
    from mmdit.encoders.tiny_autoencoder import weight_files

    if not TAEF2_DEFAULT.is_dir() or weight_files(TAEF2_DEFAULT) is None:
        pytest.skip(f"TAEF2 weights not found in {TAEF2_DEFAULT} (see ../shared/assets/README.md)")
    try:
        fetch_package()
    except EmojiSourceError as err:
        pytest.skip(f"the emoji package could not be fetched: {err}")
    before = _tracked_state()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "mmdit", "demo", "--data", "emoji", "--quick", "--out",
                             str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _tracked_state() == before
    images = tmp_path / "emoji" / "images"
    for name in ("emoji_seen.png", "emoji_held_out.png", "emoji_curves.png"):
        assert Image.open(images / name).size[0] > 0
    assert Image.open(images / "emoji_held_out.png").size == (2 * (4 * 64 + 3 * 2), 2 * (4 * 64 + 3 * 2))
    assert Image.open(images / "emoji_denoising.gif").n_frames >= 1
    scores = json.loads((images / "emoji_scores.json").read_text())
    final, steps = scores["final"], {row["step"]: row for row in scores["in_loop"]}
    assert sorted(steps) == [8, 16] and steps[16]["eval/fd_effnet_lite0"] > 0 and steps[8]["val/ema/loss"] > 0
    assert len(final["held_out_captions"]) == 8 and final["fd_effnet_lite0_real_vs_real"] > 0
    assert "| 16 |" in (images / "emoji_tables.md").read_text()
    assert f"images, gif, curves and scores: {images}" in result.stdout
