"""Raw parquet shards from captioned image files: the input of create_phase for any "images + captions" set.

Each row is ``id``, ``image`` (the file's own bytes: PNG alpha, JPEG EXIF and all, which create_phase decodes as a
browser would), ``caption_long``, ``caption_short``, ``width`` / ``height`` / ``aspect_ratio`` (read from the
image header), and whatever metadata columns the rows carry (strings). Shards are written to a temporary name and
renamed, so a reader never sees half a shard.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

BASE_SCHEMA = [
    ("id", pa.int64()),
    ("image", pa.binary()),
    ("caption_long", pa.string()),
    ("caption_short", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("aspect_ratio", pa.float32()),
]


@dataclass
class CaptionedImage:
    """One image file with its two captions and free-form string metadata (its own columns in the shards)."""

    path: Path
    caption_long: str
    caption_short: str
    metadata: dict[str, str] = field(default_factory=dict)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header (nothing decoded)."""
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def _rows(images: Iterable[CaptionedImage], first_id: int) -> Iterator[dict]:
    for i, item in enumerate(images):
        data = Path(item.path).read_bytes()
        width, height = image_size(data)
        yield {"id": first_id + i, "image": data, "caption_long": item.caption_long,
               "caption_short": item.caption_short, "width": width, "height": height,
               "aspect_ratio": width / height, **item.metadata}


def write_shards(images: list[CaptionedImage], out_dir: str | Path, rows_per_shard: int = 512,
                 first_id: int = 0, row_group_size: int = 64) -> list[Path]:
    """``shard_00000.parquet``... under ``out_dir`` holding ``images`` in order, ids from ``first_id``."""
    if rows_per_shard <= 0:
        raise ValueError(f"rows_per_shard={rows_per_shard} must be > 0")
    if not images:
        raise ValueError(f"no images to write to {out_dir}")
    keys = sorted({k for item in images for k in item.metadata})
    schema = pa.schema(BASE_SCHEMA + [(k, pa.string()) for k in keys])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(images, first_id)
    paths = []
    for shard, start in enumerate(range(0, len(images), rows_per_shard)):
        chunk = [next(rows) for _ in range(min(rows_per_shard, len(images) - start))]
        for row in chunk:
            for k in keys:
                row.setdefault(k, None)
        path = out / f"shard_{shard:05d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(pa.Table.from_pylist(chunk, schema=schema), tmp, row_group_size=row_group_size)
        os.replace(tmp, path)
        paths.append(path)
    return paths
