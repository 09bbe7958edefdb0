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
