"""Resize a folder of raw image+caption parquet shards into aspect buckets (one phase: 256, 512, ...).

    python data/create_phase.py --input_dir data/raw --output_dir data/phase_256 --max_resolution 256 --n_proc 8

Sides become multiples of --step (16 = VAE factor 8 x patch 2), the long side is at most
--max_resolution, the aspect ratio is kept to the nearest step. Re-running resumes: finished shards
are skipped. A summary (rows in/out, skipped corrupt ids, rows per bucket) goes to
<output_dir>/phase_summary.json.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmdit.data.phase import IMAGE_FORMATS, create_phase  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True, help="folder of raw *.parquet shards (searched recursively)")
    parser.add_argument("--output_dir", required=True, help="folder for the bucketed shards")
    parser.add_argument("--max_resolution", type=int, default=256, help="longest bucket side, pixels")
    parser.add_argument("--step", "--patch_size", dest="step", type=int, default=16,
                        help="bucket sides are multiples of this (seed name: --patch_size)")
    parser.add_argument("--max_area", type=int, default=None, help="optional cap on bucket height x width")
    parser.add_argument("--allow_upscale", action="store_true", help="enlarge images smaller than the bucket")
    parser.add_argument("--n_proc", type=int, default=1, help="worker processes (0 = one per CPU)")
    parser.add_argument("--image_format", choices=IMAGE_FORMATS, default="same",
                        help="output encoding; 'same' keeps JPEG as JPEG and writes PNG otherwise")
    parser.add_argument("--jpeg_quality", type=int, default=95)
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--row_group_size", type=int, default=32,
                        help="rows per parquet row group (small = cheap random access in training)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = create_phase(
        args.input_dir, args.output_dir, args.max_resolution, args.step, args.max_area, args.allow_upscale,
        args.n_proc, args.image_format, args.jpeg_quality, args.image_column, args.row_group_size,
    )
    shown = dict(summary)
    if len(shown["skipped_ids"]) > 20:
        shown["skipped_ids"] = shown["skipped_ids"][:20] + ["..."]
    print(json.dumps(shown, indent=2))


if __name__ == "__main__":
    main()
