"""Benchmark create_indices against the pyarrow floor, and create_phase images/s.

    OMP_NUM_THREADS=1 python bench/indexing.py [--rows 1000000] [--shards 500] [--row_group_size 32]

Builds (once, cached under --workdir) a metadata-realistic bucketed dataset: the columns create_phase
writes, with tiny image bytes. Then times, best of --repeats:
  floor : pyarrow reading only bucket_height/bucket_width of every file (same thread pool)
  ours  : create_indices end to end (list, stat, read, build arrays, save the .npz)
  load  : BucketIndex.load with its shard-set check
and create_phase on a few hundred demo images, and on real-photo sizes (1-12 MP JPEGs made here): the
per-image decode + resize + encode with the JPEG ``draft`` reduction (after) and with a full decode
(before), one process, printed as a ratio. The last line is ``rows_per_s=<ours>``.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmdit.data.buckets import bucket_size  # noqa: E402
from mmdit.data.demo_dataset import make_demo_dataset  # noqa: E402
from mmdit.data.images import decode, encode, fit_to_bucket  # noqa: E402
from mmdit.data.indices import BucketIndex, create_indices  # noqa: E402
from mmdit.data.phase import create_phase  # noqa: E402

PHOTO_MEGAPIXELS = (1, 2, 4, 8, 12)
BUCKETS = [(256, 256), (192, 256), (256, 192), (176, 256), (256, 176), (144, 256), (256, 144), (128, 256)]
CAPTIONS = [f"a photo of object {i} with a fairly long recaptioned description of the scene" for i in range(64)]


def build_dataset(folder: Path, rows: int, shards: int, row_group_size: int) -> None:
    marker = folder / f".done_{rows}_{shards}_{row_group_size}"
    if marker.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_shard = rows // shards
    captions = pa.array(CAPTIONS)
    for shard in range(shards):
        n = per_shard if shard < shards - 1 else rows - per_shard * (shards - 1)
        which = rng.integers(len(BUCKETS), size=n)
        hw = np.array(BUCKETS, dtype=np.int32)[which]
        caption_idx = pa.array(rng.integers(len(CAPTIONS), size=n))
        table = pa.table({
            "id": pa.array(np.arange(shard * per_shard, shard * per_shard + n, dtype=np.int64)),
            "image": pa.array(np.full(n, b"\x89PNG", dtype=object), pa.binary()),
            "caption_long": captions.take(caption_idx),
            "caption_short": captions.take(caption_idx),
            "aspect_ratio": pa.array((hw[:, 1] / hw[:, 0]).astype(np.float32)),
            "width": pa.array(hw[:, 1]),
            "height": pa.array(hw[:, 0]),
            "bucket_height": pa.array(hw[:, 0]),
            "bucket_width": pa.array(hw[:, 1]),
            "orig_width": pa.array(hw[:, 1] * 3),
            "orig_height": pa.array(hw[:, 0] * 3),
        })
        pq.write_table(table, folder / f"part_{shard:05d}.parquet", row_group_size=row_group_size)
    marker.touch()


def floor_read(folder: Path, n_proc: int) -> int:
    files = sorted(folder.glob("*.parquet"))

    def read(path: Path) -> int:
        table = pq.ParquetFile(path).read(columns=["bucket_height", "bucket_width"], use_threads=False)
        return len(table.column(0).to_numpy())

    if n_proc <= 1:
        return sum(map(read, files))
    with ThreadPoolExecutor(n_proc) as pool:
        return sum(pool.map(read, files))


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def make_photos(megapixels: tuple[int, ...], seed: int = 0) -> list[bytes]:
    """Photo-like 4:3 JPEGs (smooth content plus sensor noise, quality 90), one per size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = []
    for mp in megapixels:
        width = int(round((mp * 1e6 * 4 / 3) ** 0.5 / 16)) * 16
        height = width * 3 // 4
        coarse = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((width, height),
                                                                                            Image.Resampling.BICUBIC)
        pixels = np.asarray(coarse).astype(np.int16) + rng.integers(-6, 7, (height, width, 1), dtype=np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        photos.append(buffer.getvalue())
    return photos


def photo_rate(photos: list[bytes], max_resolution: int, draft: bool, repeats: int) -> float:
    """Images/s of decode + fit_to_bucket + JPEG encode in this process (best of ``repeats``)."""
    def bucket(width: int, height: int) -> tuple[int, int]:
        return bucket_size(width, height, 16, max_resolution)

    def run() -> None:
        for data in photos:
            decoded = decode(data, bucket=bucket if draft else None)
            size = bucket(decoded.width, decoded.height)
            encode(fit_to_bucket(decoded.image, *size), "JPEG")

    seconds, _ = best_of(repeats, run)
    return len(photos) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=500)
    parser.add_argument("--row_group_size", type=int, default=32, help="as create_phase writes (default 32)")
    parser.add_argument("--n_proc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phase_images", type=int, default=300, help="0 skips the create_phase timing")
    parser.add_argument("--photo_resolution", type=int, default=256,
                        help="bucket long side for the 1-12 MP photo timing (0 skips it)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mmdit_bench_indexing"))
    args = parser.parse_args()

    work = Path(args.workdir)
    data = work / "bucketed"
    start = time.perf_counter()
    build_dataset(data, args.rows, args.shards, args.row_group_size)
    size_mb = sum(p.stat().st_size for p in data.glob("*.parquet")) / 2**20
    print(f"dataset: {args.rows} rows, {args.shards} shards, row groups of {args.row_group_size}, "
          f"{size_mb:.0f} MiB (ready in {time.perf_counter() - start:.1f}s)")

    floor_1, n = best_of(args.repeats, lambda: floor_read(data, 1))
    floor_n, _ = best_of(args.repeats, lambda: floor_read(data, args.n_proc))
    assert n == args.rows
    index_path = work / "index.npz"
    ours, index = best_of(args.repeats, lambda: create_indices(data, index_path, n_proc=args.n_proc))
    assert len(index) == args.rows
    load, _ = best_of(args.repeats, lambda: BucketIndex.load(index_path, data).buckets)
    print(f"floor (pyarrow, 2 columns, 1 thread):        {args.rows / floor_1:>12,.0f} rows/s  {floor_1:.3f}s")
    print(f"floor (pyarrow, 2 columns, {args.n_proc} threads):       {args.rows / floor_n:>12,.0f} rows/s  "
          f"{floor_n:.3f}s")
    print(f"create_indices end to end (n_proc={args.n_proc}):      {args.rows / ours:>12,.0f} rows/s  {ours:.3f}s")
    print(f"BucketIndex.load + verify + buckets:        {args.rows / load:>12,.0f} rows/s  {load:.3f}s")

    if args.phase_images:
        raw = work / "demo_raw"
        if not (raw / f".done_{args.phase_images}").exists():
            shutil.rmtree(raw, ignore_errors=True)
            make_demo_dataset(raw, args.phase_images, rows_per_shard=max(1, args.phase_images // 4), seed=0)
            (raw / f".done_{args.phase_images}").touch()
        for n_proc in (1, args.n_proc):
            out = work / f"demo_phase_{n_proc}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            create_phase(raw, out, max_resolution=64, step=16, n_proc=n_proc, progress=False)
            seconds = time.perf_counter() - start
            print(f"create_phase, {args.phase_images} demo images (<=160 px -> <=64 px), n_proc={n_proc}: "
                  f"{args.phase_images / seconds:,.0f} images/s ({seconds:.2f}s, pool start-up included)")

    if args.photo_resolution:
        photos = make_photos(PHOTO_MEGAPIXELS)
        mb = sum(map(len, photos)) / 2**20
        full = photo_rate(photos, args.photo_resolution, draft=False, repeats=args.repeats)
        drafted = photo_rate(photos, args.photo_resolution, draft=True, repeats=args.repeats)
        sizes = "/".join(map(str, PHOTO_MEGAPIXELS))
        print(f"photos {sizes} MP JPEG ({mb:.1f} MiB) -> <= {args.photo_resolution} px, 1 process: "
              f"full decode {full:.2f} images/s, draft {drafted:.2f} images/s, draft/full = {drafted / full:.2f}x")

    print(f"rows_per_s={args.rows / ours:.0f}")


if __name__ == "__main__":
    main()
