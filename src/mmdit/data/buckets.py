"""Aspect-ratio buckets: the image size each picture is resized to, as a pure function of its size."""

from __future__ import annotations

import math


def bucket_size(
    width: int,
    height: int,
    step: int = 16,
    max_resolution: int = 256,
    max_area: int | None = None,
    allow_upscale: bool = False,
) -> tuple[int, int]:
    """Return ``(bucket_height, bucket_width)`` for a ``width`` x ``height`` image.

    Both sides are multiples of ``step``. The long side is the largest multiple of ``step`` not above
    ``max_resolution`` (and not above the image's own long side unless ``allow_upscale``); with
    ``max_area`` the area is kept at or below it. The short side is the multiple of ``step`` nearest
    to the exact aspect ratio, so it is off by at most ``step / 2`` pixels. Sides never drop below
    ``step``: an image smaller than one step is upscaled to it.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    if step <= 0 or max_resolution < step:
        raise ValueError(f"need step > 0 and max_resolution >= step, got step={step}, max_resolution={max_resolution}")
    if max_area is not None and max_area < step * step:
        raise ValueError(f"max_area={max_area} is below one step squared ({step * step})")
    long_px, short_px = max(width, height), min(width, height)
    ratio = short_px / long_px
    scale = max_resolution / long_px
    if max_area is not None:
        scale = min(scale, math.sqrt(max_area / (width * height)))
    if not allow_upscale:
        scale = min(scale, 1.0)
    long_side = max(step, int(math.floor(long_px * scale / step + 1e-9)) * step)
    while True:
        short_side = min(long_side, max(step, int(math.floor(long_side * ratio / step + 0.5)) * step))
        if max_area is None or long_side * short_side <= max_area or long_side == step:
            break
        long_side -= step
    if width >= height:
        return short_side, long_side
    return long_side, short_side


def bucket_tokens(bucket_height: int, bucket_width: int, patch_pixels: int) -> int:
    """Number of image tokens of a bucket when each token covers ``patch_pixels`` x ``patch_pixels`` pixels."""
    if bucket_height % patch_pixels or bucket_width % patch_pixels:
        raise ValueError(
            f"bucket {bucket_height}x{bucket_width} is not a multiple of patch_pixels={patch_pixels}; "
            "re-run create_phase with --step a multiple of the model's pixel step"
        )
    return (bucket_height // patch_pixels) * (bucket_width // patch_pixels)
