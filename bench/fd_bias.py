"""FD's (and CMMD's) bias at finite N: two disjoint image sets drawn from the same distribution.

    PYTHONPATH=src python bench/fd_bias.py            # ~1-2 minutes on 2 CPU cores

Both sets are shapes images (``mmdit.data.shapes``, 64 x 64, one seed stream), so the true distance is 0
and what FD reports is its bias at that N. Features come from random-weight DINOv2 models of the real class
through ``mmdit.eval.features`` (the tiny test extractor, 32-d, and one of ViT-L/14's width, 1024-d, two
layers), CMMD from the tiny CLIP's image embeddings. Each value is the mean (and spread) over disjoint pairs.
Random-weight features are not DINOv2's: the numbers show how the bias scales with N and with the feature
width (rank-deficient below N = width), not the value a real dinov2-large would give.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmdit.data import shapes
from mmdit.eval.features import ClipFeatures, DinoFeatures
from mmdit.eval.metrics import FeatureStats, cmmd, frechet_distance
from mmdit.eval.tiny_extractors import IMAGE_SIZE, PATCH, build_tiny_clip, build_tiny_dinov2

SIZES = (256, 1024, 4096)
PAIRS = 2  # disjoint pairs per N at the largest N (more at smaller N)
SIDE = 64


def shape_images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, SIDE, SIDE] shapes images, image i a function of (seed, i)."""
    out = np.empty((n, SIDE, SIDE, 3), np.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        out[i] = np.asarray(shapes.draw_shape(shapes.random_spec(rng, ()), SIDE, SIDE, rng))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def wide_dinov2(out: Path) -> str:
    """A random DINOv2 of ViT-L/14's width (1024-d features), two layers, saved like the tiny one."""
    from transformers import Dinov2Config, Dinov2Model

    tiny = build_tiny_dinov2(out)  # for its processor config
    torch.manual_seed(1)
    cfg = Dinov2Config(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, intermediate_size=1024,
                       patch_size=PATCH, image_size=IMAGE_SIZE)
    Dinov2Model(cfg).eval().save_pretrained(tiny)
    return tiny


def features(extract, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([extract(images[i:i + batch]) for i in range(0, len(images), batch)]).double()


def bias_table(feats: torch.Tensor, distance) -> dict[int, tuple[float, float, int]]:
    """N -> (mean, std, pairs) of distance(set A, set B) over disjoint pairs of size N."""
    table = {}
    for n in SIZES:
        pairs = min(len(feats) // (2 * n), 8)
        values = [distance(feats[2 * k * n:(2 * k + 1) * n], feats[(2 * k + 1) * n:(2 * k + 2) * n])
                  for k in range(pairs)]
        table[n] = (float(np.mean(values)), float(np.std(values)), pairs)
    return table


def main() -> None:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    images = shape_images(2 * PAIRS * SIZES[-1])
    print(f"{len(images)} shapes images {SIDE}x{SIDE} in {time.perf_counter() - t0:.1f}s", flush=True)
    fd = lambda a, b: frechet_distance(FeatureStats.of(a), FeatureStats.of(b))  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        extractors = {"tiny DINOv2 (32-d)": DinoFeatures(build_tiny_dinov2(Path(tmp) / "tiny"), "cpu"),
                      "random DINOv2, ViT-L width (1024-d)": DinoFeatures(wide_dinov2(Path(tmp) / "wide"), "cpu")}
        rows = []
        for name, dino in extractors.items():
            t = time.perf_counter()
            feats = features(dino, images)
            rows.append((f"FD, {name}", bias_table(feats, fd)))
            scale = float(FeatureStats.of(feats).cov.trace())
            print(f"{name}: scale tr(S) = {scale:.4g} (FD of a set against a point at its mean)", flush=True)
            print(f"{name}: features in {time.perf_counter() - t:.1f}s", flush=True)
        clip = ClipFeatures(build_tiny_clip(Path(tmp) / "clip"), "cpu")
        rows.append(("CMMD, tiny CLIP (16-d)", bias_table(features(clip.images, images), cmmd)))
    print("\n| metric, extractor | " + " | ".join(f"N = {n}" for n in SIZES) + " |")
    print("| --- " * (len(SIZES) + 1) + "|")
    for name, table in rows:
        print(f"| {name} | " + " | ".join(f"{m:.4g} ± {s:.2g} ({p})" for m, s, p in table.values()) + " |")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
