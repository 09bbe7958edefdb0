"""Write the procedural shapes dataset as parquet shards shaped like the real (seed) dataset.

Columns: ``id`` (unique int64), ``image`` (PNG bytes), ``caption_long``, ``caption_short``, ``width``,
``height``, ``aspect_ratio`` (width / height), and the attribute columns ``shape``, ``colour``,
``position``, ``size``, ``background`` used by the scorer. Row ``i`` depends only on ``(seed, i)``, so
the output is identical for any shard size.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmdit.data import shapes
from mmdit.data.captioned_images import BASE_SCHEMA

DEMO_SCHEMA = pa.schema([*BASE_SCHEMA, ("shape", pa.string()), ("colour", pa.string()), ("position", pa.string()),
                         ("size", pa.string()), ("background", pa.string())])


def demo_row(row_id: int, seed: int, holdout, corrupt_fraction: float, min_side: int, max_side: int,
             max_aspect: float = 2.0) -> dict:
    """One row of the dataset, a pure function of ``(seed, row_id)`` and the options."""
    rng = np.random.default_rng([seed, row_id])
    spec = shapes.random_spec(rng, holdout)
    width, height = shapes.random_image_size(rng, min_side, max_side, max_aspect)
    image = shapes.draw_shape(spec, width, height, rng)
    if rng.random() < corrupt_fraction:
        data = b"not an image " + rng.bytes(64)
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    return {
        "id": row_id,
        "image": data,
        "caption_long": shapes.caption_long(spec),
        "caption_short": shapes.caption_short(spec),
        "width": width,
        "height": height,
        "aspect_ratio": width / height,
        **spec.to_dict(),
    }


def make_demo_dataset(
    out_dir: str | Path,
    num_rows: int = 2000,
    rows_per_shard: int = 500,
    seed: int = 0,
    holdout=shapes.DEFAULT_HOLDOUT,
    corrupt_fraction: float = 0.0,
    min_side: int = 64,
    max_side: int = 160,
    row_group_size: int = 64,
    max_aspect: float = 2.0,
) -> list[Path]:
    """Write ``num_rows`` rows as ``shard_00000.parquet``... under ``out_dir``; return the shard paths.

    A ``demo_dataset.json`` next to the shards records the options (holdout list included) so a
    scorer can tell seen from held-out combinations later.
    """
    if num_rows <= 0 or rows_per_shard <= 0:
        raise ValueError(f"num_rows={num_rows} and rows_per_shard={rows_per_shard} must be > 0")
    if not 0.0 <= corrupt_fraction <= 1.0:
        raise ValueError(f"corrupt_fraction={corrupt_fraction} must be in [0, 1]")
    if min_side < 16 or max_side < min_side:
        raise ValueError(f"need 16 <= min_side <= max_side, got min_side={min_side}, max_side={max_side}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    holdout = tuple(tuple(p) for p in holdout)
    paths = []
    for shard, start in enumerate(range(0, num_rows, rows_per_shard)):
        rows = [
            demo_row(i, seed, holdout, corrupt_fraction, min_side, max_side, max_aspect)
            for i in range(start, min(start + rows_per_shard, num_rows))
        ]
        table = pa.Table.from_pylist(rows, schema=DEMO_SCHEMA)
        path = out / f"shard_{shard:05d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp, row_group_size=row_group_size)
        os.replace(tmp, path)
        paths.append(path)
    info = {
        "num_rows": num_rows,
        "rows_per_shard": rows_per_shard,
        "seed": seed,
        "holdout": [list(p) for p in holdout],
        "corrupt_fraction": corrupt_fraction,
        "min_side": min_side,
        "max_side": max_side,
        "max_aspect": max_aspect,
        "size_fraction": dict(shapes.SIZE_FRACTION),
    }
    (out / "demo_dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return paths
