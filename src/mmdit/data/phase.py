"""create_phase: resize every image of a folder of parquet shards into aspect buckets, shard by shard.

Each input shard ``<rel>.parquet`` becomes ``<output>/<rel>.parquet`` with the image resized (cover +
centre crop, see :func:`mmdit.data.images.fit_to_bucket`) to ``bucket_height`` x ``bucket_width``
(:func:`mmdit.data.buckets.bucket_size`). Every other column is kept; ``width``/``height`` become the
new size and ``orig_width``/``orig_height`` keep the source size. A row whose image does not decode is
skipped, counted and its id logged; the rest of its shard is kept.

Restartable: a shard is written to a temporary name and renamed when complete, with its statistics in
the parquet footer (key ``mmdit.phase``). A re-run skips finished shards and redoes the rest, then
writes ``phase_summary.json``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mmdit.data.buckets import bucket_size
from mmdit.data.images import DECODE_ERRORS, decode, encode, fit_to_bucket

log = logging.getLogger(__name__)

METADATA_KEY = b"mmdit.phase"
SUMMARY_NAME = "phase_summary.json"
TMP_SUFFIX = ".tmp"
IMAGE_FORMATS = ("same", "png", "jpeg")


@dataclass(frozen=True)
class PhaseParams:
    """Everything that decides the output pixels; a finished shard made with other params is an error."""

    max_resolution: int = 256
    step: int = 16
    max_area: int | None = None
    allow_upscale: bool = False
    image_format: str = "same"
    jpeg_quality: int = 95
    image_column: str = "image"

    def __post_init__(self) -> None:
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format={self.image_format!r}; choose one of {list(IMAGE_FORMATS)}")
        if self.max_resolution % self.step:
            raise ValueError(
                f"max_resolution={self.max_resolution} must be a multiple of step={self.step} "
                "so the largest bucket reaches it"
            )


def list_shards(folder: str | Path) -> list[Path]:
    """All ``*.parquet`` files under ``folder`` (recursively), as sorted paths relative to it."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"parquet folder {str(root)!r} does not exist")
    return sorted(p.relative_to(root) for p in root.rglob("*.parquet") if p.is_file())


def _output_format(params: PhaseParams, source_format: str) -> str:
    if params.image_format == "png":
        return "PNG"
    if params.image_format == "jpeg":
        return "JPEG"
    return "JPEG" if source_format in ("JPEG", "MPO") else "PNG"


def _convert_table(
    table: pa.Table, params: PhaseParams, shard_index: int, first_row: int, skipped: list
) -> tuple[pa.Table, Counter]:
    """Resize the images of one row group; drop corrupt rows (appending their ids to ``skipped``)."""
    names = table.column_names
    ids = table.column("id").to_pylist() if "id" in names else None
    kept, images, sizes, orig_sizes, buckets = [], [], [], [], Counter()
    has_orig = "orig_width" in names and "orig_height" in names
    for row, data in enumerate(table.column(params.image_column).to_pylist()):
        row_id = ids[row] if ids is not None else (shard_index << 32) + first_row + row
        try:
            image, source_format = decode(data)
        except DECODE_ERRORS as err:
            log.warning("skipping corrupt image id=%s (row %d): %s", row_id, first_row + row, type(err).__name__)
            skipped.append(row_id)
            continue
        width, height = image.size
        bucket_h, bucket_w = bucket_size(
            width, height, params.step, params.max_resolution, params.max_area, params.allow_upscale
        )
        fitted = fit_to_bucket(image, bucket_h, bucket_w)
        images.append(encode(fitted, _output_format(params, source_format), params.jpeg_quality))
        kept.append(row)
        sizes.append((bucket_h, bucket_w))
        orig_sizes.append((width, height))
        buckets[f"{bucket_h}x{bucket_w}"] += 1
    out = table.take(pa.array(kept, type=pa.int64()))
    if ids is None:
        out = out.append_column("id", pa.array([(shard_index << 32) + first_row + r for r in kept], pa.int64()))
    hw = np.array(sizes, dtype=np.int32).reshape(-1, 2)
    orig = np.array(orig_sizes, dtype=np.int32).reshape(-1, 2)
    new_columns = {
        params.image_column: pa.array(images, type=pa.binary()),
        "width": pa.array(hw[:, 1]),
        "height": pa.array(hw[:, 0]),
        "bucket_height": pa.array(hw[:, 0]),
        "bucket_width": pa.array(hw[:, 1]),
    }
    if not has_orig:
        new_columns["orig_width"] = pa.array(orig[:, 0])
        new_columns["orig_height"] = pa.array(orig[:, 1])
    for name, column in new_columns.items():
        if name in out.column_names:
            out = out.set_column(out.column_names.index(name), name, column)
        else:
            out = out.append_column(name, column)
    return out, buckets


