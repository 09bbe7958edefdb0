"""A shortened `make demo`: the whole pipeline end to end in about a minute, checking what it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_writes_images_gif_loss_and_scores(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "mmdit", "demo", "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    images = tmp_path / "images"
    for name in ("demo_seen.png", "demo_held_out.png", "demo_loss.png"):
        assert Image.open(images / name).size[0] > 0
    gif = Image.open(images / "demo_denoising.gif")
    assert gif.n_frames >= 1  # Pillow merges identical frames: a 12-step model may still draw the same one
    scores = json.loads((images / "demo_scores.json").read_text())
    assert scores["seen"]["n"] > 0 and 0.0 <= scores["seen"]["colour"] <= 1.0
    assert "colour" in result.stdout and "held_out" in result.stdout


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
