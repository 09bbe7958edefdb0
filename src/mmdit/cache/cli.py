"""``python -m mmdit precompute --config <preset> --output_dir <cache> [key=value ...]``.

Under torchrun (or ``srun``) every process takes the shards ``rank, rank + world, ...`` (``RANK`` /
``WORLD_SIZE``, else ``SLURM_PROCID`` / ``SLURM_NTASKS``); no process group is needed. Rerun the same command
to finish an interrupted cache: complete shards are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _rank_world() -> tuple[int, int]:
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world])
    return 0, 1


def main(argv: list[str] | None = None) -> int:
    from ..config import load_config
    from .format import LATENT_MODES, TEXT_DTYPES
    from .writer import precompute

    parser = argparse.ArgumentParser(prog="python -m mmdit precompute", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="preset name in configs/ or a YAML path")
    parser.add_argument("--output_dir", required=True, help="the cache folder (train with data.cache_dir=<it>)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per encoder call")
    parser.add_argument("--latents", default="posterior", choices=LATENT_MODES,
                        help="posterior: VAE mean and std (sampled per step as online); mean: the mean only")
    parser.add_argument("--text_dtype", default="auto", choices=TEXT_DTYPES,
                        help="auto: the encoders' dtype; int8: per-token absmax quantisation (about 2x smaller)")
    parser.add_argument("--device", default=None, help="default: cuda:$LOCAL_RANK when there is a GPU, else cpu")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.parquet_folder=...")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rank, world = _rank_world()
    logging.basicConfig(level=logging.INFO, format=f"[precompute {rank}/{world}] %(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    cfg = load_config(args.config, args.overrides)
    stats = precompute(cfg, args.output_dir, rank, world, args.device, args.batch_size, args.latents, args.text_dtype)
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
