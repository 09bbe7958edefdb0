"""Decode image bytes into the picture a viewer sees, bounded; fit it to a bucket; encode it again.

Shared by create_phase (raw web images -> bucketed shards) and the training row reader (so a shard
written by an older create_phase, or by another tool, still trains on the right pixels). Anything that
is not a picture raises :class:`SkipImage` with a short ``reason`` from :data:`SKIP_REASONS`; no other
exception leaves :func:`decode`.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from mmdit.data.image_modes import to_rgb

# Default pixel limit (header width x height) above which an image is skipped as ``too_large``.
# The largest phase has 1024 px buckets (~1 MP), so 100 MP is already a 100x reduction; it admits
# every phone and nearly every camera (up to 100 MP medium format) and keeps a full decode of a
# format that cannot be reduced while decoding (PNG, WebP) to ~400 MB (RGBA) per worker process.
DEFAULT_MAX_PIXELS = 100_000_000
# Images with a side below this many pixels (tracking pixels, spacers, icons) are ``too_small``.
DEFAULT_MIN_SIDE = 8
# Transparent pixels are composited over white: the page colour browsers show them on.
DEFAULT_BACKGROUND = (255, 255, 255)

SKIP_REASONS = {
    "null_image": "no image bytes in the row",
    "undecodable": "not an image any decoder here can read",
    "truncated": "the file ends before the image does (partial download)",
    "too_large": "more pixels than max_pixels (or than PIL's decompression-bomb ceiling)",
    "too_small": "a side shorter than min_side",
    "out_of_memory": "decoding ran out of memory",
    "decoder_error": "the decoder failed with an unexpected error (struct.error, IndexError, ...)",
}

# EXIF orientation tag value -> the transpose that undoes it (EXIF 2.32, tag 0x0112).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_DRAFT_FORMATS = ("JPEG", "MPO")
_REDUCING_GAP = 2.0  # decode a JPEG to >= 2x the bucket's cover size, then Lanczos (as PIL's thumbnail)


class SkipImage(Exception):
    """A row whose image is not a training picture: ``reason`` (a key of SKIP_REASONS) and a ``detail``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; choose one of {sorted(SKIP_REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImagePolicy:
    """What counts as a picture and how it is flattened to RGB (see the module constants for defaults)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    background: tuple[int, int, int] = DEFAULT_BACKGROUND

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.min_side < 1:
            raise ValueError(f"max_pixels={self.max_pixels} and min_side={self.min_side} must be >= 1")
        background = tuple(int(c) for c in self.background)
        if len(background) != 3 or not all(0 <= c <= 255 for c in background):
            raise ValueError(f"background={self.background!r} must be three integers in 0..255 (R, G, B)")
        object.__setattr__(self, "background", background)


@dataclass
class Decoded:
    """An RGB picture, upright; ``width``/``height`` are its full upright size before any draft reduction."""

    image: Image.Image
    source_format: str
    width: int
    height: int
    bucket: tuple[int, int] | None  # (height, width) from the ``bucket`` callback, if one was given


def skip_reason(err: BaseException) -> SkipImage:
    """Classify an exception raised while decoding or resizing an image as a :class:`SkipImage`."""
    if isinstance(err, SkipImage):
        return err
    detail = re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "<bytes>", f"{type(err).__name__}: {err}")[:300]  # reproducible
    message = str(err).lower()
    if isinstance(err, Image.DecompressionBombError):
        return SkipImage("too_large", detail)
    if isinstance(err, MemoryError):
        return SkipImage("out_of_memory", detail)
    if isinstance(err, EOFError) or "truncated" in message or "broken data stream" in message:
        return SkipImage("truncated", detail)
    if isinstance(err, (UnidentifiedImageError, OSError, ValueError, SyntaxError)):
        return SkipImage("undecodable", detail)
    return SkipImage("decoder_error", detail)


def image_bytes(data: bytes | dict | None) -> bytes:
    """The encoded bytes of a row's image: raw bytes or a Hugging Face ``{"bytes", "path"}`` struct."""
    if isinstance(data, dict):
        if not data.get("bytes") and data.get("path"):
            raise SkipImage("null_image", f"image struct holds only a path ({data['path']!r}), no bytes")
        data = data.get("bytes")
    if not data:
        raise SkipImage("null_image", "image is null or empty")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SkipImage("null_image", f"image column holds {type(data).__name__}, not bytes")
    return bytes(data)


def _orientation(image: Image.Image) -> int:
    """EXIF orientation 1..8; 1 when absent or unreadable (as browsers ignore a broken EXIF block)."""
    try:
        value = int(image.getexif().get(0x0112, 1))
    except Exception:  # malformed EXIF must not cost a picture that browsers show
        return 1
    return value if value in _ORIENTATION else 1


def decode(
    data: bytes | dict | None,
    policy: ImagePolicy | None = None,
    bucket: Callable[[int, int], tuple[int, int]] | None = None,
) -> Decoded:
    """Decode ``data`` into the upright RGB picture a browser shows, or raise :class:`SkipImage`.

    The size limits of ``policy`` are checked on the header, before any pixel is decoded. ``bucket``
    maps the upright ``(width, height)`` to the ``(height, width)`` the picture will be resized to; a
    JPEG far larger than that is reduced while decoding (``draft``), so ``image`` may be smaller than
    ``width`` x ``height``. The mode handling is :func:`mmdit.data.image_modes.to_rgb`.
    """
    policy = policy or ImagePolicy()
    raw = image_bytes(data)
    try:
        with warnings.catch_warnings():
            # policy.max_pixels decides below; PIL's own warning (at 89 MP) would only repeat it per worker
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="PIL")  # EXIF/palette chatter
            with Image.open(io.BytesIO(raw)) as image:
                return _decode_open(image, policy, bucket)
    except Exception as err:  # every decoder error is one skipped row, never a dead worker
        raise skip_reason(err) from err


def _decode_open(image: Image.Image, policy: ImagePolicy, bucket) -> Decoded:
    width, height = image.size
    if width * height > policy.max_pixels:
        raise SkipImage("too_large", f"{width}x{height} = {width * height:,} pixels > max_pixels={policy.max_pixels:,}")
    if min(width, height) < policy.min_side:
        raise SkipImage("too_small", f"{width}x{height} has a side below min_side={policy.min_side}")
    source_format = image.format or "PNG"
    if getattr(image, "is_animated", False):
        image.seek(0)  # an animation trains on its first frame
    orientation = _orientation(image)
    swapped = orientation in (5, 6, 7, 8)
    upright = (height, width) if swapped else (width, height)
    target = bucket(*upright) if bucket is not None else None
    if target is not None and source_format in _DRAFT_FORMATS:
        bucket_h, bucket_w = target
        scale = max(bucket_w / upright[0], bucket_h / upright[1]) * _REDUCING_GAP
        if scale < 1.0:
            need = (int(width * scale) + 1, int(height * scale) + 1)  # stored (not upright) orientation
            image.draft(None, need)
    image.load()
    if orientation in _ORIENTATION:
        image = image.transpose(_ORIENTATION[orientation])
    return Decoded(to_rgb(image, policy.background), source_format, upright[0], upright[1], target)


def fit_to_bucket(image: Image.Image, bucket_height: int, bucket_width: int) -> Image.Image:
    """Resize ``image`` to cover the bucket, keeping its aspect ratio, then centre-crop the overhang.

    The overhang is at most half a bucket step, so nothing of substance is cut and nothing is stretched.
    """
    width, height = image.size
    if (width, height) == (bucket_width, bucket_height):
        return image
    scale = max(bucket_width / width, bucket_height / height)
    new_w = max(bucket_width, int(round(width * scale)))
    new_h = max(bucket_height, int(round(height * scale)))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    resized = image.resize((new_w, new_h), resample=resample, reducing_gap=3.0 if scale < 0.5 else None)
    left = (new_w - bucket_width) // 2
    top = (new_h - bucket_height) // 2
    return resized.crop((left, top, left + bucket_width, top + bucket_height))


def encode(image: Image.Image, fmt: str, quality: int = 95) -> bytes:
    """Encode as ``PNG`` or ``JPEG`` bytes (no EXIF: the pixels are already upright)."""
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
