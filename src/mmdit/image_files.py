"""Writing generated images: file names from prompts, PNGs with their settings, grids and gifs."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name-safe version of a prompt: lowercase words joined by '_' (``empty`` for '')."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_len].rstrip("_")
    return slug or "empty"


def image_filename(prompt: str, seed: int, ext: str = "png") -> str:
    return f"{slugify(prompt)}_seed{seed}.{ext}"


def save_gif(frames: Sequence, path: Union[str, Path], duration_ms: int = 100, hold_last_ms: int = 1000) -> Path:
    """Write PIL frames as a looping animated gif, one gif frame per given frame, the last held longer.

    Pillow merges consecutive frames that are pixel-identical (adding up their durations), so a gif of a
    model that does not change the image between steps can have fewer frames than given.
    """
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    durations = [int(duration_ms)] * len(frames)
    durations[-1] = max(int(duration_ms), int(hold_last_ms))
    first, *rest = [f.convert("RGB") for f in frames]
    first.save(path, save_all=True, append_images=rest, duration=durations, loop=0, optimize=False)
    return path


def image_grid(images: Sequence, cols: Optional[int] = None, pad: int = 2):
    """Tile PIL images (same size) into one image, ``cols`` per row (default: about square)."""
    from PIL import Image

    if not images:
        raise ValueError("image_grid needs at least one image")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid


def save_images(images: Sequence, out_dir: Union[str, Path]) -> list[Path]:
    """Save images from :meth:`Pipeline.generate` as ``<prompt slug>_seed<seed>.png`` with the sampling
    settings in the PNG's text chunks; returns the paths."""
    from PIL.PngImagePlugin import PngInfo

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        prompt, seed = im.info.get("prompt", ""), im.info.get("seed", i)
        meta = PngInfo()
        for k, v in im.info.items():
            if isinstance(v, (str, int, float)):
                meta.add_text(str(k), str(v))
        p = out_dir / image_filename(prompt, seed)
        im.save(p, pnginfo=meta)
        paths.append(p)
    return paths
