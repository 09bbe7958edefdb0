"""Sample images from a checkpoint and save them as PNGs (and optionally a gif of the denoising).

    python infer.py --checkpoint models/<run> --prompt "a red circle" --prompt "a blue square" --gif
    python infer.py --checkpoint models/<run>/step_00100000 --prompts_file prompts.txt --width 512 --height 256

``--checkpoint`` is a run folder (its newest complete step_<N>/), one step_<N>/ folder, a folder written by
``python -m mmdit export`` or the Hub id of one (``owner/name``). Unset sampling
options come from the checkpoint's ``sample`` config. Files are named ``<prompt>_seed<seed>.png``; image k of
a run uses seed + k. The library behind this is :mod:`mmdit.inference` (``src/infer_loop.ipynb`` loads the
model once and samples repeatedly).
"""

import argparse
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="run folder (newest checkpoint), a step_<N> folder, an exported folder or a Hub id")
    p.add_argument("--prompt", action="append", default=[], help="text prompt; repeat for several")
    p.add_argument("--prompts_file", default=None, help="text file with one prompt per line")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of model.pixel_step (default max_res)")
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of model.pixel_step (default max_res)")
    p.add_argument("--num_steps", type=int, default=None, help="sampling steps (default: config sample.num_steps)")
    p.add_argument("--cfg_scale", type=float, default=None, help="guidance scale; 1 = none (default: config)")
    p.add_argument("--sampler", choices=["euler", "heun", "euler_stochastic"], default=None)
    p.add_argument("--shift", type=float, default=None, help="timestep shift, >1 = more high-noise steps")
    p.add_argument("--noise_scale", type=float, default=None, help="eta of euler_stochastic")
    p.add_argument("--seed", type=int, default=-1, help="-1 = random (printed)")
    p.add_argument("--num_per_prompt", type=int, default=1, help="images per prompt")
    p.add_argument("--batch_size", type=int, default=4, help="images per model pass")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="output folder (default: <run>/samples/step_<N>)")
    p.add_argument("--gif", action="store_true", help="also write the denoising as an animated gif per image")
    p.add_argument("--gif_frames", choices=["x0", "state"], default="x0",
                   help="gif frames: the predicted clean image at each step (x0) or the noisy state (state)")
    p.add_argument("--gif_duration_ms", type=int, default=100, help="milliseconds per gif frame")
    p.add_argument("--preview_vae", default=None,
                   help="a cheap decoder of the same latent space for the gif's intermediate frames (e.g. TAEF2's "
                        "folder beside the FLUX.2 VAE; default: the checkpoint's encoders.preview_vae)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("always", UserWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass

    from mmdit.config import ConfigError
    from mmdit.encoders import EncoderNotFoundError
    from mmdit.inference import (
        InferenceError,
        Pipeline,
        check_size,
        generate_to_folder,
        read_checkpoint_config,
        read_prompts,
        resolve_checkpoint,
    )
    from mmdit.train.checkpoint import CheckpointError

    try:
        prompts = read_prompts(args.prompt, args.prompts_file)
        # fail fast on a bad size, before loading the model and encoders
        cfg = read_checkpoint_config(resolve_checkpoint(args.checkpoint))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_size(args.width or cfg.model.max_res, args.height or cfg.model.max_res, cfg)
        pipe = Pipeline.from_checkpoint(args.checkpoint, device=args.device, weights=args.weights,
                                        preview_vae=args.preview_vae)
        images, pngs, gifs = generate_to_folder(
            pipe, prompts, args.out, gif=args.gif, gif_duration_ms=args.gif_duration_ms, frame_mode=args.gif_frames,
            width=args.width, height=args.height, num_steps=args.num_steps, cfg_scale=args.cfg_scale,
            sampler=args.sampler, seed=args.seed, batch_size=args.batch_size, shift=args.shift,
            num_per_prompt=args.num_per_prompt, noise_scale=args.noise_scale,
        )
    except (InferenceError, ConfigError, EncoderNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    i = images[0].info
    print(f"checkpoint {pipe.step_dir} ({args.weights} weights) on {pipe.device}; seed {pipe.last_seed}; "
          f"{i['sampler']}, {i['num_steps']} steps, cfg {i['cfg_scale']}, {i['width']}x{i['height']}")
    for png in pngs:
        print(f"wrote {png}")
    for gif in gifs:
        print(f"wrote {gif}")
    print(f"{len(pngs)} image(s){' and gifs' if gifs else ''} in {pngs[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
