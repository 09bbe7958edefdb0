"""Score generated shapes images: recover colour, shape, position, size and background, compare with the prompt.

The estimate is geometric, with no learned model: the background colour is the median of the border
pixels (the nearest of the shapes backgrounds names it), the foreground is every pixel far from it, and
the largest 4-connected foreground component is the shape. Its median colour gives the nearest palette
colour; its bounding box gives the position (box centre relative to the image), the size (box side
relative to the shorter image side) and the kind of shape: an upward triangle has little mass in its top
half and empty top corners; a square fills the corners of its box, a circle leaves them empty (fill ratio:
square ~1, circle ~0.785, triangle ~0.5, reported as ``fill``). The estimate tolerates mild blur and noise.

CLI: ``python -m mmdit score <folder>`` (or ``mmdit.score.main(argv)``). Expected attributes come from
``<folder>/expected.json`` (``{"file.png": {"colour": "red", "shape": "circle", ...}}``), a
``<image stem>.json`` next to each image, or the file name (``red_circle_left_large_0003.png``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmdit.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    DEFAULT_HOLDOUT,
    POSITIONS,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    parse_holdout,
)

ATTRIBUTES = ("colour", "shape", "position", "size", "background")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# distance in RGB from the background above which a pixel is foreground
FOREGROUND_THRESHOLD = 60.0
# a component smaller than this fraction of the image is noise, not a shape
MIN_AREA_FRACTION = 0.004
# centre of the box within this fraction of the image side from the middle -> "center"
CENTER_TOLERANCE = 0.125
# size threshold between "small" and "large" (box side / shorter image side)
SIZE_THRESHOLD = (SIZE_FRACTION["small"] + SIZE_FRACTION["large"]) / 2


@dataclass
class ShapeReport:
    """What the scorer sees in one image; attributes are ``"none"`` when no shape was found."""

    found: bool
    colour: str = "none"
    shape: str = "none"
    position: str = "none"
    size: str = "none"
    background: str = "none"
    fill: float = 0.0
    area_fraction: float = 0.0

    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[2] != 3:  # CHW -> HWC
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {array.shape}")
    if array.dtype != np.uint8:
        array = np.asarray(array, dtype=np.float64)
        if array.max(initial=0) <= 1.0 + 1e-6:
            array = array * 255.0
    return np.clip(np.asarray(array, dtype=np.float64), 0, 255)


def _box_blur(values: np.ndarray) -> np.ndarray:
    """3x3 mean (edges replicated): tames per-pixel noise before thresholding."""
    padded = np.pad(values, 1, mode="edge")
    height, width = values.shape
    return sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)) / 9.0


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 4-connected component of ``mask`` (min-label propagation)."""
    height, width = mask.shape
    none = height * width
    labels = np.where(mask, np.arange(none).reshape(height, width), none)
    while True:
        new = labels.copy()
        np.minimum(new[1:], labels[:-1], out=new[1:])
        np.minimum(new[:-1], labels[1:], out=new[:-1])
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        new[~mask] = none
        flat = new.ravel()
        inside = flat < none
        for _ in range(4):  # pointer jumping: a label is a pixel of the component; take that pixel's label
            flat[inside] = flat[flat[inside]]
        if np.array_equal(new, labels):
            break
        labels = new
    values, counts = np.unique(labels[mask], return_counts=True)
    if len(values) == 0:
        return np.zeros_like(mask)
    return labels == values[np.argmax(counts)]


def nearest_name(table: dict[str, tuple[int, int, int]], rgb: np.ndarray) -> str:
    """The name in ``table`` (name -> RGB) whose colour is nearest to ``rgb``."""
    names = list(table)
    palette = np.array([table[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))]


