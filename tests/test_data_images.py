"""images.decode: every mode and container as a real encoded file, compared pixel-wise with the picture."""

import io
import random
import warnings

import numpy as np
import pytest
from PIL import Image
from web_images import (
    BLUE,
    RED,
    STORED,
    WHITE,
    dds_with_unknown_pixel_format,
    encoded,
    half_transparent_rgba,
    png_header_only,
    upright_mark,
)

from mmdit.data.images import SKIP_REASONS, ImagePolicy, SkipImage, decode, fit_to_bucket


def pixels(data, policy=None, bucket=None) -> np.ndarray:
    decoded = decode(data, policy, bucket)
    assert decoded.image.mode == "RGB"
    return np.asarray(decoded.image).astype(int)


@pytest.mark.parametrize("orientation", sorted(STORED))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_gives_the_upright_picture(orientation, fmt):
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright_mark())))
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode(encoded(stored, fmt, exif=exif.tobytes(), **options))
    assert (decoded.width, decoded.height) == (60, 40)
    got = np.asarray(decoded.image).astype(int)
    assert np.abs(got - upright_mark()).mean() < 3 and np.abs(got - upright_mark()).max() < 120


def test_broken_exif_keeps_the_picture():
    data = encoded(Image.fromarray(upright_mark()), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff",
                   quality=95)
    assert np.abs(pixels(data) - upright_mark()).mean() < 3


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_keeps_its_level(fmt):
    data = encoded(Image.fromarray(np.full((8, 12), 30000, np.uint16)), fmt)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert np.all(pixels(data) == round(30000 * 255 / 65535))  # 117, not white


def test_16_bit_gradient_is_monotone_and_spans_the_range():
    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    got = pixels(encoded(Image.fromarray(ramp), "PNG"))[..., 0].reshape(-1)
    assert got[0] == 0 and got[-1] == 255 and np.all(np.diff(got) >= 0)


