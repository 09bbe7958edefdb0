"""Command line: ``python -m mmdit <command> ...``.

  params       --config PRESET [key=value ...]   parameter count (meta device, nothing allocated)
  tiny-models  DIR                               build tiny random-weight encoders, VAE and VLM for tests and the demo
  precompute   --config PRESET --output_dir DIR  encode the bucketed shards once into a cache (data.source=cache)
  score        ...                               score generated shape images (colour, shape, position)
  demo         [--quick]                         the CPU demo end to end
  evaluate     --checkpoint DIR --eval_set DIR   validation loss, FD_DINOv2, CMMD, CLIP score to CSV/JSON; --plot RUN;
                                                 --time_to_target RUN --target V (MLPerf-style)
  memory       --config PRESET --gpus N [N ...]  memory per GPU under DDP and FSDP, with/without checkpointing
  export       --checkpoint STEP --output DIR [--ema] | --checkpoint STEP --consolidate
                                                 a Hub-style folder (MMDiT.from_pretrained), or full safetensors
  ema          --run RUN --stds 0.05,0.08 [--eval_set DIR] [--output DIR] [--export DIR]
                                                 post-hoc EMA: weights of any EMA length from the phema snapshots
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "tiny-models": "mmdit.encoders.tiny",
    "precompute": "mmdit.cache.cli",
    "score": "mmdit.score",
    "demo": "mmdit.demo",
    "evaluate": "mmdit.eval.evaluate",
    "memory": "mmdit.memory",
    "export": "mmdit.export",
    "ema": "mmdit.reconstruct_ema",
}


def params_main(argv: list[str]) -> None:
    from .config import load_config
    from .model import count_parameters

    parser = argparse.ArgumentParser(prog="python -m mmdit params", description="Print the MMDiT parameter count.")
    parser.add_argument("--config", required=True, help="preset name in configs/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides).model
    n = count_parameters(cfg)
    print(f"depth={cfg.depth} hidden={cfg.dim} heads={cfg.heads} mlp={cfg.mlp_type} text_dims={list(cfg.text_dims)} "
          f"pooled_dim={cfg.pooled_dim}")
    print(f"parameters: {n:,} ({n:.3e})")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    from .config import ConfigError

    command, rest = argv[0], argv[1:]
    try:
        if command == "params":
            params_main(rest)
        elif command in COMMANDS:
            importlib.import_module(COMMANDS[command]).main(rest)
        else:
            sys.exit(f"unknown command {command!r}; choose one of {['params', *COMMANDS]}")
    except ConfigError as err:
        sys.exit(f"config error: {err}")


if __name__ == "__main__":
    main()
