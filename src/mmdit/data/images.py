"""Decode image bytes and fit them to a bucket: shared by create_phase and the row reader."""

from __future__ import annotations

import io
import warnings

from PIL import Image

# A corrupt file shows up as one of these while opening or decoding.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


def decode(data: bytes | dict | None) -> tuple[Image.Image, str]:
    """Decode ``data`` fully into ``(RGB image, source format such as "PNG")``.

    ``data`` is the encoded bytes, or a Hugging Face image struct ``{"bytes": ..., "path": ...}``.
    Raises one of :data:`DECODE_ERRORS` when the bytes are not a readable image.
    """
    if isinstance(data, dict):
        data = data.get("bytes")
    if not data:
        raise ValueError("empty image bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's truncated-file and palette warnings
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB"), image.format or "PNG"


def decode_rgb(data: bytes) -> Image.Image:
    """Decode ``data`` into an RGB image (see :func:`decode`)."""
    return decode(data)[0]


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
    """Encode as ``PNG`` or ``JPEG`` bytes."""
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