def convert_shard(
    in_path: Path, out_path: Path, params: PhaseParams, shard_index: int = 0, row_group_size: int = 32
) -> dict:
    """Convert one shard (atomically: temporary file, then rename) and return its statistics."""
    start = time.perf_counter()
    source = pq.ParquetFile(in_path)
    if params.image_column not in source.schema_arrow.names:
        raise ValueError(
            f"{in_path} has no column {params.image_column!r} (columns: {source.schema_arrow.names}); "
            "pass --image_column"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + TMP_SUFFIX)
    skipped: list = []
    buckets: Counter = Counter()
    rows_in = rows_out = 0
    writer = None
    try:
        groups = range(source.num_row_groups)
        tables = (source.read_row_group(i) for i in groups) if len(groups) else [source.schema_arrow.empty_table()]
        for table in tables:
            converted, counts = _convert_table(table, params, shard_index, rows_in, skipped)
            rows_in += table.num_rows
            rows_out += converted.num_rows
            buckets.update(counts)
            if writer is None:
                writer = pq.ParquetWriter(tmp, converted.schema)
            writer.write_table(converted, row_group_size=row_group_size)
        stats = {
            "source": str(in_path),
            "rows_in": rows_in,
            "rows_out": rows_out,
            "skipped_ids": skipped,
            "buckets": dict(buckets),
            "params": asdict(params),
            "seconds": time.perf_counter() - start,
        }
        writer.add_key_value_metadata({METADATA_KEY: json.dumps(stats).encode()})
        writer.close()
        writer = None
        os.replace(tmp, out_path)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    return stats


def read_shard_stats(path: Path) -> dict | None:
    """Statistics stored in a finished output shard's footer, or None if it has none."""
    metadata = pq.ParquetFile(path).metadata.metadata or {}
    raw = metadata.get(METADATA_KEY)
    return json.loads(raw) if raw else None


def _convert_task(task: tuple) -> dict:
    in_path, out_path, params, shard_index, row_group_size = task
    return convert_shard(in_path, out_path, params, shard_index, row_group_size)


def create_phase(
    input_dir: str | Path,
    output_dir: str | Path,
    max_resolution: int = 256,
    step: int = 16,
    max_area: int | None = None,
    allow_upscale: bool = False,
    n_proc: int = 1,
    image_format: str = "same",
    jpeg_quality: int = 95,
    image_column: str = "image",
    row_group_size: int = 32,
    progress: bool = True,
) -> dict:
    """Bucket every shard of ``input_dir`` into ``output_dir``; return (and write) the run summary.

    ``n_proc`` worker processes convert shards in parallel (0 = one per CPU). Small row groups
    (``row_group_size`` rows) keep the training reader's random access cheap.
    """
    params = PhaseParams(max_resolution, step, max_area, allow_upscale, image_format, jpeg_quality, image_column)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if input_dir.resolve() == output_dir.resolve():
        raise ValueError("output_dir must differ from input_dir (create_phase never overwrites its input)")
    shards = list_shards(input_dir)
    if not shards:
        raise FileNotFoundError(f"no *.parquet files under {str(input_dir)!r}")
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    done: dict[Path, dict] = {}
    todo = []
    for index, rel in enumerate(shards):
        out_path = output_dir / rel
        stale = out_path.with_name(out_path.name + TMP_SUFFIX)
        if stale.exists():
            stale.unlink()  # left by an interrupted run
        stats = read_shard_stats(out_path) if out_path.exists() else None
        if stats is not None:
            if stats["params"] != asdict(params):
                raise ValueError(
                    f"{out_path} was made with different settings {stats['params']}, not {asdict(params)}; "
                    "use a new output folder or delete it"
                )
            done[rel] = stats
        else:
            todo.append((input_dir / rel, out_path, params, index, row_group_size))
    if done:
        log.info("resuming: %d of %d shards already finished", len(done), len(shards))

    total_rows = sum(pq.ParquetFile(task[0]).metadata.num_rows for task in todo)
    n_proc = n_proc or os.cpu_count() or 1
    results: dict[Path, dict] = {}
    with tqdm(total=total_rows, unit="img", desc="create_phase", disable=not progress) as bar:
        if n_proc <= 1 or len(todo) <= 1:
            for task in todo:
                stats = _convert_task(task)
                results[Path(stats["source"])] = stats
                bar.update(stats["rows_in"])
        else:
            context = multiprocessing.get_context("spawn")  # pyarrow's threads make fork unsafe
            with context.Pool(min(n_proc, len(todo))) as pool:
                for stats in pool.imap_unordered(_convert_task, todo):
                    results[Path(stats["source"])] = stats
                    bar.update(stats["rows_in"])
    for rel in shards:
        if rel not in done:
            done[rel] = results[input_dir / rel]
    seconds = time.perf_counter() - start
    return _write_summary(output_dir, [done[rel] for rel in shards], params, len(todo), total_rows, seconds)


def _write_summary(output_dir: Path, all_stats: list[dict], params: PhaseParams, converted: int, rows_converted: int,
                   seconds: float) -> dict:
    buckets: Counter = Counter()
    skipped_ids: list = []
    for stats in all_stats:
        buckets.update(stats["buckets"])
        skipped_ids.extend(stats["skipped_ids"])
    summary = {
        "params": asdict(params),
        "shards": len(all_stats),
        "shards_converted_this_run": converted,
        "shards_resumed": len(all_stats) - converted,
        "rows_in": sum(s["rows_in"] for s in all_stats),
        "rows_out": sum(s["rows_out"] for s in all_stats),
        "skipped": len(skipped_ids),
        "skipped_ids": skipped_ids,
        "buckets": dict(sorted(buckets.items(), key=lambda kv: tuple(int(x) for x in kv[0].split("x")))),
        "seconds": round(seconds, 3),
        "images_per_s_this_run": round(rows_converted / seconds, 1) if seconds > 0 else None,
    }
    tmp = output_dir / (SUMMARY_NAME + TMP_SUFFIX)
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, output_dir / SUMMARY_NAME)
    if skipped_ids:
        shown = ", ".join(str(i) for i in skipped_ids[:20])
        log.warning("skipped %d corrupt images; ids: %s%s", len(skipped_ids), shown, " ..." if len(skipped_ids) > 20
                    else "")
    return summary
