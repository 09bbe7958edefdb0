"""Real encoded image files as the web serves them, made with PIL and numpy: shared by the data tests."""

import io
import struct
import zlib

import numpy as np
from PIL import Image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def upright_mark() -> np.ndarray:
    """A 40x60 (HxW) picture, white with a red block in the top-left and a blue bar along the bottom."""
    picture = np.full((40, 60, 3), 255, np.uint8)
    picture[2:14, 2:18] = RED
    picture[32:38, 10:50] = BLUE
    return picture


# EXIF orientation -> how the camera stored the upright picture (numpy, independent of PIL's tables)
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, 1),  # stored turned left; the viewer turns it right
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),
}


def half_transparent_rgba() -> Image.Image:
    """Left third opaque red; middle third blue at alpha 128; right third invisible black."""
    rgba = np.zeros((10, 30, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)
    rgba[:, 10:20] = (0, 0, 255, 128)
    return Image.fromarray(rgba, "RGBA")


def png_header_only(width: int, height: int) -> bytes:
    """A real PNG signature and IHDR claiming ``width`` x ``height``, with one empty IDAT: a bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def dds_with_unknown_pixel_format() -> bytes:
    data = bytearray(encoded(Image.new("RGBA", (4, 4)), "DDS"))
    data[80:84] = struct.pack("<I", 25)  # pixel-format flags no decoder knows: NotImplementedError
    return bytes(data)



def oriented_jpeg(orientation: int, quality: int = 95) -> bytes:
    """The upright mark as a camera stores it with EXIF ``orientation``."""
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright_mark())))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(stored, "JPEG", exif=exif.tobytes(), quality=quality)