def analyze_image(image, threshold: float = FOREGROUND_THRESHOLD) -> ShapeReport:
    """Find the dominant shape of an RGB image (numpy HWC uint8/float, or PIL) and describe it."""
    pixels = _to_array(image)
    height, width, _ = pixels.shape
    ring = max(1, min(height, width) // 32)
    border = np.concatenate([
        pixels[:ring].reshape(-1, 3), pixels[-ring:].reshape(-1, 3),
        pixels[:, :ring].reshape(-1, 3), pixels[:, -ring:].reshape(-1, 3),
    ])
    background = np.median(border, axis=0)
    ground = nearest_name(BACKGROUNDS, background)
    distance = _box_blur(np.linalg.norm(pixels - background, axis=2))
    strong = distance > threshold
    if strong.any():
        # half way between background and the typical foreground: the edge of a blurred shape
        threshold = max(threshold, 0.5 * float(np.median(distance[strong])))
    component = largest_component(distance > threshold)
    area = int(component.sum())
    if area < MIN_AREA_FRACTION * height * width:
        return ShapeReport(found=False, background=ground, area_fraction=area / (height * width))
    ys, xs = np.nonzero(component)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    box_h, box_w = y1 - y0 + 1, x1 - x0 + 1
    fill = area / (box_h * box_w)

    # colour from the inner half of the shape (farthest from the background), not its blended edge
    inner = component & (distance >= np.median(distance[component]))
    median = np.median(pixels[inner], axis=0)
    colour = nearest_name(COLOURS, median)

    middle = (y0 + y1) / 2
    top_mass = int((ys < middle).sum())
    bottom_mass = int((ys > middle).sum())
    top_bottom_ratio = top_mass / max(bottom_mass, 1)
    box = component[y0:y1 + 1, x0:x1 + 1]
    cy, cx = max(1, round(0.2 * box_h)), max(1, round(0.2 * box_w))
    top_corners = (box[:cy, :cx].mean() + box[:cy, -cx:].mean()) / 2
    bottom_corners = (box[-cy:, :cx].mean() + box[-cy:, -cx:].mean()) / 2
    if top_bottom_ratio < 0.6 or bottom_corners - top_corners > 0.35:
        shape = "triangle"
    elif (top_corners + bottom_corners) / 2 > 0.35:
        shape = "square"
    else:
        shape = "circle"

    dx = (x0 + x1 + 1) / 2 / width - 0.5
    dy = (y0 + y1 + 1) / 2 / height - 0.5
    if max(abs(dx), abs(dy)) < CENTER_TOLERANCE:
        position = "center"
    elif abs(dx) >= abs(dy):
        position = "left" if dx < 0 else "right"
    else:
        position = "top" if dy < 0 else "bottom"

    size = "large" if max(box_h, box_w) / min(height, width) >= SIZE_THRESHOLD else "small"
    return ShapeReport(True, colour, shape, position, size, ground, float(fill), area / (height * width))


def check_image(image, expected: dict, holdout=DEFAULT_HOLDOUT) -> tuple[dict[str, bool], bool, bool]:
    """(attribute -> right?, shape found?, held-out combination?) of one image against its expected attributes.
    Only attributes present in ``expected`` are checked."""
    report = analyze_image(image)
    got = report.attributes()
    checks = {k: got[k] == v for k, v in expected.items() if k in ATTRIBUTES}
    held = (expected.get("colour"), expected.get("shape")) in set(map(tuple, holdout))
    return checks, report.found, held


def summarise_checks(rows: list[tuple[dict[str, bool], bool, bool]], split: bool = True) -> dict:
    """Per-attribute accuracy of :func:`check_image` rows; ``all`` is the fraction with every attribute right.
    With ``split`` and some held-out rows, ``seen`` and ``held_out`` repeat the scores for each part."""

    def summarise(selected) -> dict:
        result: dict = {"n": len(selected)}
        if not selected:
            return result
        result["found"] = float(np.mean([found for _, found, _ in selected]))
        for name in ATTRIBUTES:
            values = [checks[name] for checks, _, _ in selected if name in checks]
            if values:
                result[name] = float(np.mean(values))
        result["all"] = float(np.mean([all(checks.values()) for checks, _, _ in selected]))
        return result

    scores = summarise(rows)
    if split and any(held for _, _, held in rows):
        scores["seen"] = summarise([r for r in rows if not r[2]])
        scores["held_out"] = summarise([r for r in rows if r[2]])
    return scores


def score_images(items, holdout=DEFAULT_HOLDOUT) -> dict:
    """Per-attribute accuracy of ``items`` = iterable of ``(image, expected attributes dict)``.

    Only attributes present in the expected dicts are scored; ``all`` is the fraction of images with
    every expected attribute right. When expectations name colour and shape, ``seen`` and ``held_out``
    repeat the scores for combinations inside and outside ``holdout``.
    """
    return summarise_checks([check_image(image, expected, holdout) for image, expected in items], bool(holdout))


def expected_from_name(name: str) -> dict[str, str]:
    """Attributes spelled in a file name, e.g. ``red_circle_left_large_03.png``."""
    return expected_from_text(Path(name).stem)


def expected_from_text(text: str) -> dict[str, str]:
    """Attributes spelled in a caption or a name: ``"a small red circle at the top of a dark gray background"``
    or ``red_circle_top_small_dark_gray``."""
    tokens = re.split(r"[^a-z]+", text.lower())
    found = {}
    for attribute, vocabulary in (("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS), ("size", SIZES)):
        match = next((t for t in tokens if t in vocabulary), None)
        if match:
            found[attribute] = match
    joined = " ".join(tokens)
    ground = next((g for g in BACKGROUNDS if re.search(rf"\b{g}\b", joined)), None)
    if ground:
        found["background"] = ground
    return found


def load_expected(folder: Path, images: list[Path], sidecar: Path | None = None) -> dict[str, dict[str, str]]:
    """Expected attributes per image file name, from a JSON sidecar, per-image JSON files or names."""
    sidecar = sidecar or folder / "expected.json"
    table = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    expected = {}
    for path in images:
        if path.name in table:
            expected[path.name] = table[path.name]
        elif path.with_suffix(".json").exists():
            expected[path.name] = json.loads(path.with_suffix(".json").read_text())
        else:
            expected[path.name] = expected_from_name(path.name)
    return expected


def main(argv: list[str] | None = None) -> int:
    """Score a folder of generated images and print the accuracies as JSON."""
    parser = argparse.ArgumentParser(prog="mmdit score", description=main.__doc__)
    parser.add_argument("folder", help="folder of generated images")
    parser.add_argument("--expected", default=None, help="JSON {file name: {colour, shape, position, size}} "
                        "(default: <folder>/expected.json, then <image>.json, then the file name)")
    parser.add_argument("--holdout", default=",".join(f"{c}:{s}" for c, s in DEFAULT_HOLDOUT),
                        help="colour:shape pairs held out of training, scored separately ('none' for none)")
    parser.add_argument("--per_image", action="store_true", help="also print what was seen in every image")
    parser.add_argument("--output", default=None, help="write the scores JSON here too")
    args = parser.parse_args(argv)

    folder = Path(args.folder)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not images:
        print(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}", file=sys.stderr)
        return 2
    expected = load_expected(folder, images, Path(args.expected) if args.expected else None)
    unlabelled = [p.name for p in images if not expected[p.name]]
    if unlabelled:
        print(f"no expected attributes for {len(unlabelled)} image(s), e.g. {unlabelled[:3]}; "
              "give --expected or name files like red_circle_left_0.png", file=sys.stderr)
        return 2
    loaded = [(Image.open(p).convert("RGB"), expected[p.name]) for p in images]
    scores = score_images(loaded, parse_holdout(args.holdout))
    if args.per_image:
        scores["images"] = {p.name: {"expected": expected[p.name], "seen": asdict(analyze_image(img))}
                            for p, (img, _) in zip(images, loaded)}
    text = json.dumps(scores, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
