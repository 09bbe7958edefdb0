"""Random-row reads through RowReader vs pyarrow reading as many rows sequentially, and the row-group curve.

    OMP_NUM_THREADS=1 python bench/reader.py [--shards 4] [--rows_per_shard 1024] [--seconds 1.0]

Builds (once, cached under --workdir) shards with create_phase's columns and real-size payloads:
unique 256 px JPEGs of 20-45 KB (smooth colour fields plus noise), one copy of the dataset per row-group
size in --sizes. For each size, one thread, warm page cache, batches of --batch random ids over the whole
dataset (as the loader asks for a bucket's rows):
  fetch    : RowReader.fetch, footers cached, rows per CPU second (the I/O and arrow -> Python part of a read)
  uncached : the same with no footer cache and no open files: what the old reader paid once the shards
             outnumber its 64 open files per thread
  bytes/row: column-chunk bytes parquet must read per random row (image + captions of one row group)
and for a 10k-row shard of that size (metadata columns, tiny images): footer bytes, parse time, the
memory one parsed footer holds, and the rows/CPU-s of a reader that parses such a footer for every row
(``uncached est.``: what 64 open files per thread give with thousands of shards).
Then at --row_group_size, the floor: pyarrow reading the same number of rows of the same columns
sequentially (iter_batches), and ours / floor printed as a ratio; then the same with JPEG decode on both
sides (RowReader.read vs floor + decode). The last line is ``ratio=<fetch / floor>``.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmdit.data.images import decode, fit_to_bucket  # noqa: E402
from mmdit.data.indices import build_index  # noqa: E402
from mmdit.data.phase import DEFAULT_ROW_GROUP_SIZE  # noqa: E402
from mmdit.data.rows import FooterCache, RowReader  # noqa: E402

COLUMNS = ["image", "caption_long", "caption_short"]
CAPTION = "a photo of object {} with a fairly long recaptioned description of the scene and its light"


def jpeg_pool(workdir: Path, count: int) -> list[bytes]:
    """``count`` distinct 256 px JPEGs, 20-45 KB each (cached: making them takes ~10 ms each)."""
    path = workdir / f"pool_{count}.parquet"
    if path.exists():
        return pq.read_table(path).column("image").to_pylist()
    rng = np.random.default_rng(0)
    pool = []
    for _ in range(count):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(low).resize((256, 256), Image.BICUBIC), dtype=np.float32)
        noise = rng.uniform(8, 32) * rng.standard_normal(base.shape, dtype=np.float32)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        pool.append(buffer.getvalue())
    workdir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pool}), path)
    return pool


def shard_table(images: list[bytes], first_id: int) -> pa.Table:
    """The columns create_phase writes, for 256 x 256 rows."""
    n = len(images)
    side = pa.array(np.full(n, 256, np.int32))
    return pa.table({
        "image": pa.array(images, pa.binary()),
        "caption_long": [CAPTION.format(first_id + i) for i in range(n)],
        "caption_short": [f"object {first_id + i}" for i in range(n)],
        "id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
        "aspect_ratio": pa.array(np.ones(n, np.float32)),
        "width": side, "height": side, "bucket_height": side, "bucket_width": side,
        "orig_width": pa.array(np.full(n, 768, np.int32)), "orig_height": pa.array(np.full(n, 768, np.int32)),
    })


def build_dataset(folder: Path, pool: list[bytes], shards: int, rows_per_shard: int, row_group_size: int) -> None:
    marker = folder / f".done_{shards}_{rows_per_shard}_{len(pool)}"
    if marker.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):  # each shard a different rotation of the pool: no two rows of a shard alike
        images = [pool[(shard * 97 + i) % len(pool)] for i in range(rows_per_shard)]
        table = shard_table(images, shard * rows_per_shard)
        pq.write_table(table, folder / f"part_{shard:05d}.parquet", row_group_size=row_group_size)
    marker.touch()


def timed(work, seconds: float) -> float:
    """Calls of ``work`` (which returns rows done) for about ``seconds`` of CPU; rows per CPU second.

    CPU time, not wall time: with the page cache warm a read is all CPU (copies, decompression), and on
    a shared machine CPU time is what stays put when other jobs take the cores.
    """
    work()  # warm-up: page cache, footers, open files
    rows, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        rows += work()
    return rows / (time.process_time() - start)


def random_rows(reader: RowReader, total: int, batch: int, decode_images: bool, seed: int = 0):
    rng = np.random.default_rng(seed)

    def work() -> int:
        ids = rng.integers(total, size=batch)
        (reader.read if decode_images else reader.fetch)(ids)
        return batch
    return work


def sequential_rows(folder: Path, batch: int, decode_images: bool):
    """The floor: pyarrow streaming the same columns in storage order, ``batch`` rows at a time."""
    state = {"it": iter(())}
    paths = sorted(folder.glob("*.parquet"))

    def batches():
        for path in paths:
            yield from pq.ParquetFile(path).iter_batches(batch_size=batch, columns=COLUMNS, use_threads=False)

    def work() -> int:
        record = next(state["it"], None)
        if record is None:
            state["it"] = batches()
            record = next(state["it"])
        values = {name: record.column(name).to_pylist() for name in COLUMNS}
        if decode_images:
            for image in values["image"]:
                fit_to_bucket(decode(image).image, 256, 256)
        return record.num_rows
    return work


def bytes_per_random_row(folder: Path) -> float:
    """Compressed bytes of image + captions in one row group: what one isolated random row costs to read."""
    metadata = pq.read_metadata(next(folder.glob("*.parquet")))
    names = metadata.schema.to_arrow_schema().names
    wanted = [names.index(c) for c in COLUMNS]
    per_group = [sum(metadata.row_group(g).column(c).total_compressed_size for c in wanted)
                 for g in range(metadata.num_row_groups)]
    return float(np.mean(per_group))


PARSED_RSS = """
import sys, pyarrow.parquet as pq
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
pq.read_metadata(sys.argv[1]); before = rss(); held = [pq.read_metadata(sys.argv[1]) for _ in range(50)]
print((rss() - before) / 50)
"""


def footer_cost(workdir: Path, row_group_size: int, rows: int = 10_000) -> tuple[int, float, float]:
    """Footer bytes, parse CPU milliseconds (median of 15) and resident bytes once parsed (in a fresh
    process, 50 copies held), of a ``rows``-row shard with this row-group size: what the cache holds."""
    path = workdir / f"footer_{rows}_{row_group_size}.parquet"
    if not path.exists():
        pq.write_table(shard_table([b"\xff\xd8jpeg"] * rows, 0), path, row_group_size=row_group_size)
    times = []
    for _ in range(15):
        start = time.process_time()
        metadata = pq.read_metadata(path)
        times.append(time.process_time() - start)
    resident = float(subprocess.run([sys.executable, "-c", PARSED_RSS, str(path)], capture_output=True,
                                    text=True, check=True).stdout)
    return metadata.serialized_size, float(np.median(times)) * 1e3, resident


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mmdit_bench_reader"))
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows_per_shard", type=int, default=1024)
    parser.add_argument("--pool", type=int, default=1024, help="distinct JPEGs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--row_group_size", type=int, default=DEFAULT_ROW_GROUP_SIZE,
                        help="the size the floor comparison runs at (default: create_phase's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per measurement")
    args = parser.parse_args()

    pool = jpeg_pool(args.workdir, args.pool)
    print(f"payload: {len(pool)} distinct JPEGs, mean {np.mean([len(b) for b in pool]) / 1024:.1f} KB; "
          f"{args.shards} shards x {args.rows_per_shard} rows; batches of {args.batch} random ids")
    total = args.shards * args.rows_per_shard
    print("| rows/group | fetch rows/CPU-s | uncached rows/CPU-s | KB read/row | 10k-row shard: footer KB "
          "| parse ms | parsed MB | uncached est. |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in sorted(set(args.sizes) | {args.row_group_size}):
        folder = args.workdir / f"rg{size}"
        build_dataset(folder, pool, args.shards, args.rows_per_shard, size)
        index = build_index(folder)
        cached = timed(random_rows(RowReader(index, footers=FooterCache()), total, args.batch, False), args.seconds)
        bare = RowReader(index, footers=None, open_files=0)
        uncached = timed(random_rows(bare, total, args.batch, False), args.seconds)
        footer_bytes, parse_ms, resident = footer_cost(args.workdir, size)
        print(f"| {size} | {cached:.0f} | {uncached:.0f} | {bytes_per_random_row(folder) / 1024:.0f} | "
              f"{footer_bytes / 1024:.0f} | {parse_ms:.2f} | {resident / 2**20:.1f} | "
              f"{1 / (1 / cached + parse_ms / 1e3):.0f} |")

    folder = args.workdir / f"rg{args.row_group_size}"
    index = build_index(folder)
    ours = timed(random_rows(RowReader(index), total, args.batch, False), args.seconds)
    floor = timed(sequential_rows(folder, args.batch, False), args.seconds)
    ours_decoded = timed(random_rows(RowReader(index), total, args.batch, True), args.seconds)
    floor_decoded = timed(sequential_rows(folder, args.batch, True), args.seconds)
    print(f"row group {args.row_group_size}: fetch random {ours:.0f} rows/CPU-s, floor sequential {floor:.0f}; "
          f"with decode + resize: {ours_decoded:.0f} vs {floor_decoded:.0f} rows/CPU-s "
          f"(ratio {ours_decoded / floor_decoded:.2f})")
    print(f"ratio={ours / floor:.3f}")


if __name__ == "__main__":
    main()
