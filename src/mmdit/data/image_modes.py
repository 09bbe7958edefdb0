"""Flatten any PIL image mode to the 8-bit RGB picture a browser shows.

Tested on real encoded files (tests/test_data_images.py): ``1`` (PNG, 1-bit), ``L`` (PNG, JPEG),
``L`` + tRNS (PNG), ``LA`` (PNG), ``P`` (PNG, GIF), ``P`` + transparency index (GIF) and + tRNS alpha
table (PNG), ``RGB`` (PNG, JPEG, WebP, AVIF, BMP, TIFF), ``RGB`` + tRNS colour key (PNG), ``RGB`` with
an embedded sRGB profile and with an unreadable one (JPEG), ``RGBA`` (PNG, WebP, TIFF), ``CMYK``
(JPEG, no profile), ``I;16`` (PNG, TIFF), ``I`` (TIFF, 32-bit integer), ``F`` (TIFF, 32-bit float),
and animated GIF / WebP / PNG (first frame, see images.decode). Not tested for want of a real
profile offline: the conversion through a non-sRGB RGB or a CMYK ICC profile (littlecms does it).

Rules, each what a viewer does: alpha is composited over ``background``; 16-bit integers are scaled
by 255/65535; ``I`` (32-bit) is read as 16-bit when all values fit 0..65535 (what 16-bit files decode
to) and as unsigned 32-bit otherwise; ``F`` is read as 0..1 when its maximum is at most 1, else as
0..255 (PIL's own float convention); an embedded ICC profile (CMYK, RGB) is converted to sRGB, and a
profile that littlecms cannot read is ignored, as browsers do.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageCms

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """``image`` (any mode, decoded) as an RGB image: colour-managed, alpha over ``background``."""
    transparency = image.info.get("transparency")
    if image.mode in _WIDE_MODES:
        image = _wide_to_l(image, transparency)
    elif image.mode == "CMYK":
        return _with_profile(image, "CMYK") or image.convert("RGB")
    elif image.mode == "La":
        image = image.convert("LA")
    elif image.mode in ("LAB", "HSV", "YCbCr"):
        return image.convert("RGB")
    if image.mode in _ALPHA_MODES or transparency is not None:
        rgba = image.convert("RGBA")  # applies a palette's or tRNS colour key's transparency
        if image.mode == "RGBA" and "icc_profile" in image.info:
            rgba = _with_profile(image, "RGBA") or rgba
        flat = Image.new("RGB", rgba.size, background)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if image.mode == "RGB":
        return _with_profile(image, "RGB") or image
    return image.convert("RGB")


def _wide_to_l(image: Image.Image, transparency) -> Image.Image:
    """16/32-bit integer or float greyscale -> ``L`` (or ``LA`` when a tRNS grey value is set)."""
    values = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        grey = np.clip(np.rint(values * (255.0 / top)), 0, 255)
    else:
        wide = values.astype(np.int64)
        full = 65535 if (image.mode != "I" or (wide.min(initial=0) >= 0 and wide.max(initial=0) <= 65535)) \
            else 2**32 - 1
        grey = (np.clip(wide, 0, full) * 255 + full // 2) // full
    grey_image = Image.fromarray(grey.astype(np.uint8), "L")
    if isinstance(transparency, int):
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
        grey_image = Image.merge("LA", (grey_image, Image.fromarray(alpha, "L")))
    return grey_image


@lru_cache(maxsize=64)
def _transform(profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A cached transform from an embedded ICC profile to sRGB, or None when it is sRGB or unreadable."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if "srgb" in (ImageCms.getProfileDescription(source) or "").lower():
            return None
        out_mode = "RGBA" if mode == "RGBA" else "RGB"
        return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), mode, out_mode,
                                       renderingIntent=ImageCms.Intent.PERCEPTUAL)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def _with_profile(image: Image.Image, mode: str) -> Image.Image | None:
    """``image`` converted through its ICC profile to sRGB, or None when it has no usable profile."""
    profile = image.info.get("icc_profile")
    if not profile:
        return None
    transform = _transform(bytes(profile), mode)
    if transform is None:
        return None
    try:
        return ImageCms.applyTransform(image, transform)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None
