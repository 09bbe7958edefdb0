"""Write the Noto emoji set (npm emoji-datasource-google@16.0.0) as raw parquet shards with captions.

    python data/make_emoji_dataset.py --output_dir demo_out/emoji_raw                 # fetches with `npm pack`
    python data/make_emoji_dataset.py --output_dir DIR --source path/to/package       # an unpacked package

Writes DIR/train/ and DIR/held_out/ (emoji names never in training) for data/create_phase.py, and
DIR/emoji_dataset.json. Images keep their alpha (create_phase composites it over white).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmdit.data.emoji import EmojiSourceError, make_emoji_dataset  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder for train/, held_out/ and emoji_dataset.json")
    parser.add_argument("--source", default=None, help="an unpacked emoji-datasource-google package/ folder "
                        "(default: fetch it once with npm into ~/.cache/mmdit, or $MMDIT_CACHE)")
    parser.add_argument("--held_out", type=int, default=48, help="emoji names kept out of training")
    parser.add_argument("--seed", type=int, default=0, help="which names are held out")
    parser.add_argument("--no_skin_tones", action="store_true", help="base emoji only (1,911 of 3,786 images)")
    parser.add_argument("--rows_per_shard", type=int, default=512)
    args = parser.parse_args(argv)
    try:
        info = make_emoji_dataset(args.output_dir, args.source, args.held_out, args.seed, not args.no_skin_tones,
                                  args.rows_per_shard)
    except EmojiSourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: info[k] for k in ("source", "images", "emoji")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
