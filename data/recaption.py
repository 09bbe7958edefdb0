"""Recaption bucketed (or raw) parquet shards with a vision-language model: new columns in copies of the shards.

    python data/recaption.py --input_dir data/phase_256 --output_dir data/phase_256_recaptioned \
        --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf --batch_size 32

Adds ``recaption`` (long), ``recaption_short`` and ``recaption_flag`` (empty unless a caption came back
empty or cut off twice, or the image did not decode). Many GPUs: ``torchrun --nproc_per_node 8
data/recaption.py ...`` or a SLURM array (``sbatch --array=0-15``); each worker takes every N-th shard.
Rerun the same command after an interruption: finished shards are skipped. Then index the new folder
(``python src/create_indices.py``) and train with ``data.caption_columns=[recaption,recaption_short]``.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmdit.data.recaption import RecaptionConfig, recaption_folder, worker_of  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    defaults = RecaptionConfig(model="")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True, help="folder of parquet shards (never written)")
    parser.add_argument("--output_dir", required=True, help="where the captioned copies go (same relative paths)")
    parser.add_argument("--model", required=True, help="Hugging Face name or folder of an image-text-to-text VLM")
    parser.add_argument("--short_model", default="", help="a causal text LM that shortens the long caption "
                        "(default: the VLM with --prompt_short)")
    for name in ("prompt_long", "prompt_short", "short_template", "image_column", "dtype"):
        parser.add_argument(f"--{name}", default=getattr(defaults, name))
    for name in ("max_new_tokens", "max_new_tokens_short", "batch_size"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    args = vars(parser.parse_args(argv))
    input_dir, output_dir = args.pop("input_dir"), args.pop("output_dir")
    rank, world = worker_of()
    logging.basicConfig(level=logging.INFO, format=f"[recaption {rank}/{world}] %(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        stats = recaption_folder(RecaptionConfig(**args), input_dir, output_dir, rank, world)
    except (ValueError, FileNotFoundError) as err:
        print(f"recaption: {err}", file=sys.stderr)
        return 2
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
