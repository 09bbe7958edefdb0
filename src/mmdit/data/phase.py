"""create_phase: resize every image of a folder of parquet shards into aspect buckets, shard by shard.

Each input shard ``<rel>.parquet`` becomes ``<output>/<rel>.parquet`` with the image resized (cover +
centre crop, see :func:`mmdit.data.images.fit_to_bucket`) to ``bucket_height`` x ``bucket_width``
(:func:`mmdit.data.buckets.bucket_size`). Every other column is kept; ``width``/``height`` become the
new size and ``orig_width``/``orig_height`` keep the source (upright) size. Each image is decoded by
:func:`mmdit.data.images.decode` into the picture a browser shows (EXIF orientation, 16-bit, alpha over
a background, palettes, CMYK, first frame of an animation). A row that is not such a picture is skipped
with its id and a reason (:data:`mmdit.data.images.SKIP_REASONS`); the rest of its shard is kept. An
input file that is not readable parquet is listed with its reason and skipped (``strict``: refused
before any work); a shard whose worker dies is reported as failed and retried by the next run.

Restartable: a shard is written to a temporary name and renamed when complete, with its statistics in
the parquet footer (key ``mmdit.phase``). A re-run skips finished shards and redoes the rest, then
writes ``phase_summary.json``: rows in and out, every skipped id with its reason, counts per reason,
unreadable input files and failed shards.
"""

from __future__ import annotations

import json
import logging
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
from mmdit.data.images import (
    DEFAULT_BACKGROUND,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    ImagePolicy,
    decode,
    encode,
    fit_to_bucket,
    skip_reason,
)
from mmdit.data.phase_inputs import check_inputs, describe_problems
from mmdit.data.phase_summary import write_summary
from mmdit.data.phase_workers import run_tasks

log = logging.getLogger(__name__)

METADATA_KEY = b"mmdit.phase"
SUMMARY_NAME = "phase_summary.json"
TMP_SUFFIX = ".tmp"
# rows per written row group: the RowReader reads a whole row group for one random row (bench/reader.py)
DEFAULT_ROW_GROUP_SIZE = 32
IMAGE_FORMATS = ("same", "png", "jpeg")


class UnreadableInputError(ValueError):
    """``strict`` create_phase found input files that are not readable parquet; the message names them."""


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
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    background: tuple[int, int, int] = DEFAULT_BACKGROUND

    def __post_init__(self) -> None:
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format={self.image_format!r}; choose one of {list(IMAGE_FORMATS)}")
        if self.max_resolution % self.step:
            raise ValueError(
                f"max_resolution={self.max_resolution} must be a multiple of step={self.step} "
                "so the largest bucket reaches it"
            )
        object.__setattr__(self, "background", self.policy.background)  # validated, as a tuple

    @property
    def policy(self) -> ImagePolicy:
        return ImagePolicy(self.max_pixels, self.min_side, self.background)

    def as_json(self) -> dict:
        """The params as they read back from a shard footer (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))


def list_shards(folder: str | Path) -> list[Path]:
    """All ``*.parquet`` files under ``folder`` (recursively, skipping hidden folders such as ``.git``).

    Returned as sorted paths relative to ``folder``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"parquet folder {str(root)!r} does not exist")
    return sorted(
        rel for rel in (p.relative_to(root) for p in root.rglob("*.parquet") if p.is_file())
        if not any(part.startswith(".") for part in rel.parts[:-1])
    )


def _output_format(params: PhaseParams, source_format: str) -> str:
    if params.image_format == "png":
        return "PNG"
    if params.image_format == "jpeg":
        return "JPEG"
    return "JPEG" if source_format in ("JPEG", "MPO") else "PNG"


def _convert_row(data, params: PhaseParams) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """``(encoded bytes, (bucket_h, bucket_w), (orig_w, orig_h))`` of one image, or SkipImage."""

    def bucket(width: int, height: int) -> tuple[int, int]:
        return bucket_size(width, height, params.step, params.max_resolution, params.max_area, params.allow_upscale)

    decoded = decode(data, params.policy, bucket)
    bucket_h, bucket_w = decoded.bucket
    try:
        fitted = fit_to_bucket(decoded.image, bucket_h, bucket_w)
        encoded = encode(fitted, _output_format(params, decoded.source_format), params.jpeg_quality)
    except Exception as err:  # MemoryError and friends while resizing: one row, not the shard
        raise skip_reason(err) from err
    return encoded, (bucket_h, bucket_w), (decoded.width, decoded.height)


