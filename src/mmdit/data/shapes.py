"""The procedural shapes vocabulary: one coloured shape on a plain background, with captions.

The CPU demo trains on these images because a generated image can be scored automatically
(:mod:`mmdit.score` recovers colour, shape, position and size). Some colour x shape combinations are
held out of the training set (:data:`DEFAULT_HOLDOUT`) so the demo can measure compositional
generalisation: seen versus never-seen combinations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

# Saturated shape colours, far apart in RGB so the nearest palette colour of a (blurry) sample is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 200),
    "orange": (245, 130, 20),
    "cyan": (30, 210, 220),
}
# Neutral backgrounds, none of them close to a shape colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "dark gray": (64, 64, 64),
    "light gray": (190, 190, 190),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
SIZES: tuple[str, ...] = ("small", "large")

# Shape side (or diameter) as a fraction of the image's shorter side. Large enough that at the demo's 32 px a
# large shape is 16 px across: a 4x4-patch model tells circle, square and triangle apart from outlines that size.
SIZE_FRACTION: dict[str, float] = {"small": 0.30, "large": 0.50}
# Anchor of the shape's centre, as a fraction of (width, height).
POSITION_ANCHOR: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# Random offset of the centre around its anchor, as a fraction of the image side.
POSITION_JITTER = 0.04

POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

# Colour x shape combinations never generated for training by default (one per shape, each colour at most once).
DEFAULT_HOLDOUT: tuple[tuple[str, str], ...] = (("red", "circle"), ("blue", "square"), ("yellow", "triangle"))


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows."""

    shape: str
    colour: str
    position: str
    size: str
    background: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("position", self.position, POSITIONS),
            ("size", self.size, SIZES),
            ("background", self.background, tuple(BACKGROUNDS)),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not in the shapes vocabulary; choose one of {list(allowed)}")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def parse_holdout(text: str) -> tuple[tuple[str, str], ...]:
    """Parse ``"red:circle,blue:square"`` into colour x shape pairs; ``""`` or ``"none"`` means no holdout."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return ()
    pairs = []
    for item in text.split(","):
        colour, sep, shape = item.strip().partition(":")
        if not sep or colour not in COLOURS or shape not in SHAPES:
            raise ValueError(
                f"bad holdout entry {item!r}: write colour:shape with colour in {list(COLOURS)} "
                f"and shape in {list(SHAPES)}, e.g. 'red:circle,blue:square'"
            )
        pairs.append((colour, shape))
    return tuple(pairs)


def is_held_out(colour: str, shape: str, holdout=DEFAULT_HOLDOUT) -> bool:
    return (colour, shape) in set(holdout)


def random_spec(rng: np.random.Generator, holdout=DEFAULT_HOLDOUT) -> ShapeSpec:
    """Draw a spec uniformly over the vocabulary, never a held-out colour x shape pair."""
    excluded = set(holdout)
    allowed = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in excluded]
    if not allowed:
        raise ValueError("the holdout list excludes every colour x shape combination")
    colour, shape = allowed[int(rng.integers(len(allowed)))]
    return ShapeSpec(
        shape=shape,
        colour=colour,
        position=POSITIONS[int(rng.integers(len(POSITIONS)))],
        size=SIZES[int(rng.integers(len(SIZES)))],
        background=tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
    )


def caption_long(spec: ShapeSpec) -> str:
    """``"a large red circle on the left of a dark gray background"``."""
    where = POSITION_PHRASES[spec.position]
    return f"a {spec.size} {spec.colour} {spec.shape} {where} of a {spec.background} background"


def caption_short(spec: ShapeSpec) -> str:
    """``"red circle, left"``."""
    return f"{spec.colour} {spec.shape}, {spec.position}"


def shape_extent(spec_size: str, width: int, height: int) -> int:
    """Side (square, triangle) or diameter (circle) in pixels."""
    return max(3, int(round(SIZE_FRACTION[spec_size] * min(width, height))))


def draw_shape(spec: ShapeSpec, width: int, height: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``spec`` as an RGB image of ``width`` x ``height``; ``rng`` jitters the position (None = exact anchor).

    The shape always lies fully inside the image. Square and circle fill an axis-aligned box of side
    ``shape_extent``; the triangle points up with base and height equal to that side.
    """
    if width < 8 or height < 8:
        raise ValueError(f"image {width}x{height} is too small to draw a shape; use sides >= 8")
    image = Image.new("RGB", (width, height), BACKGROUNDS[spec.background])
    side = shape_extent(spec.size, width, height)
    ax, ay = POSITION_ANCHOR[spec.position]
    cx, cy = ax * width, ay * height
    if rng is not None:
        cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER) * width
        cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER) * height
    # top-left corner of the shape's box, clamped so the shape stays inside with a 1 px margin
    x0 = int(round(min(max(cx - side / 2, 1), width - 1 - side)))
    y0 = int(round(min(max(cy - side / 2, 1), height - 1 - side)))
    x1, y1 = x0 + side - 1, y0 + side - 1
    draw = ImageDraw.Draw(image)
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif spec.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def random_image_size(
    rng: np.random.Generator, min_side: int = 64, max_side: int = 160, max_aspect: float = 2.0
) -> tuple[int, int]:
    """A (width, height) with a random long side in [min_side, max_side] and an aspect ratio (width / height)
    log-uniform from 1 : max_aspect to max_aspect : 1."""
    if max_aspect < 1:
        raise ValueError(f"max_aspect={max_aspect} must be >= 1 (1 = square images only)")
    aspect = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))  # width / height
    long_side = int(rng.integers(min_side, max_side + 1))
    if aspect >= 1:
        width, height = long_side, max(8, int(round(long_side / aspect)))
    else:
        width, height = max(8, int(round(long_side * aspect))), long_side
    return width, height