@pytest.mark.parametrize("value, expected", [(30000, 117), (2**31 - 1, 127), (-5, 0)])
def test_32_bit_integer_tiff(value, expected):
    data = encoded(Image.fromarray(np.full((8, 8), value, np.int32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert np.all(pixels(data) == expected)


@pytest.mark.parametrize("value, expected", [(0.5, 128), (1.0, 255), (200.0, 200), (float("nan"), 0)])
def test_32_bit_float_tiff(value, expected):
    data = encoded(Image.fromarray(np.full((8, 8), value, np.float32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert np.all(pixels(data) == expected)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("background", [WHITE, (0, 128, 0)])
def test_alpha_is_composited_over_the_background(fmt, background):
    options = {"lossless": True} if fmt == "WEBP" else {}
    got = pixels(encoded(half_transparent_rgba(), fmt, **options), ImagePolicy(background=background))
    assert np.all(got[:, :10] == RED)
    assert np.all(got[:, 20:] == background)  # not the invisible black
    half = np.array([background[0] * 127 / 255, background[1] * 127 / 255, 128 + background[2] * 127 / 255])
    assert np.abs(got[:, 10:20] - half).max() <= 1.5


def test_grey_with_alpha_png():
    la = np.zeros((8, 16, 2), np.uint8)
    la[:, :8] = (50, 255)
    data = encoded(Image.fromarray(la, "LA"), "PNG")
    got = pixels(data, ImagePolicy(background=(10, 20, 30)))
    assert np.all(got[:, :8] == 50) and np.all(got[:, 8:] == (10, 20, 30))


def test_palette_with_transparency_gif_and_png():
    palette = Image.new("P", (16, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 8, 8))  # left half red, right half index 0 (black) marked transparent
    for fmt in ("GIF", "PNG"):
        got = pixels(encoded(palette, fmt, transparency=0))
        assert np.all(got[:, :8] == RED) and np.all(got[:, 8:] == WHITE), fmt
    # a PNG palette with a per-entry alpha table (tRNS with several values)
    palette.info.pop("transparency", None)
    data = encoded(palette, "PNG", transparency=bytes([0, 255]))
    got = pixels(data)
    assert np.all(got[:, :8] == RED) and np.all(got[:, 8:] == WHITE)


def test_colour_key_transparency_in_rgb_and_grey_png():
    rgb = Image.new("RGB", (16, 8), (0, 0, 0))
    rgb.paste(RED, (0, 0, 8, 8))
    got = pixels(encoded(rgb, "PNG", transparency=(0, 0, 0)))
    assert np.all(got[:, :8] == RED) and np.all(got[:, 8:] == WHITE)
    grey = Image.new("L", (16, 8), 0)
    grey.paste(90, (0, 0, 8, 8))
    got = pixels(encoded(grey, "PNG", transparency=0))
    assert np.all(got[:, :8] == 90) and np.all(got[:, 8:] == WHITE)


@pytest.mark.parametrize("fmt, mode, tolerance", [
    ("PNG", "1", 0), ("PNG", "L", 0), ("JPEG", "L", 4), ("PNG", "P", 0), ("GIF", "P", 0), ("BMP", "RGB", 0),
    ("TIFF", "RGB", 0), ("JPEG", "RGB", 6), ("WEBP", "RGB", 6), ("AVIF", "RGB", 12), ("JPEG", "CMYK", 6),
])
def test_opaque_modes(fmt, mode, tolerance):
    picture = upright_mark() if mode not in ("1", "L") else np.where(upright_mark() == 255, 255, 0).astype(np.uint8)
    image = Image.fromarray(picture)
    if mode == "1":
        image = image.convert("L").convert("1", dither=Image.Dither.NONE)
    elif mode == "L":
        image = image.convert("L")
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    elif mode == "CMYK":
        image = image.convert("CMYK")
    data = encoded(image, fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP", "AVIF") else {}))
    assert Image.open(io.BytesIO(data)).mode == mode
    expected = np.asarray(image.convert("RGB")).astype(int)
    assert np.abs(pixels(data) - expected).mean() <= tolerance + 1e-9


def test_cmyk_jpeg_shows_its_colours():
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # red ink: no cyan, full magenta and yellow
    got = pixels(encoded(cmyk, "JPEG", quality=95))
    assert np.abs(got - RED).max() <= 8


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_gives_its_first_frame(fmt):
    frames = [Image.new("RGB", (12, 10), colour) for colour in (RED, BLUE, (0, 255, 0))]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert np.all(pixels(data) == RED)


def test_jpeg_far_larger_than_its_bucket_is_reduced_while_decoding():
    big = Image.fromarray(np.kron(upright_mark(), np.ones((40, 40, 1), np.uint8)))  # 2400 x 1600
    data = encoded(big, "JPEG", quality=90)
    full = decode(data)
    reduced = decode(data, bucket=lambda w, h: (32, 48))
    assert full.image.size == (2400, 1600) and (reduced.width, reduced.height) == (2400, 1600)
    assert reduced.image.size[0] < 2400 / 4 and reduced.image.size[0] >= 48 * 2  # draft, still >= 2x bucket
    small = np.asarray(fit_to_bucket(reduced.image, 32, 48)).astype(int)
    reference = np.asarray(fit_to_bucket(full.image, 32, 48)).astype(int)
    assert np.abs(small - reference).mean() < 3


def reason(data, policy=None) -> str:
    with pytest.raises(SkipImage) as caught:
        decode(data, policy)
    return caught.value.reason


def test_size_limits_are_read_from_the_header_before_decoding():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not leak: our limit decides
        assert reason(png_header_only(11_000, 10_000)) == "too_large"  # 110 MP: between PIL's warning and error
        assert reason(png_header_only(30_000, 30_000)) == "too_large"  # 900 MP: PIL's own bomb error
    small = encoded(Image.new("RGB", (100, 60)), "PNG")
    assert reason(small, ImagePolicy(max_pixels=5_000)) == "too_large"
    assert reason(encoded(Image.new("RGB", (1, 1)), "GIF")) == "too_small"  # a tracking pixel
    assert reason(small, ImagePolicy(min_side=61)) == "too_small"
    assert decode(small, ImagePolicy(max_pixels=6_000, min_side=60)).image.size == (100, 60)


def test_every_kind_of_bad_row_has_a_reason():
    jpeg = encoded(Image.fromarray(upright_mark()), "JPEG")
    assert reason(None) == "null_image"
    assert reason(b"") == "null_image"
    assert reason({"bytes": None, "path": "img/0001.jpg"}) == "null_image"
    assert reason(b"<html>404 Not Found</html>") == "undecodable"
    assert reason(jpeg[: len(jpeg) // 2]) == "truncated"
    assert reason(encoded(Image.new("RGB", (40, 30)), "PNG")[:-40]) == "truncated"
    assert reason(dds_with_unknown_pixel_format()) == "decoder_error"
    assert decode({"bytes": jpeg, "path": None}).image.size == (60, 40)  # a Hugging Face image struct


def test_no_mutated_file_escapes_as_an_exception():
    base = Image.fromarray(upright_mark())
    exif = Image.Exif()
    exif[0x0112] = 6
    files = [encoded(base, "JPEG", exif=exif.tobytes()), encoded(base, "PNG"), encoded(base, "GIF"),
             encoded(base, "TIFF"), encoded(base, "WEBP"), encoded(base.convert("RGBA"), "DDS")]
    rng = random.Random(0)
    reasons = set()
    for data in files:
        for _ in range(40):
            mutated = bytearray(data)
            for _ in range(rng.choice([1, 3])):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            if rng.random() < 0.3:
                mutated = mutated[: rng.randrange(len(mutated))]
            try:
                decode(bytes(mutated))
            except SkipImage as skip:
                reasons.add(skip.reason)
    assert reasons and reasons <= set(SKIP_REASONS)


def test_policy_validates_its_values():
    with pytest.raises(ValueError, match="background"):
        ImagePolicy(background=(0, 0, 300))
    with pytest.raises(ValueError, match="max_pixels"):
        ImagePolicy(max_pixels=0)


def test_embedded_srgb_and_broken_profiles_leave_the_pixels_alone():
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image = Image.fromarray(upright_mark())
    plain = pixels(encoded(image, "JPEG", quality=95))
    assert np.array_equal(pixels(encoded(image, "JPEG", quality=95, icc_profile=srgb)), plain)
    assert np.array_equal(pixels(encoded(image, "JPEG", quality=95, icc_profile=b"not a profile" * 20)), plain)
