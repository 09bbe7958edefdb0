"""Sampling speed: steps per second, and classifier-free guidance in one batched pass vs two passes.

    OMP_NUM_THREADS=1 python bench/sampling.py                    # tiny and small configs on the CPU
    python bench/sampling.py --configs small --device cuda --steps 28 --batch 4

For each config, ``mmdit.sampling.sample`` runs ``--steps`` Euler steps on ``--batch`` images at
``--cfg_scale`` with random weights and random text features (the text encoders and VAE are not part of the
loop being timed):

* batched: cond and uncond halves in one model call of batch 2B (what the sampler does);
* two-pass: the same guidance with two model calls of batch B per step (cond, then uncond).

Each timing is the median of ``--reps`` runs after one warm-up run. The last line is
``ratio=<batched time / two-pass time>`` for the last config (< 1: batching is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from mmdit.conditioning import TextCondition  # noqa: E402
from mmdit.config import ModelConfig  # noqa: E402
from mmdit.model import MMDiT, count_parameters  # noqa: E402
from mmdit.sampling import sample, sample_noise  # noqa: E402

# name -> (model config, image side in pixels, text tokens per sequence encoder)
CONFIGS = {
    # the test model: 64 px through the 16-channel VAE (8x8 latent, 16 image tokens)
    "tiny": (ModelConfig(depth=2, hidden_size=64, num_heads=4, text_dims=[48, 32], pooled_dim=24, max_res=64,
                         max_res_orig=64), 64, 16),
    # SD3 rule at depth 6 (384 wide, 6 heads) with SD3's encoder widths; 256 px = 32x32 latent, 256 image tokens
    "small": (ModelConfig(depth=6, max_res=256, max_res_orig=256), 256, 64),
}


def random_condition(cfg: ModelConfig, batch: int, length: int, device, dtype) -> TextCondition:
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(batch, length, d, generator=g).to(device, dtype) for d in cfg.text_dims]
    masks = [torch.ones(batch, length, dtype=torch.bool, device=device) for _ in cfg.text_dims]
    masks = [m.index_fill(1, torch.arange(length // 2, length, device=device), False) for m in masks]  # padding
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g).to(device, dtype) if cfg.pooled_dim else None
    return TextCondition(tokens, masks, pooled)


def build(cfg: ModelConfig, device, dtype) -> MMDiT:
    torch.manual_seed(0)
    model = MMDiT(cfg)
    with torch.no_grad():  # non-zero gates so every block does its full work
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.to(device, dtype).eval()


def timed(fn, reps: int, device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name: str, args, device, dtype) -> float:
    cfg, side, length = CONFIGS[name]
    model = build(cfg, device, dtype)
    h = w = side // cfg.latent_factor
    cond = random_condition(cfg, args.batch, length, device, dtype)
    uncond = cond.dropped()
    noise = sample_noise((args.batch, cfg.in_channels, h, w), torch.Generator().manual_seed(0), device=device)

    def velocity(x, t, c):
        return model(x.to(dtype), t.float(), c).float()

    def two_pass(x, t, c):  # c is unused: the cond/uncond pair is closed over
        v_c = velocity(x, t, cond)
        v_u = velocity(x, t, uncond)
        return v_u + args.cfg_scale * (v_c - v_u)

    kw = dict(sampler="euler", num_steps=args.steps)
    with torch.inference_mode():
        batched = timed(lambda: sample(velocity, noise, cond, cfg_scale=args.cfg_scale, **kw), args.reps, device)
        separate = timed(lambda: sample(two_pass, noise, None, cfg_scale=1.0, **kw), args.reps, device)
        out_b = sample(velocity, noise, cond, cfg_scale=args.cfg_scale, **kw)
        out_s = sample(two_pass, noise, None, cfg_scale=1.0, **kw)
    diff = (out_b - out_s).abs().max().item()
    tokens = (h // cfg.patch_size) * (w // cfg.patch_size)
    print(
        f"{name:<6} depth={cfg.depth} hidden={cfg.dim} params={count_parameters(cfg) / 1e6:.2f}M "
        f"image={side}px tokens={tokens}+{length * len(cfg.text_dims)} batch={args.batch} steps={args.steps} "
        f"cfg={args.cfg_scale} {device.type}/{str(dtype).removeprefix('torch.')} threads={torch.get_num_threads()}"
    )
    print(f"  batched CFG:  {batched:8.3f} s  {args.steps / batched:8.2f} steps/s")
    print(f"  two passes:   {separate:8.3f} s  {args.steps / separate:8.2f} steps/s")
    print(f"  batched/two-pass = {batched / separate:.3f}   (max |difference| of the samples {diff:.1e})")
    return batched / separate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,small", help=f"comma-separated, from {list(CONFIGS)}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--cfg_scale", type=float, default=5.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    ratio = None
    for name in args.configs.split(","):
        if name not in CONFIGS:
            p.error(f"unknown config {name!r}; choose from {list(CONFIGS)}")
        ratio = bench(name, args, device, dtype)
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