def _convert_table(
    table: pa.Table, params: PhaseParams, shard_index: int, first_row: int, skipped: list
) -> tuple[pa.Table, Counter]:
    """Resize the images of one row group; drop the rows that are not pictures (appended to ``skipped``)."""
    names = table.column_names
    ids = table.column("id").to_pylist() if "id" in names else None
    kept, images, sizes, orig_sizes, buckets = [], [], [], [], Counter()
    has_orig = "orig_width" in names and "orig_height" in names
    for row, data in enumerate(table.column(params.image_column).to_pylist()):
        row_id = ids[row] if ids is not None else (shard_index << 32) + first_row + row
        try:
            encoded, (bucket_h, bucket_w), orig = _convert_row(data, params)
        except Exception as err:
            skip = skip_reason(err)
            log.debug("skipping id=%s (row %d): %s", row_id, first_row + row, skip)
            skipped.append({"id": row_id, "row": first_row + row, "reason": skip.reason, "detail": skip.detail})
            continue
        images.append(encoded)
        kept.append(row)
        sizes.append((bucket_h, bucket_w))
        orig_sizes.append(orig)
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
    in_path: Path, out_path: Path, params: PhaseParams, shard_index: int = 0,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
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
    skipped: list[dict] = []
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
            "skipped": skipped,
            "buckets": dict(buckets),
            "params": params.as_json(),
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
    """Statistics stored in a finished output shard's footer, or None if it has none (or is unreadable)."""
    try:
        metadata = pq.ParquetFile(path).metadata.metadata or {}
    except Exception:  # a damaged output shard is simply redone
        return None
    raw = metadata.get(METADATA_KEY)
    return json.loads(raw) if raw else None


def _convert_task(task: tuple) -> dict:
    in_path, out_path, params, shard_index, row_group_size = task
    return convert_shard(in_path, out_path, params, shard_index, row_group_size)


def _params_mismatch(found: dict, wanted: dict) -> str:
    keys = sorted(k for k in found.keys() | wanted.keys() if found.get(k) != wanted.get(k))
    return ", ".join(f"{k}={found.get(k, '<absent>')!r} (now {wanted.get(k, '<absent>')!r})" for k in keys)


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
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    strict: bool = False,
) -> dict:
    """Bucket every shard of ``input_dir`` into ``output_dir``; return (and write) the run summary.

    ``n_proc`` worker processes convert shards in parallel (0 = one per CPU; 1 converts in this
    process). Small row groups (``row_group_size`` rows) keep the training reader's random access
    cheap. ``max_pixels``, ``min_side`` and ``background`` are the :class:`ImagePolicy`. With
    ``strict``, input files that are not readable parquet raise :class:`UnreadableInputError` before
    any work; otherwise they are listed in the summary and skipped.
    """
    params = PhaseParams(max_resolution, step, max_area, allow_upscale, image_format, jpeg_quality, image_column,
                         max_pixels, min_side, tuple(background))
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if input_dir.resolve() == output_dir.resolve():
        raise ValueError("output_dir must differ from input_dir (create_phase never overwrites its input)")
    shards = list_shards(input_dir)
    if not shards:
        raise FileNotFoundError(f"no *.parquet files under {str(input_dir)!r}")
    start = time.perf_counter()

    done: dict[Path, dict] = {}
    todo_rels = []
    for rel in shards:
        out_path = output_dir / rel
        stats = read_shard_stats(out_path) if out_path.exists() else None
        if stats is None:
            todo_rels.append(rel)
        elif stats["params"] != params.as_json():
            raise ValueError(
                f"{out_path} was made with different settings: {_params_mismatch(stats['params'], params.as_json())}; "
                "use a new output folder or delete it"
            )
        else:
            done[rel] = stats
    unreadable = check_inputs(input_dir, todo_rels, image_column)
    if unreadable:
        message = describe_problems(unreadable)
        if strict:
            raise UnreadableInputError(f"{message}. Fix or remove them, or run without --strict to skip them")
        log.warning("%s: skipping them (listed in %s)", message, output_dir / SUMMARY_NAME)
    if done:
        log.info("resuming: %d of %d shards already finished", len(done), len(shards))

    output_dir.mkdir(parents=True, exist_ok=True)
    shard_index = {rel: i for i, rel in enumerate(shards)}
    for rel in todo_rels:
        stale = (output_dir / rel).with_name(rel.name + TMP_SUFFIX)
        if stale.exists():
            stale.unlink()  # left by an interrupted run
    convert = [rel for rel in todo_rels if rel not in unreadable]
    todo = [(input_dir / rel, output_dir / rel, params, shard_index[rel], row_group_size) for rel in convert]
    total_rows = sum(pq.ParquetFile(task[0]).metadata.num_rows for task in todo)
    n_proc = n_proc or os.cpu_count() or 1
    with tqdm(total=total_rows, unit="img", desc="create_phase", disable=not progress) as bar:
        def on_done(index: int, stats: dict) -> None:
            done[convert[index]] = stats
            bar.update(stats["rows_in"])

        failures = run_tasks(_convert_task, todo, n_proc if len(todo) > 1 else 1, on_done)
    failed = {convert[i]: reason for i, reason in failures.items()}
    for rel, reason in failed.items():
        log.error("shard %s failed: %s (a re-run retries it)", rel.as_posix(), reason)
    return write_summary(
        output_dir / SUMMARY_NAME,
        {rel.as_posix(): done[rel] for rel in shards if rel in done},
        params.as_json(),
        converted=len(todo) - len(failed),
        rows_converted=total_rows,
        seconds=time.perf_counter() - start,
        unreadable={rel.as_posix(): reason for rel, reason in unreadable.items()},
        failed={rel.as_posix(): reason for rel, reason in failed.items()},
    )
