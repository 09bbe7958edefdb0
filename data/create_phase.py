"""Resize a folder of raw image+caption parquet shards into aspect buckets (one phase: 256, 512, ...).

    python data/create_phase.py --input_dir data/raw --output_dir data/phase_256 --max_resolution 256 --n_proc 8

Sides become multiples of --step (16 = VAE factor 8 x patch 2), the long side is at most
--max_resolution, the aspect ratio is kept to the nearest step. Each image is stored as the picture a
browser shows (EXIF orientation applied, 16-bit scaled, transparency over --background, CMYK and ICC
profiles converted, first frame of an animation). Rows that are not pictures are skipped with a
reason (null_image, undecodable, truncated, too_large, too_small, out_of_memory, decoder_error);
*.parquet files that are not readable parquet (git-lfs pointers, half-downloaded shards) are skipped,
or refused with --strict. Re-running resumes: finished shards are skipped, failed ones retried.
Everything skipped, with its reason, goes to <output_dir>/phase_summary.json.
Exit status: 0 done, 1 some shards failed (re-run), 2 bad arguments or input refused.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmdit.data.images import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE  # noqa: E402
from mmdit.data.phase import DEFAULT_ROW_GROUP_SIZE, IMAGE_FORMATS, create_phase  # noqa: E402

SHOWN_LIST_ITEMS = 20


def _colour(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) <= 255 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not R,G,B with each in 0..255 (e.g. 255,255,255)")
    return tuple(int(p) for p in parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True, help="folder of raw *.parquet shards (searched recursively)")
    parser.add_argument("--output_dir", required=True, help="folder for the bucketed shards")
    parser.add_argument("--max_resolution", type=int, default=256, help="longest bucket side, pixels")
    parser.add_argument("--step", "--patch_size", dest="step", type=int, default=16,
                        help="bucket sides are multiples of this (seed name: --patch_size)")
    parser.add_argument("--max_area", type=int, default=None, help="optional cap on bucket height x width")
    parser.add_argument("--allow_upscale", action="store_true", help="enlarge images smaller than the bucket")
    parser.add_argument("--n_proc", type=int, default=1,
                        help="worker processes (0 = one per CPU; 1 = in this process, no crash isolation)")
    parser.add_argument("--image_format", choices=IMAGE_FORMATS, default="same",
                        help="output encoding; 'same' keeps JPEG as JPEG and writes PNG otherwise")
    parser.add_argument("--jpeg_quality", type=int, default=95)
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--row_group_size", type=int, default=DEFAULT_ROW_GROUP_SIZE,
                        help="rows per parquet row group: a random row in training reads its whole group, small ones "
                        "take more footer memory (default from bench/reader.py; see BENCHMARKS.md)")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="skip images with more pixels than this (too_large), read from the header")
    parser.add_argument("--min_side", type=int, default=DEFAULT_MIN_SIDE,
                        help="skip images with a side shorter than this (too_small)")
    parser.add_argument("--background", type=_colour, default=DEFAULT_BACKGROUND,
                        help="R,G,B that transparent pixels are composited over (default: white)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse to start when an input *.parquet file is not readable parquet")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = create_phase(
            args.input_dir, args.output_dir, args.max_resolution, args.step, args.max_area, args.allow_upscale,
            args.n_proc, args.image_format, args.jpeg_quality, args.image_column, args.row_group_size,
            max_pixels=args.max_pixels, min_side=args.min_side, background=args.background, strict=args.strict,
        )
    except (ValueError, FileNotFoundError) as err:  # a user's mistake is one line, never a traceback
        print(f"create_phase: error: {err}", file=sys.stderr)
        return 2
    shown = dict(summary)
    for key in ("skipped_rows", "unreadable_files", "failed_shards"):
        if len(shown[key]) > SHOWN_LIST_ITEMS:
            shown[key] = shown[key][:SHOWN_LIST_ITEMS] + [f"... {len(shown[key]) - SHOWN_LIST_ITEMS} more"]
    print(json.dumps(shown, indent=2))
    return 1 if summary["failed_shards"] else 0


if __name__ == "__main__":
    sys.exit(main())
