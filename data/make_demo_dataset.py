"""Write the procedural shapes demo dataset as parquet shards (the raw input of data/create_phase.py).

    python data/make_demo_dataset.py --output_dir data/shapes_raw --num_rows 4000
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmdit.data.demo_dataset import make_demo_dataset  # noqa: E402
from mmdit.data.shapes import DEFAULT_HOLDOUT, parse_holdout  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder for shard_00000.parquet, ...")
    parser.add_argument("--num_rows", type=int, default=2000)
    parser.add_argument("--rows_per_shard", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", default=",".join(f"{c}:{s}" for c, s in DEFAULT_HOLDOUT),
                        help="colour:shape pairs never generated, e.g. red:circle,blue:square ('none': keep all)")
    parser.add_argument("--corrupt_fraction", type=float, default=0.0,
                        help="fraction of rows whose image bytes are garbage (to test the pipeline)")
    parser.add_argument("--min_side", type=int, default=64, help="smallest long side of an image, pixels")
    parser.add_argument("--max_side", type=int, default=160, help="largest long side of an image, pixels")
    parser.add_argument("--max_aspect", type=float, default=2.0,
                        help="aspect ratios run from 1:max_aspect to max_aspect:1 (1 = square images)")
    args = parser.parse_args(argv)
    paths = make_demo_dataset(
        args.output_dir, args.num_rows, args.rows_per_shard, args.seed, parse_holdout(args.holdout),
        args.corrupt_fraction, args.min_side, args.max_side, max_aspect=args.max_aspect,
    )
    print(f"wrote {args.num_rows} rows in {len(paths)} shards to {args.output_dir}")


if __name__ == "__main__":
    main()
