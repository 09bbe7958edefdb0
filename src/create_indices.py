"""Build the bucket -> rows index of a folder of bucketed parquet shards (output of data/create_phase.py).

    python src/create_indices.py --data_parquet_folder data/phase_256 --bucket_indices_path data/bucket_indices_256.npz

Reads only the bucket_height/bucket_width columns. Training loads the index with
mmdit.data.indices.BucketIndex.load, which refuses an index whose shards have changed since.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmdit.data.indices import create_indices, describe  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_parquet_folder", required=True, help="folder of bucketed *.parquet shards")
    parser.add_argument("--bucket_indices_path", required=True, help="index file to write (.npz archive)")
    parser.add_argument("--n_proc", type=int, default=4, help="parallel readers (0 = one per CPU)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    index = create_indices(args.data_parquet_folder, args.bucket_indices_path, args.n_proc)
    seconds = time.perf_counter() - start
    print(describe(index))
    print(f"wrote {args.bucket_indices_path} in {seconds:.2f}s ({len(index) / max(seconds, 1e-9):,.0f} rows/s)")


if __name__ == "__main__":
    main()
